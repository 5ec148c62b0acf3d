"""Staged rollouts on real agents: steps, gates, failure policies, restarts, abort, supersede."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from control_plane.domain.records import RolloutRecord
from fleet import models as fleet_models
from fleet.cli import main as fleet_main
from tests.support import LoopThread, RunningAgent, RunningControlPlane, start_agent
from tests.support import start_control_plane as _start_cp
from tests.test_delivery import _bundle_for, _committed, _wait_models
from trainer.bundle import sign_bundle


@pytest.fixture
def fleet(tmp_path: Path, loop: LoopThread, trained_bundle: Path):
    cp = _start_cp(tmp_path / "cp", loop, rollout_tick_seconds=0.2,
                   rollout_device_timeout_seconds=30.0)
    for version in (1, 2):
        bundle = _bundle_for(cp, trained_bundle, tmp_path / f"v{version}", version=version)
        assert _fleet(cp, "models", "publish", str(bundle)) == 0
    agents = []
    for i in range(4):
        cp.enroll_agent(tmp_path / f"a{i}", labels={"site": "shop"})
        agents.append(start_agent(tmp_path / f"a{i}", cp.loop, probation_seconds=0.0))
    assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "1") == 0
    for agent in agents:
        _wait_models(agent, _committed(1))
    _wait_rollout(cp, agents, lambda r: r.state == "completed")
    yield cp, agents
    for agent in agents:
        agent.stop()
    cp.stop()


def _fleet(cp: RunningControlPlane, *args: str) -> int:
    return fleet_main(["--config", str(cp.home / "operators/admin/fleet.toml"), "--api", cp.api,
                       *args])


def _wait_rollout(cp: RunningControlPlane, agents: list[RunningAgent],
                  done: Callable[[RolloutRecord], bool]) -> RolloutRecord:
    """Wait heartbeat by heartbeat (reports arrive with them) until the rollout satisfies done."""
    for _ in range(60):
        rollout = cp.cp.store.get_rollout("digits")
        if rollout is not None and done(rollout):
            return rollout
        agents[0].wait_for("heartbeat")
    raise AssertionError(f"rollout never got there: {cp.cp.store.get_rollout('digits')}")


def _arm_versions(cp: RunningControlPlane) -> dict[str, list[int]]:
    return {d.id: [a.version for a in cp.cp.store.device_arms(d.id)]
            for d in cp.cp.store.list_devices()}


def test_rollout_passes_its_steps_on_healthy_agents(fleet, monkeypatch, capsys) -> None:
    cp, agents = fleet
    monkeypatch.setattr(fleet_models, "WAIT_POLL_SECONDS", 0.05)
    seen: list[list[int]] = []
    real_get = fleet_models._wait_rollout

    def spy(stub, r, timeout):  # the arms right after start: one canary of four
        seen.append(sorted(v for vs in _arm_versions(cp).values() for v in vs))
        return real_get(stub, r, timeout)

    monkeypatch.setattr(fleet_models, "_wait_rollout", spy)
    capsys.readouterr()
    assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "2",
                  "--steps", "25,50,100", "--wait") == 0  # returns once it has completed
    assert seen == [[1, 1, 1, 2]]
    assert "(completed)" in capsys.readouterr().out
    done = _wait_rollout(cp, agents, lambda r: r.state == "completed")
    assert [h.split(":")[0] for h in done.history if "passed" in h] == [
        "step 1 (25%, 1 devices) passed", "step 2 (50%, 2 devices) passed",
        "step 3 (100%, 4 devices) passed"]
    assert all(v == [2] for v in _arm_versions(cp).values())
    assert all(a.agent.models.active("digits")[0] == 2 for a in agents)


def test_failing_gate_rolls_the_canary_back(fleet, tmp_path: Path) -> None:
    cp, agents = fleet
    # v3 fails its smoke test on the device: an install failure in the first step.
    bad = tmp_path / "v3"
    src = tmp_path / "v1"
    bad.mkdir()
    for f in src.iterdir():
        if f.name != "model.sig":
            (bad / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["version"] = 3
    manifest["smoke_test"]["expected"] = [[0.5] * len(row)
                                          for row in manifest["smoke_test"]["expected"]]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    sign_bundle(bad, cp.home / "publisher" / "publisher.key")
    assert _fleet(cp, "models", "publish", str(bad)) == 0
    assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "3",
                  "--steps", "25,100", "--on-failure", "rollback") == 0
    done = _wait_rollout(cp, agents, lambda r: r.state != "running")
    assert done.state == "rolled-back", done
    assert "install_failures" in done.reason
    assert all(v == [1] for v in _arm_versions(cp).values())  # nobody left on v3


def test_gate_without_enough_samples_does_not_pass(fleet, monkeypatch, capsys) -> None:
    cp, agents = fleet
    monkeypatch.setattr(fleet_models, "WAIT_POLL_SECONDS", 0.05)
    assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "2",
                  "--steps", "50,100", "--gate", "error_rate<0.05") == 0
    capsys.readouterr()
    assert _fleet(cp, "rollouts", "status", "--model", "digits", "--wait") == 1
    err = capsys.readouterr().err
    assert "ended paused" in err and "fleet rollouts resume" in err  # says what to do next
    done = _wait_rollout(cp, agents, lambda r: r.state != "running")
    assert done.state == "paused" and "not enough data" in done.reason
    assert sorted(v for vs in _arm_versions(cp).values() for v in vs) == [1, 1, 2, 2]
    # An operator can take it from there: abort puts the canary back.
    assert _fleet(cp, "rollouts", "abort", "--model", "digits") == 0
    assert all(v == [1] for v in _arm_versions(cp).values())
    assert cp.cp.store.get_rollout("digits").state == "aborted"


def test_restart_mid_rollout_resumes_it(fleet) -> None:
    cp, agents = fleet
    assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "2",
                  "--steps", "25,100", "--bake", "1") == 0
    _wait_rollout(cp, agents, lambda r: r.step == 1)  # the second step has begun
    cp.restart()
    done = _wait_rollout(cp, agents, lambda r: r.state == "completed")
    assert done.version == 2 and all(v == [2] for v in _arm_versions(cp).values())


def test_superseded_rollout_leaves_no_device_in_between(fleet) -> None:
    cp, _ = fleet
    assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "2",
                  "--steps", "25,100", "--bake", "3600") == 0
    assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "1") == 0
    rollouts = cp.cp.store._query(
        "SELECT version, state FROM rollouts ORDER BY id")
    old, new = [(r["version"], r["state"]) for r in rollouts][-2:]
    assert old == (2, "superseded")
    # v1 may already be done: every device but the canary still had it committed.
    assert new in ((1, "running"), (1, "completed"))
    assert all(v == [1] for v in _arm_versions(cp).values())


def test_control_plane_restored_from_an_older_backup_issues_serials_agents_accept(
    fleet, tmp_path: Path
) -> None:
    """Agents refuse a release serial at or below the one they hold (rollback protection);
    a control plane restored from an older backup must not strand them."""
    cp, agents = fleet
    backup = tmp_path / "backup.db"
    with sqlite3.connect(cp.home / "edgefleet.db") as live, sqlite3.connect(backup) as copy:
        live.backup(copy)  # SQLite's online backup, as the operator guide says
    held = agents[0].agent.trust.mark.serial
    assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "2") == 0
    _wait_rollout(cp, agents, lambda r: r.state == "completed")
    newer = agents[0].agent.trust.mark.serial
    assert newer > held
    cp.stop()
    for suffix in ("", "-wal", "-shm"):
        (cp.home / f"edgefleet.db{suffix}").unlink(missing_ok=True)
    shutil.copyfile(backup, cp.home / "edgefleet.db")
    cp.restart()  # believes v1 is rolled out and that each device's serial is `held`
    assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "2") == 0
    # Releases the agent accepts, above what it held: the restored control plane may first
    # re-issue what its backup believed (v1) at a new serial, then the v2 rollout's.
    for agent in agents:
        while not (agent.wait_for("models")["serial"] > newer
                   and agent.agent.models.active("digits")[0] == 2):
            pass
    assert all(a.agent.trust.mark.serial > newer for a in agents)
    assert all(a.agent.models.active("digits")[0] == 2 for a in agents)
