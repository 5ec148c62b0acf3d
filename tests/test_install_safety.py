"""Installs that cannot hurt serving, crash loops and lost contact, probation judged on
served latency (issue 13): real control plane, real agents, real ONNX models, real sockets.

Slow models are real graphs (``tests/onnx_delay.py``: a Loop in front of the trained model).
Nothing here asserts on a duration: the hanging model never finishes, the slowed one is about
two hundred times slower than the model it wraps, and what happened when is read from the
order of events.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.install.lifecycle import InstallState
from fleet.cli import main as fleet_main
from tests.onnx_delay import HANG, delayed_bundle
from tests.support import WAIT, RunningAgent, RunningControlPlane, start_agent
from tests.test_delivery import _bundle_for, _committed, _wait_models
from trainer.bundle import sign_bundle

ROW = np.linspace(0.0, 16.0, 64).tolist()


def _fleet(cp: RunningControlPlane, *args: str) -> int:
    return fleet_main(["--config", str(cp.home / "operators/admin/fleet.toml"), "--api", cp.api,
                       *args])


def _publish(cp: RunningControlPlane, bundle: Path) -> None:
    sign_bundle(bundle, cp.home / "publisher" / "publisher.key")
    assert _fleet(cp, "models", "publish", str(bundle)) == 0


def _roll_out(cp: RunningControlPlane, version: int) -> None:
    assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", str(version)) == 0


def _infer(agent: RunningAgent) -> int:
    """One request to the agent's HTTP endpoint; the version that answered."""
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                   "data": ROW}]}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{agent.agent.http_port}/v2/models/digits/infer", data=body,
        headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 (local test server)
        assert resp.status == 200
        return int(json.loads(resp.read())["model_version"])


def _record(agent: RunningAgent, version: int) -> dict[str, Any]:
    return next(r for r in agent.agent.models.status() if r["version"] == version)


def _wait_install(agent: RunningAgent, version: int, states: set[str]) -> dict[str, Any]:
    while True:
        data = agent.wait_for("install")
        if data["version"] == version and data["state"] in states:
            return data


def _wait_serving(agent: RunningAgent, version: int) -> None:
    """Until a ``models`` event (sent once serving follows the store) shows ``version``."""
    _wait_models(agent, lambda ms: any(m["version"] == version and m["serving"] for m in ms))


def _reported(cp: RunningControlPlane, device_id: str, version: int) -> tuple[str, str]:
    model = next(m for m in cp.device(device_id).models if m.version == version)
    return model.state, model.reason


# ---------------------------------------------------------------------------- item 4
def test_hanging_model_fails_its_install_while_serving_goes_on(
    cp: RunningControlPlane, tmp_path: Path, trained_bundle: Path
) -> None:
    """A signed model whose graph never finishes: its smoke test is stopped at the manifest's
    time limit, it fails its install with that reason, and the current model answers every
    request sent meanwhile (before, the install froze the event loop that serves)."""
    _publish(cp, _bundle_for(cp, trained_bundle, tmp_path / "v1", version=1))
    _publish(cp, delayed_bundle(trained_bundle, tmp_path / "v2", 2, HANG, timeout_seconds=2))
    config = cp.enroll_agent(tmp_path / "a")
    timeline: list[tuple[str, Any]] = []  # install steps and answers, in the order they happened
    lock = threading.Lock()

    def observe(kind: str, data: dict[str, Any]) -> None:
        if kind == "install" and data["version"] == 2:
            with lock:
                timeline.append(("install", data["state"]))

    agent = start_agent(tmp_path / "a", cp.loop, observe=observe, probation_seconds=0.0)
    stop = threading.Event()
    answers: list[int] = []

    def client() -> None:
        while not stop.is_set():
            version = _infer(agent)
            with lock:
                answers.append(version)
                timeline.append(("answer", version))

    worker = threading.Thread(target=client)
    try:
        _roll_out(cp, 1)
        _wait_models(agent, _committed(1))
        worker.start()
        _roll_out(cp, 2)
        failed = _wait_install(agent, 2, {"failed", "active"})
        stop.set()
        worker.join(30)
        assert failed["state"] == "failed"
        assert "smoke test failed" in failed["reason"]
        assert "time limit of 2 s" in failed["reason"] and "(the model was stopped)" in (
            failed["reason"])
        steps = [what for kind, what in timeline if kind == "install"]
        assert steps == ["downloading", "verifying", "staged", "smoke-testing", "failed"]
        start = timeline.index(("install", "smoke-testing"))
        end = timeline.index(("install", "failed"))
        during = [what for kind, what in timeline[start:end] if kind == "answer"]
        assert len(during) >= 3, timeline  # answered while the model hung in its smoke test
        assert set(answers) == {1}  # every request was answered, by v1
        assert agent.agent.models.active("digits")[0] == 1  # type: ignore[index]
        assert not agent.agent.models.version_dir("digits", 2).exists()  # never served
        agent.wait_for("heartbeat")
        agent.wait_for("heartbeat")
        state, reason = _reported(cp, config.device_id, 2)
        assert state == "failed" and "time limit" in reason
    finally:
        stop.set()
        agent.stop()


