"""Agents fail over between control-plane replicas (issue 18 item 3).

Two real control planes serve one home (one SQLite file in WAL mode) on different ports; an
agent enrolled with both addresses loses the one it talks to mid-stream and carries on with the
other: heartbeats continue, telemetry arrives exactly once, its model and release trust stay as
they were, and a release issued afterwards reaches it. The selection and backoff rules that keep
a fleet from stampeding onto the survivor are checked on their own, with many simulated agents.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from edgefleet.v1 import agent_pb2

import edge_agent.transport.grpc as grpc_transport
from control_plane.config import ControlPlaneConfig
from control_plane.ops.home import init_home
from control_plane.server import ControlPlane
from edge_agent.backoff import Backoff
from edge_agent.cli import main as agent_main
from edge_agent.enroll import _check_addresses, enroll
from edge_agent.failover import AddressRing
from edge_agent.identity import load_credentials
from edge_agent.reporting.outbox import Outbox
from edge_agent.state import AgentConfig, StateDir
from fleetcore import tomlfile
from fleetcore.errors import InvalidInputError, TransportError
from tests.store_support import BACKENDS, pg_database, raw_telemetry
from tests.support import (
    WAIT,
    LoopThread,
    RunningControlPlane,
    start_agent,
    start_control_plane,
    wait_until,
)
from tests.test_cli import Proc, run
from tests.test_delivery import _bundle_for, _committed, _fleet, _wait_models
from tests.test_telemetry import _drift_payload

__all__ = ["pg_database"]  # fixtures (tests/store_support.py)


# ---------------------------------------------------------------------- selection and backoff
def test_agents_start_on_replicas_in_random_orders_spread_evenly() -> None:
    replicas = ["cp1:7443", "cp2:7443", "cp3:7443"]
    rings = [AddressRing(replicas, random.Random(seed)) for seed in range(3000)]
    first = Counter(r.current for r in rings)
    assert set(first) == set(replicas)
    assert all(800 <= n <= 1200 for n in first.values()), first  # ~1000 each
    # The agents of a dead replica do not all move to the same next one either.
    after_cp1 = Counter(r.order[1] for r in rings if r.current == "cp1:7443")
    assert set(after_cp1) == {"cp2:7443", "cp3:7443"}
    assert min(after_cp1.values()) > 0.35 * sum(after_cp1.values()), after_cp1


def test_one_failure_seen_by_both_loops_moves_the_agent_once() -> None:
    ring = AddressRing(["a:1", "b:1", "a:1"], random.Random(1))
    assert sorted(ring.order) == ["a:1", "b:1"]  # each address once
    dead = ring.current
    assert ring.advance(dead)  # the heartbeat loop saw it
    assert not ring.advance(dead)  # the release stream saw the same death: no second move
    assert ring.current != dead
    assert ring.advance(ring.current) and ring.current == dead  # round and round
    single = AddressRing(["only:1"])
    assert not single.advance("only:1") and single.current == "only:1"
    with pytest.raises(ValueError, match="no API address"):
        AddressRing([])


def _retry_times(rng: random.Random, horizon: float) -> list[float]:
    """When one agent retries after its replica died at t=0, every try failing (the worst
    case: the whole cluster is down), with the agent's default backoff (0.5 s .. 30 s)."""
    backoff, t, times = Backoff(0.5, 30.0, rng), 0.0, []
    while (t := t + backoff.next_delay()) < horizon:
        times.append(t)
    return times


def test_full_jitter_spreads_a_fleets_retries_and_bounds_each_agents_rate() -> None:
    agents, horizon = 2000, 120.0
    tries = [_retry_times(random.Random(seed), horizon) for seed in range(agents)]
    # No herd: the fleet's first retries spread over the whole first window (0.05-0.5 s),
    # never more than a fifth of it in any 50 ms; without jitter all 2000 would land at once.
    firsts = Counter(int(t[0] / 0.05) for t in tries)
    assert max(firsts.values()) < 0.2 * agents, firsts
    # Bounded retry rate: each agent's delays double in expectation, so in two minutes of
    # failures an agent tries a dozen times or so, never in a tight loop.
    counts = [len(t) for t in tries]
    assert sum(counts) / agents < 14
    assert max(counts) <= 25
    # ... and the fleet's load on the survivor per second falls as the outage goes on.
    per_second = Counter(int(x) for t in tries for x in t)
    assert max(per_second[s] for s in range(60, 120)) < 0.1 * agents
    # A success resets: the next failure starts from the smallest window again.
    backoff = Backoff(0.5, 30.0, random.Random(3))
    for _ in range(6):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() <= 0.5


