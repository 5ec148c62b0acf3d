"""Three control-plane replicas on one real PostgreSQL database: issue 18's "done when" as one
story, and the audit chain under appends from all three at once (docs/architecture.md,
"Several replicas: three replicas, one story").

The story: replica A (a `control-plane serve` process) leads the scheduler; B and C (in-process
``ControlPlane`` objects on copies of A's home) serve agents pinned to them; a real `edge-agent
run` process enrolled with all three addresses talks to A. A rollout started on A reaches the
agents on B and C; then a staged rollout is SIGKILLed in its second step together with A: the
scheduler moves to B or C within seconds and no step runs twice, the agent process moves to a
survivor and its outbox arrives exactly once, every device ends on the new version (what the
agents run is what the control plane records), and `fleet audit verify` passes.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from edgefleet.v1 import admin_pb2, admin_pb2_grpc

from control_plane.config import ControlPlaneConfig
from control_plane.domain.rollout_plan import step_devices
from control_plane.ops.home import init_home
from control_plane.server import ControlPlane
from edge_agent.cli import main as agent_main
from edge_agent.enroll import enroll
from edge_agent.reporting.outbox import Outbox
from edge_agent.state import AgentConfig, StateDir
from fleet.channel import open_channel
from fleet.cli import main as fleet_main
from fleetcore import operator_config
from tests.mqtt_support import free_port
from tests.store_support import pg_database
from tests.support import (
    WAIT,
    LoopThread,
    RunningAgent,
    RunningControlPlane,
    start_agent,
    start_control_plane,
    wait_until,
)
from tests.test_cli import Proc
from tests.test_delivery import _committed, _wait_models
from tests.test_telemetry import _drift_payload
from trainer.bundle import sign_bundle

__all__ = ["pg_database"]  # fixtures (tests/store_support.py)

TICK = 0.3  # the scheduler's tick on every replica (seconds)


def _fleet_json(home: Path, api: str, capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    """``fleet ARGS --json`` as the home's admin against the replica at ``api``."""
    capsys.readouterr()
    rc = fleet_main(["--config", str(home / "operators/admin/fleet.toml"), "--api", api, *args,
                     "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


def _signed(home: Path, source: Path, dest: Path, version: int) -> Path:
    """A copy of the trained bundle as ``version``, signed by the home's publisher key."""
    shutil.copytree(source, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["version"] = version
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    sign_bundle(dest, home / "publisher" / "publisher.key")
    return dest


def _agent_models(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    """What `edge-agent status --json` says the agent in ``state_dir`` has installed."""
    capsys.readouterr()
    assert agent_main(["status", "--state-dir", str(state_dir), "--json"]) == 0
    models: list[dict[str, Any]] = json.loads(capsys.readouterr().out)["models"]
    return models


def _in_process_replica(source: Path, home: Path, api: str,
                        loop: LoopThread) -> RunningControlPlane:
    """A replica on a copy of ``source`` (same database, same keys, its own blob cache), serving
    its API on ``api`` (one of the addresses enrollment hands out)."""
    shutil.copytree(source, home)
    cfg = ControlPlaneConfig.load(home)
    cfg.api_listen, cfg.enroll_listen = api, "127.0.0.1:0"
    cp = ControlPlane(cfg)
    loop.run(cp.start())
    admin = operator_config.load(home / "operators" / "admin" / "fleet.toml")
    return RunningControlPlane(home=home, cp=cp, loop=loop, admin=admin)


def _drift_seqs(cp: RunningControlPlane, device_id: str) -> list[int]:
    return [r.seq for r in cp.cp.store.telemetry_records(device_id) if r.kind == "drift"]


def _wait_stream(replica: RunningControlPlane, device_id: str) -> None:
    wait_until(lambda: replica.cp.notifier.subscribers(device_id) == 1,
               what=f"{device_id}'s Sync stream on {replica.api}")


def _append_drift(outbox: Path, numbers: range) -> None:
    """Records appended to a running agent's outbox (its SQLite file, as the agent does)."""
    with Outbox(outbox) as box:
        for i in numbers:
            box.append("drift", _drift_payload(i), now=float(i))


def _assert_every_device_on(cp: RunningControlPlane, devices: dict[str, str], version: int,
                            agents_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each device (state directory name -> id) is assigned ``version`` of digits alone, reports
    it committed and serving, and its agent serves the bundle published as that version."""
    published = cp.cp.store.get_model_version("digits", version)
    assert published is not None
    for name, device_id in devices.items():
        arms = cp.cp.store.device_arms(device_id)
        assert [(arm.model, arm.version) for arm in arms] == [("digits", version)], (name, arms)
        record = cp.cp.store.get_device(device_id)
        assert record is not None
        serving = [(m.version, m.state) for m in record.models
                   if m.name == "digits" and m.serving]
        assert serving == [(version, "committed")], (name, record.models)
        installed = [(m["version"], m["state"], m["bundle_digest"])
                     for m in _agent_models(agents_dir / name, capsys)
                     if m["name"] == "digits" and m["serving"]]
        assert installed == [(version, "committed", published.digest)], (name, installed)


def _stop_all(agents: list[RunningAgent], processes: list[Proc],
              replicas: list[RunningControlPlane], loops: list[LoopThread]) -> None:
    for agent in agents:
        agent.stop()
    for proc in processes:
        if proc.p.poll() is None:
            proc.terminate()
    for replica in replicas:
        with contextlib.suppress(Exception):  # the rest of the teardown goes on
            replica.stop()
    for lp in loops:
        lp.close()


@pytest.mark.slow
def test_three_replicas_rollout_scheduler_sigkill_and_agent_failover_in_one_story(
    tmp_path: Path, loop: LoopThread, pg_database: str, trained_bundle: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    apis = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    a_api, b_api, c_api = apis
    home_a = tmp_path / "a"
    cfg = ControlPlaneConfig(home=home_a, api_listen=a_api, enroll_listen="127.0.0.1:0",
                             api_addresses=apis, database_url=pg_database)
    cfg.heartbeat_interval_seconds = 1
    cfg.rollout_tick_seconds = TICK
    init_home(home_a, config=cfg)
    shutil.copytree(home_a, tmp_path / "pristine")  # B's and C's homes: copies made before A ran

    replica_a = Proc("control-plane", "serve", "--home", str(home_a), "--api", a_api)
    processes = [replica_a]
    loops = [LoopThread(), LoopThread()]
    replicas: list[RunningControlPlane] = []
    pinned: list[RunningAgent] = []
    try:
        a_enroll = replica_a.expect(r"enrollment .* listening on (\S+)").group(1)
        replica_a.expect(r"now leads 'scheduler'")  # A, alone, takes the scheduler
        for version in (1, 2):
            bundle = _signed(home_a, trained_bundle, tmp_path / f"v{version}", version)
            _fleet_json(home_a, a_api, capsys, "models", "publish", str(bundle))
        ca_pem = (home_a / "pki" / "ca.pem").read_bytes()

        def enrolled(name: str) -> AgentConfig:
            token = _fleet_json(home_a, a_api, capsys, "tokens", "create")["token"]
            return enroll(a_enroll, token, ca_pem, tmp_path / name)

        # The agent process: every replica's address, started while only A runs, so it is on A.
        roaming = enrolled("roaming")
        assert sorted(roaming.api_addresses) == sorted(apis)
        roaming.probation_seconds = 0.0
        roaming.backoff_initial_seconds, roaming.backoff_max_seconds = 0.05, 0.2
        roaming.save(StateDir(tmp_path / "roaming"))
        agent_proc = Proc("edge-agent", "run", "--state-dir", str(tmp_path / "roaming"),
                          "--listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0")
        processes.append(agent_proc)
        assert agent_proc.expect(r"connected to control plane (\S+) as").group(1) == a_api

        # B and C, and one in-process agent pinned to each (its only address).
        replicas = [_in_process_replica(tmp_path / "pristine", tmp_path / name, api, lp)
                    for name, api, lp in (("b", b_api, loops[0]), ("c", c_api, loops[1]))]
        b, c = replicas
        devices = {"roaming": roaming.device_id}
        for name, replica in (("on-b", b), ("on-c", c)):
            devices[name] = enrolled(name).device_id
            pinned.append(start_agent(tmp_path / name, loop, probation_seconds=0.0,
                                      api_addresses=[replica.api]))
        for agent, replica in zip(pinned, replicas, strict=True):
            agent.wait_for("serving")
            _wait_stream(replica, agent.agent.config.device_id)

        # 1. A rollout started on A completes on the agents connected to B and C.
        _fleet_json(home_a, a_api, capsys, "rollouts", "start", "--model", "digits",
                    "--version", "1")
        for agent in pinned:
            _wait_models(agent, _committed(1))
        wait_until(lambda: b.cp.store.get_rollout("digits").state.value == "completed",  # type: ignore[union-attr]
                   what="the v1 rollout to complete")
        assert b.cp.leader_ticks == 0 and c.cp.leader_ticks == 0  # A ran it

        # Telemetry from the agent process, before anything is killed, all in the database.
        outbox = StateDir(tmp_path / "roaming").outbox
        _append_drift(outbox, range(1, 11))
        wait_until(lambda: len(_drift_seqs(b, roaming.device_id)) == 10,
                   what="the first ten records in the database")

        # 2. A staged rollout of v2 (three steps, one device each, baking 2 s) started on A;
        # A is SIGKILLed once step 2 has begun.
        _fleet_json(home_a, a_api, capsys, "rollouts", "start", "--model", "digits",
                    "--version", "2", "--steps", "33,66,100", "--bake", "2")
        wait_until(lambda: b.cp.store.get_rollout("digits").step == 1,  # type: ignore[union-attr]
                   what="step 2 to begin")
        _append_drift(outbox, range(11, 16))  # just before the kill: may be in flight
        killed_at = time.monotonic()
        replica_a.p.send_signal(signal.SIGKILL)
        assert replica_a.p.wait(WAIT) == -signal.SIGKILL
        _append_drift(outbox, range(16, 26))  # after the kill

        # The scheduler moves to exactly one survivor within seconds.
        wait_until(lambda: b.cp.leader_ticks + c.cp.leader_ticks > 0, 10, "a survivor to lead")
        takeover = time.monotonic() - killed_at
        # 3. The agent process moves to a survivor.
        moved_to = a_api
        while moved_to == a_api:  # past a reconnection to A logged before the kill, if any
            moved_to = agent_proc.expect(r"connected to control plane (\S+) as").group(1)
        failover = time.monotonic() - killed_at
        with capsys.disabled():
            print(f"\nthree replicas: scheduler taken over {takeover:.2f} s after kill -9 of its "
                  f"replica (tick {TICK} s); the agent process on {moved_to} "
                  f"{failover:.2f} s after")
        assert takeover < 5
        assert failover < 10 and moved_to in (b_api, c_api)
        assert (b.cp.leader_ticks > 0) != (c.cp.leader_ticks > 0)

        # The rollout completes, each step passed once.
        wait_until(lambda: b.cp.store.get_rollout("digits").state.value == "completed",  # type: ignore[union-attr]
                   what="the v2 rollout to complete on the survivors")
        rollout = c.cp.store.get_rollout("digits")
        assert rollout is not None and rollout.version == 2
        for step in ("step 1 (33%", "step 2 (66%", "step 3 (100%"):
            assert sum(1 for h in rollout.history
                       if h.startswith(step) and "passed" in h) == 1, rollout.history
        assert sorted(rollout.device_ids) == sorted(devices.values())
        assert [len(step_devices("digits", rollout.device_ids, rollout.steps, s))
                for s in range(3)] == [1, 2, 3]

        # No device between versions: every one is assigned v2 alone, reports v2 committed and
        # serving, and runs the bundle the control plane published as v2.
        _assert_every_device_on(b, devices, 2, tmp_path, capsys)

        # The agent process's telemetry: before, around and after the kill, each record once.
        wait_until(lambda: len(_drift_seqs(c, roaming.device_id)) >= 25,
                   what="all 25 records in the database")
        seqs = _drift_seqs(c, roaming.device_id)
        assert len(seqs) == 25 and len(set(seqs)) == 25, seqs
        with Outbox(outbox) as box:
            assert box.stats().depth == 0

        # 5. The audit chain, written by all three replicas, verifies.
        verdict = _fleet_json(c.home, c_api, capsys, "audit", "verify")
        assert verdict["ok"], verdict
    finally:
        _stop_all(pinned, processes, replicas, loops)


# ---------------------------------------------------------------- concurrent audit appends
@pytest.fixture
def three_replicas(tmp_path: Path, loop: LoopThread,
                   pg_database: str) -> Iterator[list[RunningControlPlane]]:
    """Three in-process replicas on one PostgreSQL database, each on its own event loop."""
    loops = [LoopThread(), LoopThread()]
    a = start_control_plane(tmp_path / "a", loop, database_url=pg_database)
    others = [_in_process_replica(a.home, tmp_path / name, "127.0.0.1:0", lp)
              for name, lp in (("b", loops[0]), ("c", loops[1]))]
    yield [a, *others]
    for replica in (a, *others):
        replica.stop()
    for lp in loops:
        lp.close()


def test_admin_operations_on_three_replicas_at_once_keep_one_valid_audit_chain(
    three_replicas: list[RunningControlPlane], capsys: pytest.CaptureFixture[str],
) -> None:
    threads_per_replica, calls = 3, 12
    made: list[str] = []
    failures: list[BaseException] = []
    start = threading.Barrier(len(three_replicas) * threads_per_replica)

    def issue(replica: RunningControlPlane) -> None:
        try:
            channel = open_channel(replace(replica.admin, api=replica.api))
            stub = admin_pb2_grpc.AdminServiceStub(channel)
            start.wait(WAIT)
            for _ in range(calls):
                reply = stub.CreateEnrollmentToken(
                    admin_pb2.CreateEnrollmentTokenRequest(ttl_seconds=600), timeout=WAIT)
                made.append(str(reply.token))
            channel.close()
        except (grpc.RpcError, threading.BrokenBarrierError) as exc:
            failures.append(exc)

    before = len(three_replicas[0].cp.store.audit_chain())
    workers = [threading.Thread(target=issue, args=(replica,))
               for replica in three_replicas for _ in range(threads_per_replica)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(WAIT * 2)
    assert not failures, failures
    total = len(three_replicas) * threads_per_replica * calls
    assert len(made) == total

    chain = three_replicas[1].cp.store.audit_chain()
    appended = chain[before:]
    assert [e.seq for e in chain] == list(range(chain[0].seq, chain[0].seq + len(chain)))
    assert Counter(e.action for e in appended) == {"tokens.create": total}
    assert len({e.target for e in appended}) == total  # one entry per token, none lost
    for replica in three_replicas:  # every replica's API says so
        verdict = _fleet_json(replica.home, replica.api, capsys, "audit", "verify")
        assert verdict["ok"] and verdict["entries"] == len(chain), verdict
