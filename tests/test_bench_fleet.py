"""The fleet benchmark end to end with a handful of simulated agents (scripts/bench_fleet.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

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