# ---------------------------------------------------------------------- configuration
def test_agent_toml_without_addresses_keeps_working(tmp_path: Path,
                                                    cp: RunningControlPlane) -> None:
    cfg = cp.enroll_agent(tmp_path / "a")
    state = StateDir(tmp_path / "a")
    assert cfg.api_addresses == [cp.api]  # the default: the one advertised address
    doc = tomlfile.load(state.config)
    del doc["agent"]["api_addresses"]  # an agent.toml written before failover
    tomlfile.write(state.config, doc)
    old = AgentConfig.load(state)
    assert old.api_addresses == [] and old.failover_addresses() == [cp.api]


def test_control_plane_refuses_a_malformed_address_list(tmp_path: Path,
                                                        cp: RunningControlPlane) -> None:
    cfg = ControlPlaneConfig.load(cp.home)
    cfg.api_addresses = ["cp1.example:7443", "cp2.example:7443"]
    tomlfile.write(cp.home / "config.toml", cfg.to_toml())
    assert ControlPlaneConfig.load(cp.home).api_addresses == cfg.api_addresses
    doc = cfg.to_toml()
    doc["server"]["api_addresses"] = ["cp1.example"]  # no port
    tomlfile.write(cp.home / "config.toml", doc)
    with pytest.raises(InvalidInputError, match="HOST:PORT"):
        ControlPlaneConfig.load(cp.home)


