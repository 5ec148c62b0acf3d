"""Who waits for whom on PostgreSQL (control_plane/storage/postgres.py, ``_tx``): telemetry
and heartbeats of different devices are written side by side from several replicas; one
device's writes wait for each other (its deduplication reads what it stored before); every
other write still holds the database alone. Each wait is observed in ``pg_locks`` (a backend
waiting on an advisory lock), not guessed from timing."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import psycopg
import pytest

from control_plane.domain.record_columns import TelemetryWrite
from control_plane.domain.records import (
    CertificateRecord,
    DeviceRecord,
    TelemetryRecord,
)
from control_plane.storage import Store, open_store
from tests.store_support import pg_database
from tests.support import WAIT, LoopThread, start_control_plane, wait_until

__all__ = ["pg_database"]  # fixtures (tests/store_support.py)


def _waiting_on_advisory_locks(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                           " AND NOT granted").fetchone()
    return int(row[0]) if row else 0


def _enroll(store: Store, device_id: str) -> None:
    store.add_token(f"tok-{device_id}", {}, 0, 100, "admin")
    store.enroll(f"tok-{device_id}", 1, DeviceRecord(device_id, {}, 1.0),
                 CertificateRecord(f"serial-{device_id}", "device", device_id, 0, 1e9, 1))


def _batch(device_id: str, seqs: range) -> TelemetryWrite:
    return TelemetryWrite(device_id, [TelemetryRecord(s, "error", 1.0, b"e%d" % s)
                                      for s in seqs], {}, 100.0, 0, 0)


class _Holder:
    """A transaction held open in its own thread until ``release``."""

    def __init__(self, tx: Callable[[], AbstractContextManager[object]]) -> None:
        self.inside, self.go = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, args=(tx,))
        self.thread.start()
        assert self.inside.wait(WAIT)

    def _run(self, tx: Callable[[], AbstractContextManager[object]]) -> None:
        with tx():
            self.inside.set()
            self.go.wait(WAIT)

    def release(self) -> None:
        self.go.set()
        self.thread.join(WAIT)


def _in_thread(fn: Callable[[], object]) -> threading.Thread:
    t = threading.Thread(target=fn)
    t.start()
    return t


def _waits_while_held(url: str, tx: Callable[[], AbstractContextManager[object]],
                      write: Callable[[], object], what: str) -> None:
    """``write`` (in a thread) waits for the transaction ``tx`` holds, seen in ``pg_locks``,
    and finishes once it is released."""
    held = _Holder(tx)
    try:
        writer = _in_thread(write)
        wait_until(lambda: _waiting_on_advisory_locks(url) == 1, what=f"{what} waits")
        assert writer.is_alive()
    finally:
        held.release()
    writer.join(WAIT)
    assert not writer.is_alive()


@pytest.fixture
def stores(pg_database: str) -> Iterator[tuple[Store, Store, str]]:
    a, b = open_store(pg_database), open_store(pg_database)
    try:
        for device in ("dev-1", "dev-2"):
            _enroll(a, device)
        yield a, b, pg_database
    finally:
        a.close()
        b.close()


def test_other_devices_write_while_one_device_is_held_and_that_device_waits(
        stores: tuple[Store, Store, str]) -> None:
    a, b, url = stores

    def hold_dev_1() -> AbstractContextManager[object]:
        return a._tx(devices=["dev-1"])  # type: ignore[attr-defined]

    def other_device_then_same_device() -> None:
        b.ingest_telemetry_many([_batch("dev-2", range(1, 6))])  # does not wait
        b.record_heartbeats([("dev-2", 5.0, "1", {}, [])])
        b.ingest_telemetry_many([_batch("dev-1", range(1, 4))])  # waits

    _waits_while_held(url, hold_dev_1, other_device_then_same_device, "dev-1's writer")
    assert [r.seq for r in a.telemetry_records("dev-1")] == [1, 2, 3]
    assert [r.seq for r in a.telemetry_records("dev-2")] == [1, 2, 3, 4, 5]


def test_any_other_write_waits_for_device_writes_and_they_wait_for_it(
        stores: tuple[Store, Store, str]) -> None:
    a, b, url = stores
    _waits_while_held(url, lambda: a._tx(devices=["dev-1"]),  # type: ignore[attr-defined]
                      lambda: b.revoke_device("dev-2", 10.0), "the revocation")
    revoked = b.get_device("dev-2")
    assert revoked is not None and revoked.revoked_at == 10.0
    _waits_while_held(url, a._tx,  # type: ignore[attr-defined]
                      lambda: b.record_heartbeats([("dev-1", 5.0, "1", {}, [])]),
                      "the heartbeat")
    device = b.get_device("dev-1")
    assert device is not None and device.last_seen == 5.0


def test_one_devices_overlapping_batches_on_two_replicas_are_stored_once(
        stores: tuple[Store, Store, str]) -> None:
    a, b, _ = stores
    barrier = threading.Barrier(2)
    failures: list[BaseException] = []

    def send(store: Store, size: int) -> None:
        barrier.wait()
        try:  # a resend racing the original, cut into other batches: other segments
            for start in range(1, 401, 40):
                store.ingest_telemetry_many([_batch("dev-1", range(start, start + size))])
        except BaseException as exc:
            failures.append(exc)

    threads = [_in_thread(lambda: send(a, 40)), _in_thread(lambda: send(b, 50))]
    for t in threads:
        t.join(WAIT)
    assert failures == []
    assert [r.seq for r in a.telemetry_records("dev-1")] == list(range(1, 411))


def test_a_telemetry_write_waiting_on_postgresql_leaves_the_event_loop_free(
        tmp_path: Path, loop: LoopThread, pg_database: str) -> None:
    """The control plane stores telemetry off its event loop on PostgreSQL: while one
    device's write waits for the database, the loop goes on with everything else."""
    cp = start_control_plane(tmp_path / "cp", loop, database_url=pg_database)
    other = open_store(pg_database)
    try:
        device = cp.enroll_agent(tmp_path / "dev").device_id
        services = cp.cp.services
        caller = services.identity.device_by_id(device)
        held = _Holder(lambda: other._tx(devices=[device]))  # type: ignore[attr-defined]
        try:
            write = asyncio.run_coroutine_threadsafe(services.telemetry.ingest(
                caller, [TelemetryRecord(1, "error", 1.0, b"e1")], 0, 0), loop.loop)
            wait_until(lambda: _waiting_on_advisory_locks(pg_database) == 1,
                       what="the write waits for the device")
            assert loop.run(asyncio.sleep(0, result="free")) == "free"  # the loop answers
            assert not write.done()
        finally:
            held.release()
        assert write.result(WAIT) == [1]
        assert [r.seq for r in other.telemetry_records(device)] == [1]
    finally:
        other.close()
        cp.stop()
