"""Telemetry reaches the control plane exactly once: outages, kill -9, duplicates, bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from edgefleet.v1 import agent_pb2, agent_pb2_grpc

from control_plane.api.convert import seq_runs
from edge_agent.reporting.outbox import Outbox
from edge_agent.reporting.telemetry import encode
from edge_agent.state import StateDir
from tests.support import (
    WAIT,
    RunningControlPlane,
    assign_digits_v1,
    device_credentials,
    kill_agent_after_a_failed_contact,
    start_agent,
)


def _rows(cp: RunningControlPlane, device_id: str) -> list[tuple[int, str]]:
    return [(r.seq, r.kind) for r in cp.cp.store.telemetry_records(device_id)]


def _drift_payload(i: int, base: float = 0.0) -> bytes:
    return encode({"model": "digits", "version": 1, "start": base + i, "end": base + i + 1.0,
                   "rows": 200, "score": 0.01 * i, "drifted": i % 2 == 0,
                   "prediction_psi": 0.0, "drifted_features": ["pixel_3"] if i % 2 == 0 else []})


def test_duplicates_are_stored_once_and_acknowledged(
    cp: RunningControlPlane, tmp_path: Path, trained_bundle: Path
) -> None:
    cfg = cp.enroll_agent(tmp_path / "a")
    assign_digits_v1(cp, trained_bundle, tmp_path)  # windows count for what the device runs
    creds = device_credentials(tmp_path / "a")
    now = time.time()
    batch = agent_pb2.TelemetryBatch(records=[
        agent_pb2.TelemetryRecord(seq=i, kind="drift", created_at=now,
                                  payload=_drift_payload(i, now - 10))
        for i in (1, 2, 3)
    ])
    with grpc.secure_channel(cp.api, creds) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        first = stub.SendTelemetry(batch, timeout=WAIT)
        again = stub.SendTelemetry(batch, timeout=WAIT)  # e.g. the ack was lost on the way
    assert list(first.acked) == list(again.acked) == [1, 2, 3]
    assert _rows(cp, cfg.device_id) == [(1, "drift"), (2, "drift"), (3, "drift")]
    latest = cp.cp.store.latest_drift("digits")
    assert [(w.device_id, w.start, w.drifted) for w in latest] == [
        (cfg.device_id, now - 10 + 3, False)]


def test_the_answer_is_runs_only_to_an_agent_that_asks_for_them(
    cp: RunningControlPlane, tmp_path: Path
) -> None:
    """Agents before ``ack_runs`` read only ``acked``: they get the list, as before."""
    cp.enroll_agent(tmp_path / "a")
    creds = device_credentials(tmp_path / "a")

    def batch(seqs: list[int], runs: bool) -> agent_pb2.TelemetryBatch:
        return agent_pb2.TelemetryBatch(ack_runs=runs, records=[
            agent_pb2.TelemetryRecord(seq=i, kind="error", created_at=1.0,
                                      payload=encode({"where": "t", "error": str(i)}))
            for i in seqs])

    with grpc.secure_channel(cp.api, creds) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        old = stub.SendTelemetry(batch([1, 2, 3], runs=False), timeout=WAIT)
        new = stub.SendTelemetry(batch([4, 5, 6, 7], runs=True), timeout=WAIT)
        gaps = stub.SendTelemetry(batch([9, 10, 12, 8], runs=True), timeout=WAIT)
    assert (list(old.acked), list(old.runs)) == ([1, 2, 3], [])
    assert (list(new.acked), list(new.runs)) == ([], [4, 7])
    assert (list(gaps.acked), list(gaps.runs)) == ([], [9, 10, 12, 12, 8, 8])


def test_seq_runs_are_the_seqs_in_order_as_pairs() -> None:
    assert seq_runs([]) == []
    assert seq_runs(list(range(7, 507))) == [7, 506]
    assert seq_runs([3, 4, 5, 9, 1, 2, 2]) == [3, 5, 9, 9, 1, 2, 2, 2]
    assert seq_runs([2**64 - 2, 2**64 - 1, 0, 1]) == [2**64 - 2, 2**64 - 1, 0, 1]  # no wrap
    assert seq_runs(np.arange(10, 510, dtype=np.uint64)) == [10, 509]  # a batch's column


def test_malformed_payload_is_kept_but_not_derived(cp: RunningControlPlane,
                                                   tmp_path: Path) -> None:
    cfg = cp.enroll_agent(tmp_path / "a")
    creds = device_credentials(tmp_path / "a")
    batch = agent_pb2.TelemetryBatch(records=[
        agent_pb2.TelemetryRecord(seq=1, kind="drift", created_at=1.0, payload=b"{not json"),
        agent_pb2.TelemetryRecord(seq=2, kind="drift", created_at=1.0,
                                  payload=encode({"model": "digits", "version": -1})),
    ])
    with grpc.secure_channel(cp.api, creds) as channel:
        reply = agent_pb2_grpc.AgentServiceStub(channel).SendTelemetry(batch, timeout=WAIT)
    assert list(reply.acked) == [1, 2]
    assert [seq for seq, _ in _rows(cp, cfg.device_id)] == [1, 2]
    assert cp.cp.store.latest_drift(None) == []


def test_oversized_batch_is_refused(cp: RunningControlPlane, tmp_path: Path) -> None:
    cp.enroll_agent(tmp_path / "a")
    creds = device_credentials(tmp_path / "a")
    batch = agent_pb2.TelemetryBatch(records=[
        agent_pb2.TelemetryRecord(seq=i, kind="x", created_at=1.0, payload=b"{}")
        for i in range(1, 1100)
    ])
    with grpc.secure_channel(cp.api, creds) as channel, pytest.raises(grpc.RpcError) as err:
        agent_pb2_grpc.AgentServiceStub(channel).SendTelemetry(batch, timeout=WAIT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_agent_drains_its_outbox_after_an_outage(cp: RunningControlPlane,
                                                 tmp_path: Path) -> None:
    cfg = cp.enroll_agent(tmp_path / "a")
    cp.stop()  # the control plane is down while telemetry is written
    with Outbox(StateDir(tmp_path / "a").outbox) as outbox:
        for i in range(1, 31):
            outbox.append("drift", _drift_payload(i), now=float(i))
    agent = start_agent(tmp_path / "a", cp.loop)
    try:
        agent.wait_for("error")
        cp.restart()
        while agent.wait_for("heartbeat")["telemetry_sent"] == 0:
            pass
    finally:
        agent.stop()
    assert [seq for seq, _ in _rows(cp, cfg.device_id)] == list(range(1, 31))
    with Outbox(StateDir(tmp_path / "a").outbox) as outbox:
        assert outbox.stats().depth == 0


@pytest.mark.slow
def test_telemetry_survives_kill_9_of_the_agent_and_arrives_once(
    cp: RunningControlPlane, tmp_path: Path
) -> None:
    cfg = cp.enroll_agent(tmp_path / "a")
    state = StateDir(tmp_path / "a")
    cp.stop()
    with Outbox(state.outbox) as outbox:
        for i in range(1, 21):
            outbox.append("drift", _drift_payload(i), now=float(i))
    # The agent runs while the control plane is down, then is killed -9.
    kill_agent_after_a_failed_contact(state.root)
    with Outbox(state.outbox) as outbox:  # written more while it was dead
        for i in range(21, 26):
            outbox.append("drift", _drift_payload(i), now=float(i))
    cp.restart()
    agent = start_agent(state.root, cp.loop)
    try:
        while agent.wait_for("heartbeat")["telemetry_sent"] == 0:
            pass
    finally:
        agent.stop()
    assert [seq for seq, _ in _rows(cp, cfg.device_id)] == list(range(1, 26))
    (seventh,) = [r for r in cp.cp.store.telemetry_records(cfg.device_id) if r.seq == 7]
    assert json.loads(seventh.payload)["start"] == 7.0