def test_an_enrollment_answer_with_bad_addresses_is_refused_before_anything_is_written(
    cp: RunningControlPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The answer comes over TLS from the fleet's server, but its list is still bounded and
    checked: a malformed or oversized one stops enrollment with nothing on disk."""
    checked = _check_addresses
    ok = agent_pb2.EnrollResponse(api_address="cp1:7443", api_addresses=["cp2:7443"])
    assert checked(ok) == ["cp1:7443", "cp2:7443"]  # the advertised one always among them
    assert checked(agent_pb2.EnrollResponse(api_address="cp1:7443")) == []  # an older server
    for bad in (["cp2"], ["x" * 400 + ":1"], [f"cp{i}:7443" for i in range(40)]):
        with pytest.raises(InvalidInputError):
            checked(agent_pb2.EnrollResponse(api_address="cp1:7443", api_addresses=bad))

    cp.cp.config.api_addresses = ["cp1.example"]  # a misconfigured server (no port)
    with pytest.raises(InvalidInputError, match="HOST:PORT"):
        cp.enroll_agent(tmp_path / "a")
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------------- two real replicas
def _second_replica(first: RunningControlPlane, loop: LoopThread) -> RunningControlPlane:
    """Another `control-plane serve` on the same home (keys, SQLite database), other ports."""
    cfg = ControlPlaneConfig.load(first.home)
    cfg.api_listen = cfg.enroll_listen = "127.0.0.1:0"
    cfg.heartbeat_interval_seconds = first.cp.config.heartbeat_interval_seconds
    cp = ControlPlane(cfg)
    loop.run(cp.start())
    return RunningControlPlane(home=first.home, cp=cp, loop=loop, admin=first.admin)


@pytest.fixture(params=BACKENDS)
def replicas(request: pytest.FixtureRequest, tmp_path: Path,
             loop: LoopThread) -> Iterator[list[RunningControlPlane]]:
    """Two replicas of one home: on one SQLite file (WAL), or on one PostgreSQL database."""
    database = {} if request.param == "sqlite" else {
        "database_url": request.getfixturevalue("pg_database")}
    loop_b = LoopThread()
    a = start_control_plane(tmp_path / "cp", loop, **database)
    b = _second_replica(a, loop_b)
    both = [a.api, b.api]  # [server] api_addresses, once the ports are known
    for r in (a, b):
        r.cp.config.api_addresses = both
    yield [a, b]
    for r in (a, b):
        with contextlib.suppress(Exception):  # the test stopped one already
            r.stop()
    loop_b.close()


def _rows(cp: RunningControlPlane, device_id: str) -> list[tuple[int, str]]:
    return [(r.seq, r.kind) for r in cp.cp.store.telemetry_records(device_id)]


def test_agent_fails_over_to_the_other_replica_when_its_replica_dies_mid_stream(
    replicas: list[RunningControlPlane], tmp_path: Path, trained_bundle: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    a, b = replicas
    cfg = a.enroll_agent(tmp_path / "agent")
    assert sorted(cfg.api_addresses) == sorted([a.api, b.api])  # stored in agent.toml
    assert sorted(AgentConfig.load(StateDir(tmp_path / "agent")).api_addresses) == sorted(
        [a.api, b.api])
    assert _fleet(a, "models", "publish",
                  str(_bundle_for(a, trained_bundle, tmp_path / "v1", version=1))) == 0

    seen: list[tuple[float, str, dict[str, Any]]] = []
    agent = start_agent(tmp_path / "agent", a.loop, probation_seconds=0.0,
                        observe=lambda kind, data: seen.append((time.monotonic(), kind, data)))
    try:
        assert _fleet(a, "rollouts", "start", "--model", "digits", "--version", "1") == 0
        _wait_models(agent, _committed(1))
        for i in range(1, 11):  # telemetry sent before the kill
            agent.agent.outbox.append("drift", _drift_payload(i), now=float(i))
        while agent.agent.outbox.stats().depth:
            agent.wait_for("heartbeat")
        used = agent.wait_for("heartbeat")["address"]
        dead, survivor = (a, b) if used == a.api else (b, a)
        trust_before = (agent.agent.trust.mark, agent.agent.root_version)
        digest_before = agent.agent.models.active("digits")
        assert dead.cp.notifier.subscribers(cfg.device_id) == 1  # its release stream is open

        for i in range(11, 21):  # written just before the kill: may be in flight
            agent.agent.outbox.append("drift", _drift_payload(i), now=float(i))
        killed_at = time.monotonic()
        dead.stop()
        for i in range(21, 31):  # telemetry written after the kill
            agent.agent.outbox.append("drift", _drift_payload(i), now=float(i))

        while agent.wait_for("heartbeat")["address"] != survivor.api:
            pass
        first_on_survivor = next(t for t, kind, d in seen if kind == "heartbeat"
                                 and d["address"] == survivor.api and t >= killed_at)
        failover_seconds = first_on_survivor - killed_at
        with capsys.disabled():
            print(f"\nfailover: {failover_seconds:.2f} s from kill to the first heartbeat on "
                  f"the other replica ({type(survivor.cp.store).__name__}; heartbeat "
                  "interval 1 s, backoff 0.05-0.2 s)")
        assert failover_seconds < 10
        assert any(kind == "failover" and d == {"from": dead.api, "to": survivor.api}
                   for _, kind, d in seen)
        agent.wait_for("heartbeat")  # heartbeats continue there
        while agent.agent.outbox.stats().depth:
            agent.wait_for("heartbeat")
        # The stream moved too, and nothing was reset: same trust, same model.
        wait_until(lambda: survivor.cp.notifier.subscribers(cfg.device_id) == 1)
        assert (agent.agent.trust.mark, agent.agent.root_version) == trust_before
        assert agent.agent.models.active("digits") == digest_before

        # Exactly once, each record, before, during and after.
        rows = _rows(survivor, cfg.device_id)
        seqs = [seq for seq, _ in rows]
        assert len(seqs) == len(set(seqs))
        assert sum(1 for _, kind in rows if kind == "drift") == 30

        # `edge-agent status` shows the replica in use.
        capsys.readouterr()
        assert agent_main(["status", "--state-dir", str(tmp_path / "agent"), "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["api_address"] == survivor.api
        assert sorted(status["api_addresses"]) == sorted([a.api, b.api])

        # A release issued afterwards, on the survivor, reaches it.
        assert _fleet(survivor, "models", "publish",
                      str(_bundle_for(survivor, trained_bundle, tmp_path / "v2",
                                      version=2))) == 0
        assert _fleet(survivor, "rollouts", "start", "--model", "digits", "--version",
                      "2") == 0
        _wait_models(agent, _committed(2))
        assert agent.agent.trust.mark is not None
        assert agent.agent.trust.mark.serial > trust_before[0].serial  # type: ignore[union-attr]
    finally:
        agent.stop()


def test_one_name_for_several_replicas_fails_over_inside_grpc(
    replicas: list[RunningControlPlane], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`api_addresses = ["fleet.example:7443"]`, a name with an A record per replica: gRPC's
    resolver hands every address to pick_first (shuffled), which moves to the next one when
    its connection drops. Here gRPC's static ``ipv4:`` list stands in for the DNS answer (this
    machine's resolver cannot be given one), with the certificate's name as the TLS target."""

    import edge_agent.transport.grpc as grpc_transport  # noqa: PLC0415

    monkeypatch.setattr(grpc_transport, "_CHANNEL_OPTIONS", (
        *grpc_transport._CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", "localhost")))
    a, b = replicas
    a.enroll_agent(tmp_path / "agent")
    creds = load_credentials(StateDir(tmp_path / "agent"))
    name = f"ipv4:{a.api},{b.api}"

    async def beat(t: grpc_transport.GrpcTransport) -> None:
        for _ in range(3):  # as the daemon does: a failed call resets, the next one retries
            try:
                await t.heartbeat(agent_pb2.HeartbeatRequest())
                return
            except TransportError:
                await t.reset()
        raise AssertionError("no replica answered")

    async def run() -> None:
        transports = [grpc_transport.GrpcTransport(name, lambda: creds) for _ in range(8)]
        for t in transports:
            await beat(t)  # each connected to one replica, picked at random
        await asyncio.to_thread(a.stop)
        for t in transports:
            await beat(t)  # those on the dead one moved to the other
            await t.close()

    asyncio.run(asyncio.wait_for(run(), WAIT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _drift_rows(home: Path, device_id: str) -> list[int]:
    return [r.seq for d, r in raw_telemetry(home / "edgefleet.db")
            if d == device_id and r.kind == "drift"]



@pytest.mark.slow
def test_sigkill_of_the_agents_replica_process_moves_the_agent_process_to_the_other(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """The same as processes: two `control-plane serve` on one home, `edge-agent run`, and
    kill -9 of the replica the agent is connected to."""
    home = tmp_path / "cp"
    ports = [_free_port(), _free_port()]
    addresses = [f"127.0.0.1:{p}" for p in ports]
    cfg = ControlPlaneConfig(home=home, api_addresses=addresses)
    cfg.heartbeat_interval_seconds = 1
    init_home(home, config=cfg)
    servers = {address: Proc("control-plane", "serve", "--home", str(home), "--api", address,
                             "--enroll", "127.0.0.1:0") for address in addresses}
    agent: Proc | None = None
    try:
        enroll_at = {a: s.expect(r"enrollment .* listening on (\S+)").group(1)
                     for a, s in servers.items()}
        token = run("fleet", "--config", str(home / "operators/admin/fleet.toml"), "--api",
                    addresses[0], "tokens", "create").stdout.strip()
        state = tmp_path / "agent"
        cfg_agent = enroll(enroll_at[addresses[0]], token, (home / "pki/ca.pem").read_bytes(),
                           state)
        assert sorted(cfg_agent.api_addresses) == sorted(addresses)
        with Outbox(StateDir(state).outbox) as outbox:
            for i in range(1, 11):
                outbox.append("drift", _drift_payload(i), now=float(i))
        agent = Proc("edge-agent", "run", "--state-dir", str(state), "--listen",
                     "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0")
        used = agent.expect(r"connected to control plane (\S+) as").group(1)
        wait_until(lambda: len(_drift_rows(home, cfg_agent.device_id)) == 10)

        killed_at = time.monotonic()
        servers[used].p.send_signal(signal.SIGKILL)
        assert servers[used].p.wait(WAIT) == -signal.SIGKILL
        with Outbox(StateDir(state).outbox) as outbox:
            for i in range(11, 21):
                outbox.append("drift", _drift_payload(i), now=float(i))
        other = agent.expect(r"connected to control plane (\S+) as").group(1)
        failover_seconds = time.monotonic() - killed_at
        with capsys.disabled():
            print(f"\nfailover: {failover_seconds:.2f} s from kill -9 of the replica process "
                  "to the agent process's first heartbeat on the other (interval 1 s)")
        assert other != used and other in addresses
        assert failover_seconds < 10
        wait_until(lambda: len(_drift_rows(home, cfg_agent.device_id)) >= 20)
        assert sorted(_drift_rows(home, cfg_agent.device_id)) == sorted(
            set(_drift_rows(home, cfg_agent.device_id)))
        assert len(_drift_rows(home, cfg_agent.device_id)) == 20  # each once
        status = json.loads(run("edge-agent", "status", "--state-dir", str(state),
                                "--json").stdout)
        assert (status["state"], status["api_address"]) == ("connected", other)
    finally:
        for proc in [*servers.values(), *([agent] if agent else [])]:
            if proc.p.poll() is None:
                proc.terminate()
