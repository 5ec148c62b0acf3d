"""What a device's refused reports write to the control plane's log: one line per batch and
kind of refusal, counted by reason, however many records the batch refused (a line per record
let one device write hundreds of lines a batch)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from control_plane.domain.records import TelemetryRecord
from control_plane.domain.telemetry import derive
from control_plane.services.batch_log import MAX_REASONS, warn_batch
from tests.support import LoopThread, start_control_plane


def _arm_stats(version: int) -> bytes:
    return json.dumps({"model": "digits", "version": version, "requests": 10, "errors": 0,
                       "p50_ms": 1.0, "p95_ms": 2.0, "labelled": 0, "correct": 0}).encode()


def test_a_batch_of_refusals_logs_one_line_per_check_and_counts_every_record(
        tmp_path: Path, loop: LoopThread, caplog: pytest.LogCaptureFixture) -> None:
    cp = start_control_plane(tmp_path / "cp", loop)
    try:
        device = cp.enroll_agent(tmp_path / "dev").device_id
        caller = cp.cp.services.identity.device_by_id(device)
        records = [TelemetryRecord(s, "arm_stats", 1.0, _arm_stats(7)) for s in range(1, 301)]
        records += [TelemetryRecord(s, "weather", 1.0, b"{}") for s in range(301, 306)]
        records += [TelemetryRecord(s, "drift", 1.0, b"not json") for s in range(306, 309)]
        caplog.set_level(logging.WARNING, logger="control_plane")
        acked = loop.run(cp.cp.services.telemetry.ingest(caller, records, 0, 0))
        assert acked == list(range(1, 309))
        lines = [r.getMessage() for r in caplog.records
                 if r.name == "control_plane.services.telemetry"]
        assert lines == [
            f"telemetry from {device}: 5 records refused (unknown-kind 5)",
            f"telemetry from {device}: 3 payloads not understood (malformed 3); first: seq 306:"
            + lines[1].split("; first: seq 306:")[1],
            f"telemetry from {device}: 300 reports refused (not-in-release 300)",
        ]
        assert cp.cp.store.report_refusals(device) == {
            "?/unknown-kind": 5, "drift/malformed": 3, "arm_stats/not-in-release": 300}
    finally:
        cp.stop()


def test_many_distinct_reasons_are_named_up_to_a_bound(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="control_plane")
    warn_batch("dev-1", "samples refused", [f"digits: row {i} is wrong" for i in range(40)])
    warn_batch("dev-1", "samples refused", [])  # nothing refused: nothing said
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("telemetry from dev-1: 40 samples refused (")
    assert line.count("digits: row") == MAX_REASONS and line.endswith("35 other reasons)")


@pytest.mark.parametrize(("field", "value"), [
    ("requests", True), ("requests", 1.0), ("requests", -1), ("requests", 2**63),
    ("requests", "10"), ("p50_ms", False), ("p50_ms", "1"), ("p50_ms", None),
])
def test_an_arm_report_with_a_number_of_the_wrong_type_is_not_understood(
        field: str, value: object) -> None:
    doc = json.loads(_arm_stats(1))
    doc[field] = value
    record = TelemetryRecord(1, "arm_stats", 1.0, json.dumps(doc).encode())
    derived, problems = derive("dev-1", [record])
    assert derived == {} and field in problems[1]


def test_an_arm_report_takes_whole_numbers_for_latencies() -> None:
    doc = json.loads(_arm_stats(1))
    doc["p50_ms"], doc["p95_ms"] = 1, 3
    (row,) = derive("dev-1", [TelemetryRecord(1, "arm_stats", 1.0,
                                              json.dumps(doc).encode())])[0].values()
    assert (row.p50_ms, row.p95_ms) == (1.0, 3.0)  # type: ignore[union-attr]
    assert type(row.p50_ms) is float  # type: ignore[union-attr]
