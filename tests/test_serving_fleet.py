"""The whole serving loop through real processes' parts: rollout → OIP traffic → experiment
with feedback → per-arm results and drift at the control plane."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from edgefleet.v1 import agent_pb2, agent_pb2_grpc
from sklearn.datasets import load_digits

from edge_agent.reporting.outbox import Outbox
from edge_agent.reporting.telemetry import encode
from edge_agent.state import StateDir
from fleet.cli import main as fleet_main
from tests.support import RunningControlPlane, device_credentials, start_agent
from tests.test_delivery import _bundle_for, _committed, _wait_models


def _fleet_json(cp: RunningControlPlane, capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    capsys.readouterr()
    rc = fleet_main(["--config", str(cp.home / "operators/admin/fleet.toml"), "--api", cp.api,
                     *args, "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


def _publish(cp: RunningControlPlane, trained_bundle: Path, tmp_path: Path,
             *versions: int) -> None:
    """Publish copies of the trained bundle as these versions, signed by the publisher."""
    for version in versions:
        bundle = _bundle_for(cp, trained_bundle, tmp_path / f"v{version}", version=version)
        assert fleet_main(["--config", str(cp.home / "operators/admin/fleet.toml"), "--api",
                           cp.api, "models", "publish", str(bundle)]) == 0


def _infer(client: httpx.Client, port: int, rows: np.ndarray, request_id: str,
           key: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"id": request_id, "inputs": [
        {"name": "input", "shape": list(rows.shape), "datatype": "FP32",
         "data": rows.ravel().tolist()}]}
    if key is not None:
        body["parameters"] = {"routing_key": key}
    r = client.post(f"http://127.0.0.1:{port}/v2/models/digits/infer", json=body)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_serving_experiment_feedback_and_drift_reach_the_fleet(
    cp_any: RunningControlPlane, tmp_path: Path, trained_bundle: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cp = cp_any  # over gRPC and over MQTT
    _publish(cp, trained_bundle, tmp_path, 1, 2)
    cfg = cp.enroll_agent(tmp_path / "a")
    agent = start_agent(tmp_path / "a", cp.loop, probation_seconds=0.0,
                        drift_window_requests=100, transport=cp.transport)
    digits = load_digits()
    X, y = digits.data.astype(np.float32), digits.target
    try:
        port = agent.wait_for("serving")["http_port"]
        _fleet_json(cp, capsys, "rollouts", "start", "--model", "digits", "--version", "1")
        _wait_models(agent, _committed(1))
        exp = _fleet_json(cp, capsys, "experiments", "start", "--model", "digits",
                          "--challenger", "2", "--weight", "0.5")
        assert (exp["champion"], exp["challenger"], exp["devices"]) == (1, 2, [cfg.device_id])
        while agent.wait_for("models")["serial"] < 2:
            pass  # the experiment's release: both arms installed and served
        with httpx.Client(timeout=30) as client:
            seen: dict[int, int] = {}
            for i in range(300):
                out = _infer(client, port, X[i : i + 1], f"req-{i}", key=f"user-{i}")
                assert out["id"] == f"req-{i}"
                seen[int(out["model_version"])] = seen.get(int(out["model_version"]), 0) + 1
                fb = client.post(f"http://127.0.0.1:{port}/v2/models/digits/feedback",
                                 json={"id": f"req-{i}", "label": int(y[i])})
                assert fb.status_code == 200, fb.text
            assert set(seen) == {1, 2} and min(seen.values()) > 90  # ~50/50 split
            sticky = {_infer(client, port, X[:1], f"s-{i}", key="user-7")["model_version"]
                      for i in range(20)}
            assert len(sticky) == 1
            # Shifted traffic: inverted intensities.
            for i in range(0, 300, 50):
                _infer(client, port, 16.0 - X[i : i + 50], f"shift-{i}")
            metrics = client.get(f"http://127.0.0.1:{port}/metrics").text
        assert "edgefleet_outbox_depth" in metrics
        agent.agent.supervisor.core.flush(30)
        for _ in range(10):  # each heartbeat snapshots the arms and sends the outbox
            agent.wait_for("heartbeat")
            status = _fleet_json(cp, capsys, "experiments", "status", "--model", "digits")
            arms = {a["version"]: a for a in status["arms"]}
            drift = _fleet_json(cp, capsys, "drift", "--model", "digits")
            # Arm counts and drift reports may arrive in different outbox batches.
            if (arms[1]["requests"] + arms[2]["requests"] >= 300
                    and drift["fleet"] and drift["fleet"][0]["drifted_devices"]):
                break
        assert arms[1]["requests"] + arms[2]["requests"] >= 300
        assert arms[1]["labelled"] > 0 and arms[2]["labelled"] > 0
        assert 0.5 < arms[1]["accuracy"] <= 1.0
        assert drift["fleet"][0]["drifted_devices"] == 1
        assert drift["devices"][0]["device_id"] == cfg.device_id and drift["devices"][0]["drifted"]

        stopped = _fleet_json(cp, capsys, "experiments", "stop", "--model", "digits")
        assert stopped["state"] == "stopped"
        while agent.wait_for("models")["serial"] < 3:
            pass  # the release without the challenger
        arms = agent.agent.supervisor.core.stats()["models"]["digits"]["arms"]
        assert [(v, a["weight"]) for v, a in arms.items()] == [("1", 1.0)]
    finally:
        agent.stop()
    shutil.rmtree(tmp_path / "v1", ignore_errors=True)


def test_serving_continues_while_the_control_plane_is_down(
    cp: RunningControlPlane, tmp_path: Path, trained_bundle: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _publish(cp, trained_bundle, tmp_path, 1)
    cp.enroll_agent(tmp_path / "a")
    agent = start_agent(tmp_path / "a", cp.loop, probation_seconds=0.0)
    X = load_digits().data.astype(np.float32)
    try:
        port = agent.wait_for("serving")["http_port"]
        _fleet_json(cp, capsys, "rollouts", "start", "--model", "digits", "--version", "1")
        _wait_models(agent, _committed(1))
        cp.stop()
        agent.wait_for("error")  # the agent has noticed
        with httpx.Client(timeout=30) as client:
            for i in range(20):
                assert _infer(client, port, X[i : i + 1], f"r{i}")["model_version"] == "1"
    finally:
        agent.stop()
    # What was served meanwhile waits in the outbox for the control plane to come back.
    with Outbox(StateDir(tmp_path / "a").outbox) as box:
        stats = [json.loads(r.payload) for r in box.pending(1000) if r.kind == "arm_stats"]
    assert stats and stats[-1]["requests"] >= 20


def _send_arm_stats(cp: RunningControlPlane, state_dir: Path, seq: int,
                    stats: dict[int, tuple[int, int]]) -> None:
    records = [agent_pb2.TelemetryRecord(
        seq=seq + i, kind="arm_stats", created_at=float(seq + i),
        payload=encode({"model": "digits", "version": v, "requests": n, "errors": 0,
                        "p50_ms": 0.1, "p95_ms": 0.2, "labelled": n, "correct": c}))
        for i, (v, (c, n)) in enumerate(sorted(stats.items()))]
    with grpc.secure_channel(cp.api, device_credentials(state_dir)) as channel:
        agent_pb2_grpc.AgentServiceStub(channel).SendTelemetry(
            agent_pb2.TelemetryBatch(records=records), timeout=30)


@pytest.mark.parametrize(("challenger_correct", "verdict", "serving"),
                         [(291, "promote", 2), (255, "stop", 1)], ids=["better", "equal"])
def test_experiment_decides_by_its_test_once_enough_feedback_arrived(
    cp: RunningControlPlane, tmp_path: Path, trained_bundle: Path,
    capsys: pytest.CaptureFixture[str], challenger_correct: int, verdict: str, serving: int,
) -> None:
    _publish(cp, trained_bundle, tmp_path, 1, 2)
    cfg = cp.enroll_agent(tmp_path / "a")
    for other in ("b", "c"):  # the decision needs feedback from three devices (the default)
        cp.enroll_agent(tmp_path / other)
    _fleet_json(cp, capsys, "rollouts", "start", "--model", "digits", "--version", "1")
    _fleet_json(cp, capsys, "experiments", "start", "--model", "digits", "--challenger", "2",
                "--weight", "0.5")
    _send_arm_stats(cp, tmp_path / "a", 1, {1: (170, 200), 2: (180, 199)})  # too little
    status = _fleet_json(cp, capsys, "experiments", "status", "--model", "digits")
    assert status["decision"] == "wait" and status["state"] == "running"
    for device in ("a", "b", "c"):  # the same evidence, now from three devices
        _send_arm_stats(cp, tmp_path / device, 3,
                        {1: (85, 100), 2: (challenger_correct // 3, 100)})
    status = _fleet_json(cp, capsys, "experiments", "status", "--model", "digits")
    assert status["decision"] == verdict, status
    assert status["test"].startswith("one-sided two-proportion z-test")
    low, high = status["arms"][0]["accuracy_ci95"]
    assert low < 255 / 300 < high
    arms = cp.cp.store.device_arms(cfg.device_id)
    assert [(a.version, a.weight) for a in arms] == [(serving, 1.0)]
    assert cp.cp.store.list_audit(1)[0].action == f"experiments.{verdict}"
