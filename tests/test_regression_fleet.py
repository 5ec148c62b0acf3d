"""A regression model through the loop with real parts: a control plane, agents that install
and serve it (HTTP and gRPC, answers equal to scikit-learn's), numeric feedback that reaches
the control plane's arm statistics, a staged rollout judged by the mae_delta gate, and an
experiment decided by the error test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from edgefleet.v1 import grpc_predict_v2_pb2 as pb
from edgefleet.v1 import grpc_predict_v2_pb2_grpc as pb_grpc

from control_plane.domain.records import RolloutRecord
from control_plane.domain.rollout_plan import step_devices
from fleet.cli import main as fleet_main
from tests.regression_support import RegressionBundle, regression_bundle
from tests.support import (
    LoopThread,
    RunningAgent,
    RunningControlPlane,
    fleet_json,
    start_agent,
    start_control_plane,
)

MODEL = "diabetes"


_fleet = fleet_json


def _fleet_rc(cp: RunningControlPlane, *args: str) -> int:
    return fleet_main(["--config", str(cp.home / "operators/admin/fleet.toml"), "--api", cp.api,
                       *args])


def _publish(cp: RunningControlPlane, capsys: pytest.CaptureFixture[str], out: Path,
             version: int, **model: Any) -> RegressionBundle:
    bundle = regression_bundle(out / f"v{version}", cp.home / "publisher" / "publisher.key",
                               name=MODEL, version=version, **model)
    _fleet(cp, capsys, "models", "publish", str(bundle.path))
    return bundle


def _serving(version: int) -> Callable[[list[dict[str, Any]]], bool]:
    def check(models: list[dict[str, Any]]) -> bool:
        return any(m["name"] == MODEL and m["serving"] and m["version"] == version
                   and m["state"] == "committed" for m in models)
    return check


def _wait_models(agent: RunningAgent, predicate: Callable[[list[dict[str, Any]]], bool]) -> None:
    while not predicate(agent.wait_for("models")["models"]):
        pass


def _label_traffic(port: int, bundle: RegressionBundle, prefix: str,
                   repeat: int = 1) -> list[str]:
    """Send every held-out row (one request each, with an id) and its true target."""
    versions = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        for r in range(repeat):
            for i, row in enumerate(bundle.X_test):
                rid = f"{prefix}-{r}-{i}"
                body = {"id": rid, "parameters": {"routing_key": rid}, "inputs": [
                    {"name": "input", "shape": [1, len(row)], "datatype": "FP32",
                     "data": row.tolist()}]}
                answer = client.post(f"/v2/models/{MODEL}/infer", json=body)
                assert answer.status_code == 200, answer.text
                versions.append(answer.json()["model_version"])
                fb = client.post(f"/v2/models/{MODEL}/feedback",
                                 json={"id": rid, "label": float(bundle.y_test[i])})
                assert fb.status_code == 200, fb.text
    return versions


def _wait_labelled(cp: RunningControlPlane, agent: RunningAgent, device_id: str, version: int,
                   labelled: int) -> None:
    """Heartbeat by heartbeat until the control plane holds the device's labelled count."""
    agent.agent.supervisor.core.flush(30)
    for _ in range(60):
        rows = [s for s in cp.cp.store.arm_stats(MODEL)
                if s.device_id == device_id and s.version == version]
        if rows and rows[0].labelled >= labelled:
            return
        agent.wait_for("heartbeat")
    raise AssertionError(f"{device_id} v{version} never reached {labelled} labelled rows")


def _wait_reported(cp: RunningControlPlane, agent: RunningAgent, device_id: str,
                   version: int) -> None:
    """Until the control plane has heard that the device committed ``version``."""
    for _ in range(60):
        device = cp.cp.store.get_device(device_id)
        if device is not None and any(m.name == MODEL and m.version == version
                                      and m.state == "committed" for m in device.models):
            return
        agent.wait_for("heartbeat")
    raise AssertionError(f"{device_id} never reported v{version} committed")


