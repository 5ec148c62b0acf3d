"""Several control-plane replicas on one PostgreSQL database (docs/architecture.md, "Several
replicas"): one scheduler among them, releases that reach agents on every replica through
LISTEN/NOTIFY, bundles kept in the database, and one audit chain."""

from __future__ import annotations

import queue
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from control_plane.config import ControlPlaneConfig
from control_plane.domain.rollout_plan import step_devices
from control_plane.server import SCHEDULER_LEAD, ControlPlane
from control_plane.storage import Store, open_store
from control_plane.storage.blobs import BlobStore
from control_plane.storage.pg_coordination import lock_key
from fleetcore import operator_config
from tests.store_support import pg_database, store, store_url
from tests.support import (
    WAIT,
    LoopThread,
    RunningControlPlane,
    fleet_json,
    start_agent,
    start_control_plane,
    wait_until,
)
from tests.test_delivery import _committed, _wait_models
from tests.test_serving_fleet import _publish

__all__ = ["pg_database", "store", "store_url"]  # fixtures (tests/store_support.py)

DIGEST = "sha256:" + "ab" * 32


def _until(check: Callable[[], bool], timeout: float = WAIT, what: str = "") -> float:
    """Wait for ``check()`` (a state another thread or process changes); the seconds it took."""
    start = time.monotonic()
    wait_until(check, timeout, what)
    return time.monotonic() - start


