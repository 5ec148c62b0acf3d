"""History: drift windows over time with per-feature PSI, per-arm statistics as a series,
retention with daily roll-ups, and the `fleet drift --since` / `fleet experiments status
--history` read commands."""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from pathlib import Path

import grpc
import pytest
from edgefleet.v1 import admin_pb2, agent_pb2

from control_plane.domain.history import (
    MAX_POINTS,
    MIN_STEP_SECONDS,
    arm_series,
    check_since,
    series_step,
    window_limit,
)
from control_plane.domain.records import ArmStatsRecord, TelemetryRecord
from control_plane.domain.telemetry import MAX_FEATURES_LISTED, derive
from fleet.history import parse_duration, parse_since
from fleetcore.errors import InvalidInputError
from tests.support import (
    WAIT,
    FakeClock,
    LoopThread,
    assign_digits_v1,
    fleet_json,
    rpc_code,
    send_telemetry,
    start_control_plane,
)


def _snap(device: str, version: int, at: float, requests: int, labelled: int = 0,
          correct: int = 0, p95: float = 1.0) -> ArmStatsRecord:
    return ArmStatsRecord(device, "m", version, requests, 0, 0.5, p95, labelled, correct, at)


def test_arm_series_sums_each_devices_newest_snapshot_at_each_time() -> None:
    snaps = [_snap("a", 1, 100, 10), _snap("b", 1, 150, 5, p95=3.0), _snap("a", 1, 250, 30),
             _snap("a", 2, 260, 4, labelled=4, correct=3)]
    points = arm_series(list(reversed(snaps)), since=0, now=300, step=100)
    got = [(p.time, p.version, p.requests, p.devices) for p in points]
    assert got == [(100, 1, 10, 1), (200, 1, 15, 2), (300, 1, 35, 2), (300, 2, 4, 1)]
    # p95 is weighted by requests, as the rollout gates weigh it.
    assert points[1].p95_ms == pytest.approx((1.0 * 10 + 3.0 * 5) / 15)
    assert points[-1].correct == 3 and points[-1].labelled == 4


def test_history_limits() -> None:
    now = 1_800_000_000.0
    assert check_since(0, now) < now - 365 * 86400  # 0: as far back as kept
    assert check_since(now - 60, now) == now - 60
    for bad in (now + 10, -1.0, math.nan, math.inf):
        with pytest.raises(InvalidInputError):
            check_since(bad, now)
    assert window_limit(0) == 1000 and window_limit(10_000) == 10_000
    with pytest.raises(InvalidInputError):
        window_limit(10_001)
    assert series_step(now - 60, now, 1) == MIN_STEP_SECONDS
    assert series_step(now - 86400 * 365, now, 60) == 86400 * 365 / MAX_POINTS
    with pytest.raises(InvalidInputError):
        series_step(now - 60, now, math.nan)
    assert parse_duration("24h") == 86400 and parse_duration("2w") == 14 * 86400
    assert parse_since("90m", now=now) == now - 5400
    assert parse_since("2027-01-15T08:00:00Z") == 1_800_000_000.0
    assert parse_since("2027-01-15") == 1_800_000_000.0 - 8 * 3600
    for text in ("yesterday", "-5h", "1e9s", "12"):
        with pytest.raises(InvalidInputError):
            parse_since(text, now=now)


def _drift_payload(**over: object) -> bytes:
    doc = {"model": "m", "version": 1, "start": 1.0, "end": 2.0, "rows": 10, "score": 0.1,
           "drifted": False, "prediction_psi": 0.0, "drifted_features": [],
           "feature_psi": {"a": 0.5, "b": 0.0}}
    doc.update(over)
    return json.dumps(doc).encode()


def test_feature_psi_is_parsed_with_limits() -> None:
    def one(payload: bytes) -> tuple[dict, dict]:
        return derive("dev", [TelemetryRecord(1, "drift", 1.0, payload)])

    rows, problems = one(_drift_payload())
    assert rows[1].feature_psi == {"a": 0.5, "b": 0.0} and not problems
    # An older agent sends none: the window counts, without per-feature PSI.
    legacy = json.loads(_drift_payload())
    del legacy["feature_psi"]
    rows, problems = one(json.dumps(legacy).encode())
    assert rows[1].feature_psi == {} and not problems
    for hostile in ({"a": -0.1}, {"a": True}, {"a": "0.3"}, {"": 0.2}, {"x" * 129: 0.2},
                    [0.1, 0.2], {"a": 1e309}):
        rows, problems = one(_drift_payload(feature_psi=hostile).replace(b"Infinity", b"1e999"))
        assert 1 not in rows and 1 in problems, hostile
    wide = {f"f{i}": i / 10 for i in range(MAX_FEATURES_LISTED + 50)}
    rows, problems = one(_drift_payload(feature_psi=wide))
    kept = rows[1].feature_psi
    assert len(kept) == MAX_FEATURES_LISTED and min(kept.values()) == 5.0  # the largest stay


def _record(seq: int, kind: str, at: float, doc: dict) -> agent_pb2.TelemetryRecord:
    return agent_pb2.TelemetryRecord(seq=seq, kind=kind, created_at=at,
                                     payload=json.dumps(doc).encode())


