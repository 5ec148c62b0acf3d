"""Storage faults on an agent host: a full disk or a read-only state directory never stops
serving. Telemetry that cannot be stored is counted as dropped and the count still reaches the
control plane; installs that do not fit are refused (``edge_agent/install/download.py``).

The outbox cases use SQLite's own page limit (``PRAGMA max_page_count``: a real "database or
disk is full") and a file that cannot be opened. The whole-agent case mounts a small tmpfs as
the state directory (root, as on the development and CI machines; it fails, with the reason,
where mounting is not allowed).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from edge_agent.reporting.outbox import Outbox
from tests.support import WAIT, RunningControlPlane, start_agent
from tests.test_delivery import _bundle_for, _committed, _fleet, _wait_models


def test_a_full_outbox_file_counts_records_as_dropped_and_recovers(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db") as box:
        assert box.append("drift", b"{}", 1.0) == 1
        box._conn.execute("PRAGMA max_page_count = 1")  # type: ignore[union-attr]
        assert box.append("drift", b"x" * 50_000, 2.0) is None  # SQLITE_FULL: lost, counted
        assert box.append_many([("arm_stats", b"y" * 50_000)] * 2, 3.0) == [None, None]
        stats = box.stats()
        assert (stats.unwritable, stats.dropped_by_kind) == (3, {"arm_stats": 2, "drift": 1})
        assert [r.seq for r in box.pending()] == [1]  # what was stored is still there
        box._conn.execute("PRAGMA max_page_count = 1000000")  # type: ignore[union-attr]
        assert box.append("drift", b"{}", 4.0) == 2  # space again: writes resume
        assert box.ack([1, 2]) == 2 and box.stats().depth == 0


def test_an_outbox_that_cannot_be_opened_serves_as_a_counter(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "no-such-dir" / "outbox.db")  # SQLITE_CANTOPEN
    assert box.append("drift", b"{}", 1.0) is None
    assert box.pending() == [] and box.ack([1]) == 0
    assert box.stats().dropped == box.stats().unwritable == 1
    box.close()


@contextlib.contextmanager
def _tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          check=False, capture_output=True, text=True)
    assert done.returncode == 0, f"cannot mount a tmpfs here: {done.stderr.strip()}"
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(folder: Path) -> None:
    with (folder / "filler").open("wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    assert shutil.disk_usage(folder).free < 65536


def _serve(port: int, rows: np.ndarray, n: int) -> dict[int, int]:
    codes: dict[int, int] = {}
    with httpx.Client(timeout=WAIT) as client:
        for i in range(n):
            body = {"id": f"r{i}", "inputs": [{"name": "input", "shape": [1, rows.shape[1]],
                                               "datatype": "FP32",
                                               "data": rows[i % len(rows)].tolist()}]}
            r = client.post(f"http://127.0.0.1:{port}/v2/models/digits/infer", json=body)
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
    return codes


@pytest.mark.slow
def test_a_full_disk_then_a_read_only_state_directory_never_stop_serving(
    cp: RunningControlPlane, tmp_path: Path, trained_bundle: Path
) -> None:
    from sklearn.datasets import load_digits  # noqa: PLC0415

    rows = load_digits().data.astype(np.float32)
    with _tmpfs(tmp_path / "fs", "40m") as fs:
        cfg = cp.enroll_agent(fs / "a")
        agent = start_agent(fs / "a", cp.loop, probation_seconds=0.0)
        try:
            port = agent.wait_for("serving")["http_port"]
            bundle = _bundle_for(cp, trained_bundle, tmp_path / "v1", version=1)
            assert _fleet(cp, "models", "publish", str(bundle)) == 0
            assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "1") == 0
            _wait_models(agent, _committed(1))
            _fill(fs)
            assert _serve(port, rows, 300) == {200: 300}
            agent.agent.supervisor.core.flush(WAIT)
            while agent.agent.outbox.stats().unwritable == 0:  # the next snapshot is lost
                agent.wait_for("heartbeat")
            while not _reported_drops(cp, cfg.device_id):  # and the count reaches the fleet
                agent.wait_for("heartbeat")
        finally:
            agent.stop()
        (fs / "filler").unlink()
        done = subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=False,
                              capture_output=True)
        assert done.returncode == 0, done.stderr
        agent = start_agent(fs / "a", cp.loop, probation_seconds=0.0)  # a read-only state dir
        try:
            port = agent.wait_for("serving")["http_port"]
            assert _serve(port, rows, 100) == {200: 100}  # the installed model, from disk
            agent.wait_for("heartbeat")
        finally:
            agent.stop()


def _reported_drops(cp: RunningControlPlane, device_id: str) -> int:
    rows = cp.cp.store._query(  # type: ignore[attr-defined]
        "SELECT dropped FROM telemetry_status WHERE device_id = ?", (device_id,))
    return int(rows[0]["dropped"]) if rows else 0