# ---------------------------------------------------------------------------- item 5
def test_agent_restarting_while_on_probation_rolls_back_and_reports_why(
    cp: RunningControlPlane, tmp_path: Path, trained_bundle: Path
) -> None:
    for version in (1, 2):
        _publish(cp, _bundle_for(cp, trained_bundle, tmp_path / f"v{version}",
                                 version=version))
    config = cp.enroll_agent(tmp_path / "a")
    agent = start_agent(tmp_path / "a", cp.loop, probation_seconds=0.0)
    _roll_out(cp, 1)
    _wait_models(agent, _committed(1))
    agent.stop()
    quiet: dict[str, Any] = {"probation_seconds": 3600.0, "probation_max_restarts": 3}
    agent = start_agent(tmp_path / "a", cp.loop, None, **quiet)  # no traffic: it waits
    try:
        _roll_out(cp, 2)
        _wait_serving(agent, 2)
        for _ in range(5):
            assert _infer(agent) == 2
    finally:
        agent.stop()
    for restart in (1, 2):  # the version might be what brings the agent down
        agent = start_agent(tmp_path / "a", cp.loop, None, **quiet)
        try:
            version, probation = agent.agent.updater.probation["digits"]
            assert (version, probation.restarts) == (2, restart)
            assert probation.requests == 5  # its probation goes on where it was
            assert _record(agent, 2)["state"] == "active"
        finally:
            agent.stop()
    agent = start_agent(tmp_path / "a", cp.loop, None, **quiet)  # the third restart
    try:
        assert agent.agent.models.active("digits")[0] == 1  # type: ignore[index]
        rec = _record(agent, 2)
        assert rec["state"] == "rolled-back"
        assert "restarted 3 times" in rec["reason"] and "crash loop" in rec["reason"]
        # The release still names v2: it is not installed again over the rollback.
        agent.wait_for("models")
        assert _record(agent, 2)["state"] == "rolled-back"
        assert _infer(agent) == 1
        agent.wait_for("heartbeat")
        state, reason = _reported(cp, config.device_id, 2)
        assert state == "rolled-back" and "crash loop" in reason
    finally:
        agent.stop()


def test_version_activated_without_contact_commits_only_once_reported(
    cp: RunningControlPlane, tmp_path: Path, trained_bundle: Path
) -> None:
    """probation_seconds = 0: healthy at once, yet it stays on probation while the control
    plane is down (the device activated it just as contact was lost); it commits once a
    heartbeat reply has acknowledged the report."""
    for version in (1, 2):
        _publish(cp, _bundle_for(cp, trained_bundle, tmp_path / f"v{version}",
                                 version=version))
    config = cp.enroll_agent(tmp_path / "a")

    stopping: list[concurrent.futures.Future[None]] = []

    def observe(kind: str, data: dict[str, Any]) -> None:
        if (kind == "install" and data["version"] == 2 and data["state"] == "smoke-testing"
                and not stopping):
            # Downloaded, not yet reported: contact is lost now. The stop starts here and is
            # not waited for: this install step holds the agent's install lock, and the
            # control plane stops on the agent's event loop (waiting would deadlock them).
            stopping.append(asyncio.run_coroutine_threadsafe(cp.cp.stop(grace_seconds=0.5),
                                                             cp.loop.loop))

    agent = start_agent(tmp_path / "a", cp.loop, observe=observe, probation_seconds=0.0)
    try:
        _roll_out(cp, 1)
        _wait_models(agent, _committed(1))
        _roll_out(cp, 2)
        _wait_serving(agent, 2)
        stopping[0].result(WAIT)
        for _ in range(3):
            agent.wait_for("error")  # heartbeats that got no reply
        assert agent.agent.models.active("digits")[0] == 2  # type: ignore[index]
        assert _record(agent, 2)["state"] == InstallState.ACTIVE
        probation = agent.agent.updater.probation["digits"][1]
        assert not probation.acknowledged
        assert "waiting for the control plane to acknowledge" in probation.reason
        cp.restart()
        _wait_models(agent, _committed(2))
        agent.wait_for("heartbeat")
        assert _reported(cp, config.device_id, 2)[0] == "committed"
    finally:
        agent.stop()


# ---------------------------------------------------------------------------- item 6
def test_probation_compares_served_latency_with_served_latency(
    cp: RunningControlPlane, tmp_path: Path, trained_bundle: Path
) -> None:
    """v2 (the same model) serves like v1 did and is committed; v3 (the same model behind a
    2,000-step loop) is rolled back for its served p95 against v2's served p95."""
    for version in (1, 2):
        _publish(cp, _bundle_for(cp, trained_bundle, tmp_path / f"v{version}",
                                 version=version))
    _publish(cp, delayed_bundle(trained_bundle, tmp_path / "v3", 3, 2000))
    cp.enroll_agent(tmp_path / "a")
    agent = start_agent(tmp_path / "a", cp.loop, probation_seconds=3600.0)
    min_requests = agent.agent.updater.policy.min_requests
    try:
        _roll_out(cp, 1)
        _wait_serving(agent, 1)
        for _ in range(300):
            assert _infer(agent) == 1
        _wait_models(agent, _committed(1))
        for _ in range(300):  # v1 serves on, committed
            _infer(agent)

        _roll_out(cp, 2)
        _wait_serving(agent, 2)
        v1 = _record(agent, 1)
        assert v1["served_requests"] >= 300 and v1["served_p95_s"] > 0
        baseline = agent.agent.updater.probation["digits"][1].baseline_p95_s
        assert baseline == v1["served_p95_s"]  # what v1 served, not its smoke batch
        for _ in range(300):
            assert _infer(agent) == 2
        models = _wait_models(agent, lambda ms: any(
            m["version"] == 2 and m["state"] in {"committed", "rolled-back"} for m in ms))
        assert next(m for m in models if m["version"] == 2)["state"] == "committed", models

        _roll_out(cp, 3)
        _wait_serving(agent, 3)
        for _ in range(min_requests + 10):
            _infer(agent)
        rolled = _wait_install(agent, 3, {"rolled-back", "committed"})
        assert rolled["state"] == "rolled-back", rolled
        assert "served p95 latency" in rolled["reason"]
        assert "the previous version's served p95" in rolled["reason"]
        assert agent.agent.models.active("digits")[0] == 2  # type: ignore[index]
    finally:
        agent.stop()

