"""The fleet benchmark end to end with a handful of simulated agents (scripts/bench_fleet.py)."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest

from control_plane.domain.records import CertificateRecord, DeviceRecord
from control_plane.storage.heartbeats import HeartbeatWriter
from control_plane.storage.sqlite import SqliteStore
from fleetcore.errors import NotFoundError
from scripts.bench_fleet import bench_fleet


@pytest.mark.slow
def test_fleet_bench_produces_every_figure(tmp_path: Path, trained_bundle: Path) -> None:
    result = bench_fleet(tmp_path, devices=5, duration=2.0, interval=0.5, batch=5,
                         ingest_batch=50, baseline_devices=2, baseline_interval=0.2,
                         baseline_duration=1.0, bundle=trained_bundle, progress=lambda m: None)
    f = result.figures
    assert f["errors"] == 0
    # Every device heartbeated, had its telemetry acknowledged and got the fanned-out release.
    assert len(result.devices) == 5
    for dev in result.devices:
        assert dev.latencies and not dev.errors
        assert dev.acked == dev.sent > 0
        assert dev.releases  # verified against the release key inside the benchmark
    assert f["fanout_late"] == 0 and f["fanout_s"] > 0
    for key in ("hb_p50_ms", "hb_p99_ms", "hb_base_p99_ms", "records_per_s", "offered_per_s",
                "cp_cores", "cp_base_cores"):
        assert math.isfinite(f[key]) and f[key] >= 0, key
    assert f["peak_rss"] >= f["idle_rss"] > 0
    names = [r["name"] for r in result.rows]
    assert any("heartbeat p99" in n for n in names)
    assert any("telemetry accepted" in n for n in names)
    assert any("fan-out" in n for n in names)
    for row in result.rows:
        assert {"figure", "baseline", "ratio", "target", "pass", "unit"} <= row.keys()


def test_heartbeats_of_one_moment_share_a_transaction(tmp_path: Path) -> None:
    """The fix the fleet bench led to: one commit for the heartbeats that arrive together."""
    store = SqliteStore(tmp_path / "registry.db")
    for i in range(3):
        store.add_token(f"t{i}", {}, 0.0, 1e12, "test")
        store.enroll(f"t{i}", 1.0, DeviceRecord(id=f"dev-{i}", labels={}, enrolled_at=1.0,
                                                agent_version="1", host={}),
                     CertificateRecord(serial=f"s{i}", kind="device", subject=f"dev-{i}",
                                       not_before=0.0, not_after=1e12, issued_at=1.0))
    commits = []
    store._conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    writer = HeartbeatWriter(store)

    async def beats() -> list[Any]:
        return await asyncio.gather(
            *(writer.record(f"dev-{i}", 5.0, "2", {"os": "Linux"}, []) for i in range(3)),
            writer.record("dev-unknown", 5.0, "2", {}, []), return_exceptions=True)

    results = asyncio.run(beats())
    assert results[:3] == [None, None, None]
    assert isinstance(results[3], NotFoundError)
    assert len(commits) == 1
    for i in range(3):
        device = store.get_device(f"dev-{i}")
        assert device is not None and device.last_seen == 5.0 and device.agent_version == "2"