@pytest.mark.slow
def test_drift_and_arm_history_through_the_cli_then_rolled_up(
    tmp_path: Path, loop: LoopThread, trained_bundle: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    clock = FakeClock(float(int(time.time())))  # whole seconds: --since below is exact
    cp = start_control_plane(tmp_path / "cp", loop, clock=clock)
    try:
        cp.enroll_agent(tmp_path / "a")
        cp.enroll_agent(tmp_path / "b")
        ids = {d.id for d in cp.cp.store.list_devices()}
        assign_digits_v1(cp, trained_bundle, tmp_path)
        t0 = clock.now
        # Each device: three windows an hour apart whose pixel_3 drifts more and more, and
        # arm counters that grow.
        for name in ("a", "b"):
            records = []
            for i in range(3):
                end = t0 - 3 * 3600 + i * 3600
                records.append(_record(1 + i, "drift", end, {
                    "model": "digits", "version": 1, "start": end - 600, "end": end,
                    "rows": 100, "score": 0.1 + 0.2 * i, "drifted": i == 2,
                    "prediction_psi": 0.01, "drifted_features": ["pixel_3"] if i == 2 else [],
                    "feature_psi": {"pixel_3": 0.1 + 0.4 * i, "pixel_4": 0.01}}))
                records.append(_record(10 + i, "arm_stats", end, {
                    "model": "digits", "version": 1, "requests": 100 * (i + 1), "errors": i,
                    "labelled": 10 * (i + 1), "correct": 9 * (i + 1), "p50_ms": 1.0,
                    "p95_ms": 2.0}))
            send_telemetry(cp.api, tmp_path / name, records)

        doc = fleet_json(cp, capsys, "drift", "--since", "4h", "--model", "digits")
        assert len(doc["windows"]) == 6 and doc["days"] == [] and not doc["truncated"]
        assert [w["end"] for w in doc["windows"]] == sorted(w["end"] for w in doc["windows"])
        newest = doc["windows"][-1]
        assert newest["feature_psi"] == {"pixel_3": pytest.approx(0.9), "pixel_4": 0.01}
        one = next(iter(sorted(ids)))
        doc = fleet_json(cp, capsys, "drift", "--since", "150m", "--device", one)
        assert [w["device_id"] for w in doc["windows"]] == [one, one]  # the last two hours
        doc = fleet_json(cp, capsys, "drift", "--since", "4h", "--limit", "2")
        assert len(doc["windows"]) == 2 and doc["truncated"]

        since = dt.datetime.fromtimestamp(t0 - 4 * 3600, dt.UTC).isoformat()
        doc = fleet_json(cp, capsys, "experiments", "status", "--model", "digits",
                         "--history", "--since", since, "--step", "1h")
        series = [(round(p["time"] - t0), p["requests"], p["devices"])
                  for p in doc["history"]["points"]]
        # Points every hour up to now: each device's newest counters summed.
        assert series == [(-3 * 3600, 200, 2), (-2 * 3600, 400, 2), (-3600, 600, 2), (0, 600, 2)]
        assert doc["history"]["points"][-1]["accuracy"] == pytest.approx(0.9)

        # The table forms print too (a person reads them).
        from fleet.cli import main as fleet_main  # noqa: PLC0415

        base = ["--config", str(cp.home / "operators/admin/fleet.toml"), "--api", cp.api]
        assert fleet_main([*base, "drift", "--since", "4h"]) == 0
        assert "pixel_3 0.90" in capsys.readouterr().out
        assert fleet_main([*base, "drift", "--since", "tomorrow"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error:") and "24h" in err and "Traceback" not in err
        assert fleet_main([*base, "drift", "--device", one]) == 1  # --device needs --since

        # Past the retention the windows and snapshots are rolled up per day, then deleted.
        clock.advance(31 * 86400)
        assert cp.cp.services.telemetry.expire() >= 12
        doc = fleet_json(cp, capsys, "drift", "--since", "40d", "--model", "digits")
        assert doc["windows"] == []
        days = doc["days"]
        assert sum(d["windows"] for d in days) == 6
        assert {d["device_id"] for d in days} == ids
        assert max(d["max_score"] for d in days) == pytest.approx(0.5)
        rolled = cp.cp.store._query("SELECT device_id, requests FROM arm_stats_rollup")  # type: ignore[attr-defined]
        # Each day keeps the arm's last snapshot of that day (never a sum of snapshots): one
        # day ends at 300; when the snapshots straddle midnight UTC the earlier day keeps
        # its own last one (100 or 200).
        assert {(r[0], r[1]) for r in rolled} <= {(d, n) for d in ids for n in (100, 200, 300)}
        assert {r[0] for r in rolled} == ids
        assert all(max(r[1] for r in rolled if r[0] == d) == 300 for d in ids)
    finally:
        cp.stop()


def test_history_queries_are_checked(tmp_path: Path, loop: LoopThread) -> None:
    cp = start_control_plane(tmp_path / "cp", loop)
    try:
        stub = cp.admin_stub()
        for request in (admin_pb2.GetDriftHistoryRequest(limit=10_001),
                        admin_pb2.GetDriftHistoryRequest(since=time.time() + 3600),
                        admin_pb2.GetDriftHistoryRequest(model="\x1b[2J")):
            with pytest.raises(grpc.RpcError) as err:
                stub.GetDriftHistory(request, timeout=WAIT)
            assert rpc_code(err.value) == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            stub.GetArmHistory(admin_pb2.GetArmHistoryRequest(), timeout=WAIT)
        assert rpc_code(err.value) == grpc.StatusCode.INVALID_ARGUMENT  # a model is needed
        empty = stub.GetDriftHistory(admin_pb2.GetDriftHistoryRequest(), timeout=WAIT)
        assert list(empty.windows) == [] and list(empty.days) == []
    finally:
        cp.stop()