def test_regression_model_is_served_and_its_feedback_reaches_the_fleet(
        cp: RunningControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _publish(cp, capsys, tmp_path, 1)
    cfg = cp.enroll_agent(tmp_path / "a")
    agent = start_agent(tmp_path / "a", cp.loop, probation_seconds=0.0,
                        drift_window_requests=50)
    try:
        events = agent.wait_for("serving")
        _fleet(cp, capsys, "rollouts", "start", "--model", MODEL, "--version", "1")
        _wait_models(agent, _serving(1))
        expected = good.model.predict(good.X_test)
        with httpx.Client(timeout=30) as client:
            body = {"inputs": [{"name": "input", "shape": list(good.X_test.shape),
                                "datatype": "FP32", "data": good.X_test.ravel().tolist()}]}
            answer = client.post(f"http://127.0.0.1:{events['http_port']}/v2/models/{MODEL}"
                                 "/infer", json=body).json()
        out = answer["outputs"][0]
        assert (out["name"], out["shape"]) == ("prediction", [len(expected), 1])
        np.testing.assert_allclose(out["data"], expected, rtol=1e-5, atol=1e-3)
        with grpc.insecure_channel(f"127.0.0.1:{events['grpc_port']}") as channel:
            request = pb.ModelInferRequest(model_name=MODEL)
            request.inputs.add(name="input", datatype="FP32", shape=list(good.X_test.shape))
            request.raw_input_contents.append(good.X_test.astype("<f4").tobytes())
            reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        assert list(reply.outputs[0].shape) == [len(expected), 1]
        np.testing.assert_allclose(np.frombuffer(reply.raw_output_contents[0], "<f4"),
                                   expected, rtol=1e-5, atol=1e-3)

        _label_traffic(events["http_port"], good, "fb")
        _wait_labelled(cp, agent, cfg.device_id, 1, len(good.y_test))
        (row,) = [s for s in cp.cp.store.arm_stats(MODEL) if s.device_id == cfg.device_id]
        errors = np.abs(expected.astype(np.float32) - good.y_test)
        assert row.correct == 0 and row.labelled == len(errors)
        assert row.abs_error_sum == pytest.approx(errors.sum(), rel=1e-5)
        assert row.sq_error_sum == pytest.approx((errors**2).sum(), rel=1e-5)
        assert cp.cp.store.report_refusals(cfg.device_id) == {}
        models = _fleet(cp, capsys, "models", "show", MODEL)
        assert models[0]["summary"]["task"] == "regression"
        drift = _fleet(cp, capsys, "drift", "--model", MODEL)  # windows of 50 predictions
        assert drift["devices"] and drift["devices"][0]["prediction_psi"] >= 0
    finally:
        agent.stop()


@pytest.fixture
def shop(tmp_path: Path, loop: LoopThread,
         capsys: pytest.CaptureFixture[str]) -> Iterator[tuple[RunningControlPlane,
                                                                list[RunningAgent], list[str]]]:
    """A control plane whose rollouts advance only when the test ticks them, and two agents
    serving diabetes v1."""
    cp = start_control_plane(tmp_path / "cp", loop, rollout_tick_seconds=3600.0,
                             rollout_device_timeout_seconds=600.0)
    agents, ids = [], []
    for i in range(2):
        ids.append(cp.enroll_agent(tmp_path / f"a{i}").device_id)
        agents.append(start_agent(tmp_path / f"a{i}", cp.loop, probation_seconds=0.0))
    yield cp, agents, ids
    for agent in agents:
        agent.stop()
    cp.stop()


def _tick(cp: RunningControlPlane) -> RolloutRecord:
    async def tick() -> None:
        cp.cp.services.rollouts.tick()

    cp.loop.run(tick())
    rollout = cp.cp.store.get_rollout(MODEL)
    assert rollout is not None
    return rollout


def test_staged_rollout_is_judged_by_the_mae_gate(
        shop: tuple[RunningControlPlane, list[RunningAgent], list[str]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    cp, agents, ids = shop
    v1 = _publish(cp, capsys, tmp_path, 1, alpha=1.0)  # underfit: the worse of the two
    v2 = _publish(cp, capsys, tmp_path, 2, alpha=0.1)
    v3 = _publish(cp, capsys, tmp_path, 3, alpha=0.1, shift=60.0)  # biased: clearly worse
    ports = [a.wait_for("serving")["http_port"] for a in agents]
    _fleet(cp, capsys, "rollouts", "start", "--model", MODEL, "--version", "1")
    for agent, device_id in zip(agents, ids, strict=True):
        _wait_reported(cp, agent, device_id, 1)
    assert _tick(cp).state == "completed"
    canary = step_devices(MODEL, ids, [50, 100], 0)
    assert len(canary) == 1
    k = ids.index(canary[0])
    # The canary's v1 answers on the held-out rows: what its next version is compared with.
    _label_traffic(ports[k], v1, "v1")
    _wait_labelled(cp, agents[k], ids[k], 1, len(v1.y_test))

    mae = {v: float(np.abs(b.model.predict(b.X_test) - b.y_test).mean())
           for v, b in ((1, v1), (2, v2), (3, v3))}
    assert mae[2] < mae[1] < mae[3]
    capsys.readouterr()  # a gate of the other task is refused up front
    assert _fleet_rc(cp, "rollouts", "start", "--model", MODEL, "--version", "2",
                     "--gate", "accuracy_delta>=0") == 1
    assert "use mae_delta" in capsys.readouterr().err
    _fleet(cp, capsys, "rollouts", "start", "--model", MODEL, "--version", "2", "--steps",
           "50,100", "--gate", "mae_delta<=0")
    _wait_reported(cp, agents[k], ids[k], 2)
    rollout = _tick(cp)  # no v2 feedback yet: the gate cannot pass
    assert rollout.state == "paused" and "not enough data" in rollout.reason, rollout
    _fleet(cp, capsys, "rollouts", "resume", "--model", MODEL)
    _label_traffic(ports[k], v2, "v2")
    _wait_labelled(cp, agents[k], ids[k], 2, len(v2.y_test))
    rollout = _tick(cp)
    assert rollout.step == 1 and rollout.state == "running", rollout
    passed = next(h for h in rollout.history if h.startswith("step 1") and "passed" in h)
    delta = float(passed.split("mae_delta = ")[1].split()[0])
    assert delta == pytest.approx(mae[2] - mae[1], rel=1e-3)  # the same rows, both versions
    _wait_reported(cp, agents[1 - k], ids[1 - k], 2)
    assert _tick(cp).state == "completed"
    view = _fleet(cp, capsys, "rollouts", "status", "--model", MODEL)
    assert view["task"] == "regression"
    quality = {q["version"]: q for q in view["quality"]}
    for version in (1, 2):
        assert quality[version]["labelled"] == len(v1.y_test)
        assert quality[version]["mae"] == pytest.approx(mae[version], rel=1e-3)
        low, high = quality[version]["mae_ci95"]
        assert low < quality[version]["mae"] < high
    capsys.readouterr()
    assert _fleet_rc(cp, "rollouts", "status", "--model", MODEL) == 0
    printed = capsys.readouterr().out
    assert "v2: MAE " in printed and "v1: MAE " in printed and "95% CI" in printed

    # v3 answers 60 too high: its canary step fails the gate and rolls back to v2.
    _fleet(cp, capsys, "rollouts", "start", "--model", MODEL, "--version", "3", "--steps",
           "50,100", "--gate", "mae_delta<=0", "--on-failure", "rollback")
    _wait_reported(cp, agents[k], ids[k], 3)
    _label_traffic(ports[k], v3, "v3")
    _wait_labelled(cp, agents[k], ids[k], 3, len(v3.y_test))
    rollout = _tick(cp)
    assert rollout.state == "rolled-back", rollout
    assert "mae_delta" in rollout.reason and "fails" in rollout.reason
    _wait_models(agents[k], _serving(2))
    assert all([a.version for a in cp.cp.store.device_arms(d)] == [2] for d in ids)


def test_experiment_between_regression_versions_is_decided_by_the_error_test(
        tmp_path: Path, loop: LoopThread, capsys: pytest.CaptureFixture[str]) -> None:
    cp = start_control_plane(tmp_path / "cp", loop, experiment_min_samples=120)
    agents, ids = [], []
    try:
        worse = _publish(cp, capsys, tmp_path, 1, shift=40.0)
        better = _publish(cp, capsys, tmp_path, 2)
        for i in range(3):  # the decision needs feedback from three devices (the default)
            ids.append(cp.enroll_agent(tmp_path / f"a{i}").device_id)
            agents.append(start_agent(tmp_path / f"a{i}", cp.loop, probation_seconds=0.0))
        ports = [a.wait_for("serving")["http_port"] for a in agents]
        _fleet(cp, capsys, "rollouts", "start", "--model", MODEL, "--version", "1")
        for agent in agents:
            _wait_models(agent, _serving(1))
        started = _fleet(cp, capsys, "experiments", "start", "--model", MODEL,
                         "--challenger", "2", "--weight", "0.5")
        assert started["task"] == "regression" and started["decision"] == "wait"
        for agent in agents:
            while agent.wait_for("models")["serial"] < 2:
                pass  # the experiment's release: both arms served
        for k, agent in enumerate(agents):
            versions = _label_traffic(ports[k], worse, f"e{k}", repeat=3)
            assert k > 0 or set(versions) == {"1", "2"}  # (later: maybe promoted already)
            agent.agent.supervisor.core.flush(30)
        status: dict[str, Any] = {}
        for _ in range(60):
            status = _fleet(cp, capsys, "experiments", "status", "--model", MODEL)
            if status["decision"] != "wait":
                break
            agents[0].wait_for("heartbeat")
        assert status["decision"] == "promote", status
        assert status["test"].startswith("one-sided Welch's t-test on absolute errors")
        arms = {a["version"]: a for a in status["arms"]}
        for version, bundle in ((1, worse), (2, better)):
            true_mae = float(np.abs(bundle.model.predict(bundle.X_test) - bundle.y_test).mean())
            low, high = arms[version]["mae_ci95"]
            assert low < arms[version]["mae"] < high and "accuracy" not in arms[version]
            assert abs(arms[version]["mae"] - true_mae) < 0.35 * true_mae
        assert arms[2]["mae"] < arms[1]["mae"]
        capsys.readouterr()
        assert fleet_main(["--config", str(cp.home / "operators/admin/fleet.toml"), "--api",
                           cp.api, "experiments", "status", "--model", MODEL]) == 0
        table = capsys.readouterr().out
        assert "MAE" in table and "ACCURACY" not in table
        assert all([a.version for a in cp.cp.store.device_arms(d)] == [2] for d in ids)
    finally:
        for agent in agents:
            agent.stop()
        cp.stop()


def _arm(version: int, labelled: int, abs_sum: float, sq_sum: float,
         **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "version": version, "shadow": False, "requests": 1000, "errors": 0,
            "p50_ms": 1.0, "p95_ms": 2.0, "labelled": labelled, "correct": 0,
            "abs_error_sum": abs_sum, "sq_error_sum": sq_sum, **extra}


def test_hostile_regression_reports_are_refused_and_counted_per_device(
        cp: RunningControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_hostile_device import _send  # noqa: PLC0415

    _publish(cp, capsys, tmp_path, 1)
    _publish(cp, capsys, tmp_path, 2, shift=10.0)
    evil = cp.enroll_agent(tmp_path / "evil").device_id
    _fleet(cp, capsys, "rollouts", "start", "--model", MODEL, "--version", "1")
    _fleet(cp, capsys, "experiments", "start", "--model", MODEL, "--challenger", "2",
           "--weight", "0.5")
    _send(cp, tmp_path / "evil", "arm_stats",
          _arm(2, 10, 30.0, 10.0),  # sum e^2 below (sum|e|)^2 / n
          _arm(2, 10, 30.0, 1000.0),  # sum e^2 above (sum|e|)^2
          _arm(2, 10, -1.0, 1.0),
          _arm(2, 0, 5.0, 25.0),  # errors without labels
          _arm(2, 10, 1e160, 1e300),  # beyond any label
          _arm(2, 10, 30.0, 100.0, correct=10))  # right answers from a regression arm
    assert cp.cp.store.arm_stats(MODEL) == []
    status = _fleet(cp, capsys, "experiments", "status", "--model", MODEL)
    assert status["decision"] == "wait" and status["arms"][0]["mae"] is None
    device = _fleet(cp, capsys, "devices", "show", evil)
    assert device["refused_reports"] == {"arm_stats/malformed": 6}
    _send(cp, tmp_path / "evil", "arm_stats", _arm(2, 10, 30.0, 100.0), seq=10)  # consistent
    (row,) = cp.cp.store.arm_stats(MODEL)
    assert (row.labelled, row.abs_error_sum, row.sq_error_sum) == (10, 30.0, 100.0)
    status = _fleet(cp, capsys, "experiments", "status", "--model", MODEL)
    assert status["arms"][1]["mae"] == pytest.approx(3.0)
