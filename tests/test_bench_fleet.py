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
from scripts.bench_fleet import bench_fleet, main
from scripts.bench_fleet_curve import parse_setup, table
from tests.store_support import PG_ADMIN

PG_SERVER = "postgresql://postgres@127.0.0.1:5432/test"  # where the bench creates its database


def _bench_databases() -> set[str]:
    import psycopg  # noqa: PLC0415 - only the tests that use PostgreSQL

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        return {r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'ef_bench_%'").fetchall()}


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


@pytest.mark.slow
def test_fleet_bench_on_two_replicas_with_failover(tmp_path: Path, trained_bundle: Path) -> None:
    """Two ``serve`` processes on one fresh PostgreSQL database; the agents round-robin over
    them; the scheduler's replica is SIGKILLed mid staged rollout."""
    before = _bench_databases()
    result = bench_fleet(tmp_path, devices=6, duration=2.0, interval=0.5, batch=5,
                         ingest_batch=50, baseline_devices=2, baseline_interval=0.2,
                         baseline_duration=1.0, replicas=2, database=PG_SERVER, failover=True,
                         failover_interval=1.0, tick=0.5, bundle=trained_bundle,
                         progress=lambda m: None)
    f = result.figures
    assert _bench_databases() == before  # its own database, dropped at the end
    assert f["replicas"] == 2 and f["postgresql"] and f["errors"] == 0
    # Every device enrolled, heartbeated, had its telemetry acknowledged and got the releases.
    assert len({d.device_id for d in result.devices}) == 6
    for dev in result.devices:
        assert dev.latencies and not dev.errors
        assert dev.acked == dev.sent > 0
        assert dev.releases
    assert f["fanout_late"] == 0
    # Failover: the scheduler's replica died, a survivor took over and the rollout completed
    # with each step passed once; every agent of the killed replica heartbeats on the other.
    assert f["rollout_state"] == "completed" and f["steps_passed"] == [1, 1, 1]
    victims = [d for d in result.devices if d.victim]
    assert len(victims) == f["victims"] == f["moved"] == 3  # round-robin: half of them
    for key in ("takeover_s", "rollout_moved_s", "rollout_done_s", "failover_p50_s",
                "failover_p99_s", "failover_max_s"):
        assert math.isfinite(f[key]) and f[key] > 0, key
    assert f["takeover_s"] <= f["rollout_moved_s"] <= f["rollout_done_s"]
    for dev in victims:
        assert dev.failover_s is not None and 0 < dev.failover_s <= f["failover_max_s"]
    for key in ("cp_cores", "db_cores", "db_ingest_cores", "gen_cores"):
        assert math.isfinite(f[key]) and f[key] >= 0, key
    names = [r["name"] for r in result.rows]
    assert any(n.startswith("scheduler takeover") and "2 replicas on PostgreSQL" in n
               for n in names)
    assert sum(n.startswith("agent failover p") for n in names) == 2
    assert all(r["pass"] is not False for r in result.rows if "failover" in r["name"]
               or "takeover" in r["name"])


def test_fleet_bench_refuses_replicas_without_postgresql_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--replicas", "2"]) == 2
    assert main(["--failover"]) == 2
    assert main(["--database", "mysql://x"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") and "hint" in line
                                   for line in lines)


def test_curve_setups_and_table() -> None:
    assert parse_setup("sqlite") == (1, False)
    assert parse_setup("pg") == (1, True)
    assert parse_setup("pg3") == (3, True)
    with pytest.raises(ValueError, match="unknown setup"):
        parse_setup("mysql")
    figures = {"hb_p50_ms": 2.0, "hb_p99_ms": 5.0, "records_per_s": 40000.0,
               "offered_per_s": 50000.0, "ingest_hb_p99_ms": 900.0, "fanout_s": 0.9,
               "fanout_call_s": 0.6, "cp_cores": 0.3, "cp_ingest_cores": 0.9, "db_cores": 0.1,
               "db_ingest_cores": 0.4, "gen_cores": 0.2, "gen_ingest_cores": 0.95,
               "errors": 0, "enroll_s": 3.0, "fanout_late": 0}
    text = table([
        {"setup": "pg2", "agents": 1000, "replicas": 2, "runs": 1, "error": "", **figures},
        {"setup": "sqlite", "agents": 3000, "replicas": 1, "runs": 0, "error": "RuntimeError: x"},
    ])
    lines = text.splitlines()
    assert lines[0].startswith("| setup | agents |") and len(lines) == 4
    assert "| pg2 | 1000 | 2.0 / 5.0 ms | 40,000 (50,000) rec/s |" in lines[2]
    assert "0.20 / 0.95 **saturated**" in lines[2]
    assert "failed: RuntimeError: x" in lines[3]


def test_make_bench_replica_rows_say_why_when_postgresql_does_not_answer(tmp_path: Path) -> None:
    from scripts.bench import bench_replicas  # noqa: PLC0415 - imports every bench

    rows = bench_replicas(tmp_path, "postgresql://postgres@127.0.0.1:1/postgres")
    assert len(rows) == 3
    for row in rows:
        assert row["figure"] is None and row["pass"] is None
        assert "PostgreSQL not reachable at postgresql://postgres@127.0.0.1:1/postgres" in (
            row["note"])


def test_store_ingest_bench_measures_both_backends(tmp_path: Path) -> None:
    from scripts.bench_store_ingest import bench_store_ingest  # noqa: PLC0415

    rows = bench_store_ingest(tmp_path, PG_SERVER, batches=2, size=20)
    assert [r["name"].split(",")[-1].strip() for r in rows[:2]] == ["SQLite", "PostgreSQL"]
    assert rows[2]["name"].startswith("store: two PostgreSQL stores")
    for row in rows:
        assert row["figure"] > 0 and math.isfinite(row["figure"])
    assert rows[1]["baseline"] > 0 and "statements" in rows[1]["baseline_name"]