# ---------------------------------------------------------------- the store's part, both backends
def test_a_sealed_blob_kept_in_the_store_reads_back_and_a_reseal_replaces_it(
    store: Store,
) -> None:
    assert store.get_blob(DIGEST) is None
    big = bytes(range(256)) * (5 * 1024 * 1024 // 256 + 3)  # more than one part
    store.put_blob(DIGEST, big)
    assert store.get_blob(DIGEST) == big
    store.put_blob(DIGEST, b"resealed")
    assert store.get_blob(DIGEST) == b"resealed"


def test_one_process_alone_on_sqlite_always_leads_and_hears_nothing(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'r.db'}")
    try:
        assert store.try_lead("scheduler") and store.try_lead("scheduler")
        assert not store.shares_blobs()
        store.publish_change("dev-1")  # nobody to tell
        store.listen_changes(lambda what: None)()
    finally:
        store.close()


# ---------------------------------------------------------------- PostgreSQL coordination
def test_exactly_one_store_leads_and_another_takes_over_when_it_closes(pg_database: str) -> None:
    a, b = open_store(pg_database), open_store(pg_database)
    try:
        assert a.try_lead("scheduler")
        assert a.try_lead("scheduler")  # held, checked again
        assert not b.try_lead("scheduler")
        assert b.try_lead("other")  # another name is another lock
        a.close()  # the session ends: PostgreSQL releases the lock at once
        took = _until(lambda: b.try_lead("scheduler"), 10, "b to lead")
        assert took < 5
    finally:
        b.close()


def test_a_change_published_by_one_store_reaches_the_others_listeners(pg_database: str) -> None:
    a, b = open_store(pg_database), open_store(pg_database)
    heard_a: queue.Queue[str] = queue.Queue()
    heard_b: queue.Queue[str] = queue.Queue()
    stop_a = a.listen_changes(heard_a.put)
    stop_b = b.listen_changes(heard_b.put)
    try:
        assert a.shares_blobs()
        a.publish_change("dev-1")
        a.publish_change("roots")
        assert heard_b.get(timeout=5) == "dev-1"
        assert heard_b.get(timeout=5) == "roots"
        b.publish_change("dev-2")
        assert heard_a.get(timeout=5) == "dev-2"  # a hears b, and not itself
        assert heard_a.empty()
    finally:
        stop_a()
        stop_b()
        a.close()
        b.close()


def test_a_blob_sealed_on_one_replica_is_read_on_another_that_never_had_the_file(
    tmp_path: Path, pg_database: str,
) -> None:
    a, b = open_store(pg_database), open_store(pg_database)
    key = bytes(range(32))
    try:
        plain = tmp_path / "bundle"
        plain.write_bytes(b"x" * 3000)
        import hashlib  # noqa: PLC0415

        digest = "sha256:" + hashlib.sha256(plain.read_bytes()).hexdigest()
        BlobStore(tmp_path / "a", key, chunk_size=1024, shared=a).put_file(plain, digest, 3000)
        other = BlobStore(tmp_path / "b", key, chunk_size=1024, shared=b)
        assert not other.path(digest).exists()
        assert b"".join(other.read(digest, 3000, 1000, 1500)) == b"x" * 1500
        assert other.path(digest).exists()  # cached in b's home from now on
        assert not BlobStore(tmp_path / "c", key, chunk_size=1024, shared=b).exists(
            "sha256:" + "00" * 32)
        # A rotation on a reseals the database's copy; b, given only the new key (its home's
        # keys copied after the rotation), reads it although its cached copy is under the old.
        rotated = BlobStore(tmp_path / "a", key, chunk_size=1024, shared=a)
        new_key = bytes(range(1, 33))
        rotated.use_key(new_key)
        assert rotated.reseal(digest)
        assert b.blob_digests() == [digest]
        fresh = BlobStore(tmp_path / "b", new_key, chunk_size=1024, shared=b)
        assert b"".join(fresh.read(digest, 3000, 0, 3000)) == b"x" * 3000
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------- two real replicas, real agents
def _replica(source: RunningControlPlane, home: Path, loop: LoopThread) -> RunningControlPlane:
    """A second `control-plane serve` on a copy of ``source``'s home (same database, same keys),
    on ports of its own."""
    shutil.copytree(source.home, home)
    cfg = ControlPlaneConfig.load(home)
    cfg.api_listen = cfg.enroll_listen = "127.0.0.1:0"
    cp = ControlPlane(cfg)
    loop.run(cp.start())
    admin = operator_config.load(home / "operators" / "admin" / "fleet.toml")
    return RunningControlPlane(home=home, cp=cp, loop=loop, admin=admin)


@pytest.mark.slow
def test_two_replicas_share_the_fleet_and_the_scheduler_moves_when_its_leader_stops(
    tmp_path: Path, loop: LoopThread, pg_database: str, trained_bundle: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    a = start_control_plane(tmp_path / "a", loop, database_url=pg_database,
                            rollout_tick_seconds=0.3)
    b = _replica(a, tmp_path / "b", loop)
    agents = []
    try:
        # One scheduler: a started first and leads; b's ticks stand aside.
        _until(lambda: a.cp.leader_ticks > 0, what="a to lead")
        # A bundle published on a, and two agents enrolled on (and connected to) b.
        _publish(a, trained_bundle, tmp_path, 1)
        digest = a.cp.store.get_model_version("digits", 1).digest  # type: ignore[union-attr]
        assert a.cp.services.ctx.blobs.path(digest).exists()
        assert not b.cp.services.ctx.blobs.path(digest).exists()  # b never had the file
        devices = []
        for name in ("one", "two"):
            cfg = b.enroll_agent(tmp_path / name)
            devices.append(cfg.device_id)
            agents.append(start_agent(tmp_path / name, loop, probation_seconds=0.0))
        for agent in agents:
            agent.wait_for("serving")
        _until(lambda: all(b.cp.notifier.subscribers(d) for d in devices),
               what="both agents' Sync streams on b")
        assert not any(a.cp.notifier.subscribers(d) for d in devices)

        # b records the wake-ups that came from the database (the release changed on a).
        woken: queue.Queue[tuple[str, float]] = queue.Queue()
        remote = b.cp._remote_change

        def heard(what: str) -> None:
            woken.put((what, time.monotonic()))
            remote(what)

        b.cp._remote_change = heard  # type: ignore[method-assign]
        # Concurrent audit appends from both replicas while the rollout runs.
        def append(cp: RunningControlPlane, who: str) -> None:
            for i in range(15):
                cp.cp.store.append_audit(time.time(), who, "test.append", str(i), "allowed", "")

        writers = [threading.Thread(target=append, args=(cp, who))
                   for cp, who in ((a, "a"), (b, "b"))]
        for w in writers:
            w.start()
        # The rollout starts on a: step 1 (50%, one device) bakes 4 s before step 2.
        started = time.monotonic()
        fleet_json(a, capsys, "rollouts", "start", "--model", "digits", "--version", "1",
                   "--steps", "50,100", "--bake", "4")
        rollout = a.cp.store.get_rollout("digits")
        assert rollout is not None
        in_step_1 = step_devices("digits", rollout.device_ids, rollout.steps, 0)
        assert len(in_step_1) == 1
        while True:  # b hears of it from the database, and wakes that device's stream
            what, when = woken.get(timeout=10)
            if what == in_step_1[0]:
                break
        assert when - started < 3  # pushed, not polled
        for w in writers:
            w.join(WAIT)
        idx = devices.index(in_step_1[0])
        _wait_models(agents[idx], _committed(1))  # served by b: the bundle came from the database
        assert b.cp.services.ctx.blobs.path(digest).exists()
        rollout = a.cp.store.get_rollout("digits")
        assert rollout is not None and rollout.step == 0  # still baking step 1

        # The leader stops mid-rollout: b takes the schedule over within seconds.
        ticks_a = a.cp.leader_ticks
        assert ticks_a > 0 and b.cp.leader_ticks == 0
        a.stop()
        took = _until(lambda: b.cp.leader_ticks > 0, 10, "b to lead")
        assert took < 5
        _wait_models(agents[1 - idx], _committed(1))  # step 2, advanced by b
        _until(lambda: (r := b.cp.store.get_rollout("digits")) is not None
               and r.state.value == "completed", what="the rollout to complete on b")
        history = b.cp.store.get_rollout("digits").history  # type: ignore[union-attr]
        for step in ("step 1 (50%", "step 2 (100%"):  # each step ran once
            assert sum(1 for h in history if h.startswith(step) and "passed" in h) == 1, history
        verdict = fleet_json(b, capsys, "audit", "verify")
        assert verdict["ok"] and verdict["entries"] >= 30, verdict
    finally:
        for agent in agents:
            agent.stop()
        b.stop()
        if a.cp.scheduler is not None:
            a.stop()


@pytest.mark.slow
def test_two_replicas_bridges_share_the_device_topics_through_a_shared_subscription(
    tmp_path: Path, loop: LoopThread, pg_database: str, trained_bundle: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.mqtt_support import start_mqtt_control_plane, wait_bridge  # noqa: PLC0415

    a = start_mqtt_control_plane(tmp_path / "a", loop, database_url=pg_database, bridges=2)
    shutil.copytree(a.home, tmp_path / "b")
    cfg = ControlPlaneConfig.load(tmp_path / "b")
    cfg.api_listen = cfg.enroll_listen = "127.0.0.1:0"
    cfg.mqtt_bridge = 2  # `serve --bridge 2`: an identity of its own on the broker
    b = RunningControlPlane(home=tmp_path / "b", cp=ControlPlane(cfg), loop=loop, admin=a.admin)
    loop.run(b.cp.start())
    wait_bridge(b)
    handled: dict[str, list[str]] = {"a": [], "b": []}
    for name, cp in (("a", a), ("b", b)):
        bridge = cp.cp.bridge
        assert bridge is not None
        original = bridge._handle

        async def counted(msg: Any, original: Any = original, name: str = name) -> None:
            handled[name].append(msg.topic)
            await original(msg)

        bridge._handle = counted  # type: ignore[method-assign]
        grouped = bridge._telemetry_group  # telemetry: stored a group at a time

        async def counted_group(msgs: list[Any], grouped: Any = grouped,
                                name: str = name) -> None:
            handled[name].extend(m.topic for m in msgs)
            await grouped(msgs)

        bridge._telemetry_group = counted_group  # type: ignore[method-assign]
    agent = None
    try:
        _publish(a, trained_bundle, tmp_path, 1)
        device = a.enroll_agent(tmp_path / "dev").device_id
        agent = start_agent(tmp_path / "dev", loop, probation_seconds=0.0, transport="mqtt")
        agent.wait_for("serving")
        fleet_json(b, capsys, "rollouts", "start", "--model", "digits", "--version", "1")
        _wait_models(agent, _committed(1))  # bundle chunks asked of the group, answered once
        for _ in range(3):
            agent.wait_for("heartbeat")
        # Requests and telemetry went round the group (each message to one bridge), status to
        # both; both bridges stayed up (two under one client id would disconnect each other).
        for name in ("a", "b"):
            assert any(not t.endswith("/status") for t in handled[name]), handled
            assert any(t.endswith("/status") for t in handled[name]), handled
        assert a.cp.bridge is not None and a.cp.bridge.connected.is_set()
        assert b.cp.bridge is not None and b.cp.bridge.connected.is_set()
        assert a.cp.store.get_device(device) is not None
        verdict = fleet_json(b, capsys, "audit", "verify")
        assert verdict["ok"], verdict
    finally:
        if agent is not None:
            agent.stop()
        b.stop()
        a.stop()
        if a.broker is not None:
            a.broker.stop()


_LEADER = """
import sys
from control_plane.storage import open_store
store = open_store(sys.argv[1])
assert store.try_lead("scheduler")
print("leading", flush=True)
sys.stdin.read()  # holds the lock until it is killed (or its stdin closes)
"""


def test_a_leader_killed_with_sigkill_loses_the_schedule_to_another_within_seconds(
    pg_database: str,
) -> None:
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    proc = subprocess.Popen([sys.executable, "-c", _LEADER, pg_database],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    other = open_store(pg_database)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "leading"
        assert not other.try_lead("scheduler")
        proc.kill()  # SIGKILL: no clean-up in the process; its socket closes with it
        proc.wait(WAIT)
        assert _until(lambda: other.try_lead("scheduler"), 10, "the other to lead") < 5
    finally:
        if proc.poll() is None:
            proc.kill()
        other.close()


def test_serve_with_a_bridge_identity_mqtt_config_did_not_issue_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from control_plane.cli import main as cp_main  # noqa: PLC0415

    assert cp_main(["init", "--home", str(tmp_path / "cp")]) == 0
    capsys.readouterr()
    assert cp_main(["serve", "--home", str(tmp_path / "cp"), "--bridge", "3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no MQTT bridge identity 3") and "--bridges 3" in err
    assert err.count("\n") == 1


def _lead_held_elsewhere(url: str) -> bool:
    """Whether another session holds the scheduler's advisory lock (pg_locks shows a bigint key
    as its high and low 32 bits)."""
    import psycopg  # noqa: PLC0415

    key = lock_key(SCHEDULER_LEAD) & 0xFFFF_FFFF_FFFF_FFFF
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND classid::text::bigint = %s AND objid::text::bigint = %s AND objsubid = 1",
            (key >> 32, key & 0xFFFF_FFFF)).fetchone()
    return bool(row and row[0])


@pytest.mark.slow
def test_the_scheduler_replica_killed_with_sigkill_mid_rollout_is_replaced_and_no_step_reruns(
    tmp_path: Path, loop: LoopThread, pg_database: str, trained_bundle: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import signal  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from tests.mqtt_support import free_port  # noqa: PLC0415

    # The home, made by a control plane that then stops; A = `control-plane serve` on it.
    first = start_control_plane(tmp_path / "a", loop, database_url=pg_database,
                                rollout_tick_seconds=0.3)
    first.stop()
    api, enroll = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "control_plane.cli", "serve", "--home", str(first.home),
         "--api", api, "--enroll", enroll], stderr=subprocess.DEVNULL)
    agent = None
    b = None
    try:
        _until(lambda: _lead_held_elsewhere(pg_database), what="A to lead")
        b = _replica(first, tmp_path / "b", loop)
        a = RunningControlPlane(home=first.home, cp=first.cp, loop=loop, admin=first.admin)
        a_api = replace_api(a, api)
        _publish(a_api, trained_bundle, tmp_path, 1)
        cfg = b.enroll_agent(tmp_path / "one")
        agent = start_agent(tmp_path / "one", loop, probation_seconds=0.0)
        agent.wait_for("serving")
        fleet_json(a_api, capsys, "rollouts", "start", "--model", "digits", "--version", "1",
                   "--steps", "100", "--bake", "4")
        _wait_models(agent, _committed(1))  # pushed by A through the database to B's stream
        r = b.cp.store.get_rollout("digits")
        assert r is not None and r.state.value == "running" and b.cp.leader_ticks == 0
        proc.send_signal(signal.SIGKILL)
        proc.wait(WAIT)
        assert _until(lambda: b.cp.leader_ticks > 0, 10, "B to lead") < 5
        _until(lambda: (r := b.cp.store.get_rollout("digits")) is not None
               and r.state.value == "completed", what="the rollout to complete on B")
        history = b.cp.store.get_rollout("digits").history  # type: ignore[union-attr]
        assert sum(1 for h in history if h.startswith("step 1 (") and "passed" in h) == 1
        assert [d.id for d in b.cp.store.list_devices()] == [cfg.device_id]
        assert fleet_json(b, capsys, "audit", "verify")["ok"]
    finally:
        if agent is not None:
            agent.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
        if b is not None:
            b.stop()


def replace_api(cp: RunningControlPlane, api: str) -> RunningControlPlane:
    """``cp`` as seen at another API address (a `serve` subprocess on the same home)."""

    class At(RunningControlPlane):
        @property
        def api(self) -> str:
            return api

    return At(home=cp.home, cp=cp.cp, loop=cp.loop, admin=cp.admin)
