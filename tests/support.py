"""Test support: a control plane and agents on real sockets (port 0) with real TLS.

Servers run on an asyncio loop in a background thread so that tests stay synchronous and wait
on events (queues), never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
from edgefleet.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc

from control_plane.config import ControlPlaneConfig
from control_plane.domain.records import RetrainJob
from control_plane.ops.home import init_home
from control_plane.server import ControlPlane
from control_plane.services.retrain_runner import LocalRunner
from edge_agent.daemon import Agent
from edge_agent.enroll import enroll
from edge_agent.state import AgentConfig, StateDir
from edge_agent.transport import Transport
from fleet.channel import open_channel
from fleetcore import operator_config
from fleetcore.operator_config import OperatorConfig

T = TypeVar("T")
WAIT = 30.0  # generous upper bound for any single event; tests normally see it in ms


class LoopThread:
    """An asyncio event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = WAIT) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()


class FakeClock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class RunningControlPlane:
    home: Path
    cp: ControlPlane
    loop: LoopThread
    admin: OperatorConfig
    clock: Any = None
    transport: str = "grpc"  # how agents of the tests reach it ("mqtt": through `broker`)
    broker: Any = None  # scripts.broker.Mosquitto, for transport "mqtt"

    @property
    def api(self) -> str:
        return self.cp.api_address

    @property
    def enroll(self) -> str:
        return self.cp.enroll_address

    @property
    def ca_pem(self) -> bytes:
        return self.cp.authority.ca_pem

    def stop(self) -> None:
        self.loop.run(self.cp.stop(grace_seconds=0.5))

    def restart(self) -> None:
        """Stop and start again on the same ports (a control-plane restart)."""
        self.stop()
        cfg = ControlPlaneConfig.load(self.home)
        cfg.api_listen = self.cp.api_address
        cfg.enroll_listen = self.cp.enroll_address
        kwargs = {"clock": self.clock} if self.clock is not None else {}

        def started() -> bool:
            # The old port may be held a moment by a client that, with nothing listening,
            # connected to itself (Linux picks the same port as the client's own end: TCP
            # simultaneous open); the client drops it at its failed TLS handshake.
            cp = ControlPlane(cfg, **kwargs)
            try:
                self.loop.run(cp.start())
            except OSError as exc:
                self.loop.run(cp.stop(0))
                if "cannot listen" not in str(exc):
                    raise
                return False
            self.cp = cp
            return True

        wait_until(started, what=f"the control plane listening again on {cfg.api_listen}")

    def admin_stub(self, config: OperatorConfig | None = None) -> admin_pb2_grpc.AdminServiceStub:
        cfg = config or self.admin
        channel = open_channel(replace(cfg, api=self.api))
        return admin_pb2_grpc.AdminServiceStub(channel)

    def token(self, labels: dict[str, str] | None = None, ttl: int = 0) -> str:
        reply = self.admin_stub().CreateEnrollmentToken(
            admin_pb2.CreateEnrollmentTokenRequest(ttl_seconds=ttl, labels=labels or {}),
            timeout=WAIT,
        )
        return str(reply.token)

    def device(self, device_id: str) -> admin_pb2.Device:
        return self.admin_stub().GetDevice(admin_pb2.GetDeviceRequest(id=device_id), timeout=WAIT)

    def enroll_agent(self, state_dir: Path, labels: dict[str, str] | None = None) -> AgentConfig:
        return enroll(self.enroll, self.token(labels), self.ca_pem, state_dir)



def fleet_json(cp: RunningControlPlane, capsys: Any, *args: str) -> Any:
    """``fleet ARGS --json`` as the control plane's admin; its parsed output (exit 0 asserted)."""
    from fleet.cli import main as fleet_main  # noqa: PLC0415  (the CLI, only for tests using it)

    capsys.readouterr()
    rc = fleet_main(["--config", str(cp.home / "operators/admin/fleet.toml"), "--api", cp.api,
                     *args, "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


def run_retrain_job(cp: RunningControlPlane, loop: LoopThread, model: str) -> RetrainJob:
    """Start the model's queued retraining job, wait for its trainer, finish it; return it."""
    retrain = cp.cp.services.retraining
    loop.run(retrain.tick())
    job = cp.cp.store.jobs(model)[0]
    runner = retrain.runner
    assert isinstance(runner, LocalRunner)
    proc = runner.procs.get(job.id)
    if proc is not None:
        loop.run(proc.wait(), timeout=300)
    loop.run(retrain.tick())
    return cp.cp.store.jobs(model)[0]

def start_control_plane(
    home: Path, loop: LoopThread, clock: Any = None, **overrides: Any
) -> RunningControlPlane:
    cfg = ControlPlaneConfig(home=home, api_listen="127.0.0.1:0", enroll_listen="127.0.0.1:0")
    cfg.heartbeat_interval_seconds = 1
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cfg = init_home(home, config=cfg)
    kwargs = {"clock": clock} if clock is not None else {}
    cp = ControlPlane(cfg, **kwargs)
    loop.run(cp.start())
    admin = operator_config.load(home / "operators" / "admin" / "fleet.toml")
    return RunningControlPlane(home=home, cp=cp, loop=loop, admin=admin, clock=clock)


@dataclass
class RunningAgent:
    agent: Agent
    loop: LoopThread
    events: queue.Queue[tuple[str, dict[str, Any]]] = field(default_factory=queue.Queue)
    future: Any = None

    def wait_for(self, kind: str, timeout: float = WAIT) -> dict[str, Any]:
        """Block until the agent emits an event of ``kind``; return its data."""
        while True:
            got, data = self.events.get(timeout=timeout)
            if got == kind:
                return data

    def stop(self) -> None:
        self.agent.request_stop()
        self.future.result(WAIT)



def wait_until(check: Callable[[], T | None], timeout: float = WAIT, what: str = "") -> T:
    """Wait for ``check()`` (a state another thread or process changes, with no event to wait
    on) to return something true, polled every 20 ms; return it."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {what or check}")
        time.sleep(0.02)

async def wait_until_async(check: Callable[[], T | None], timeout: float = WAIT,
                           what: str = "") -> T:
    """``wait_until`` on an event loop: the loop runs on while the state is polled."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {what or check}")
        await asyncio.sleep(0.02)


def start_agent(state_dir: Path, loop: LoopThread,
                observe: Callable[[str, dict[str, Any]], None] | None = None,
                **config: Any) -> RunningAgent:
    """``observe(kind, data)``, when given, sees each event first, in the thread that emitted
    it (an install step runs on a worker thread), before it is queued for ``wait_for``."""
    state = StateDir(state_dir)
    cfg = AgentConfig.load(state)
    cfg.backoff_initial_seconds = 0.05
    cfg.backoff_max_seconds = 0.2
    for key, value in config.items():
        setattr(cfg, key, value)
    events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()

    def on_event(kind: str, data: dict[str, Any]) -> None:
        if observe is not None:
            observe(kind, data)
        events.put((kind, data))

    agent = Agent(state_dir, config=cfg, on_event=on_event,
                  listen="127.0.0.1:0", grpc_listen="127.0.0.1:0")
    running = RunningAgent(agent=agent, loop=loop, events=events)
    running.future = asyncio.run_coroutine_threadsafe(agent.run(), loop.loop)
    return running


def rpc_code(exc: BaseException) -> grpc.StatusCode:
    assert isinstance(exc, grpc.RpcError)
    return exc.code()


def device_credentials(state_dir: Path) -> grpc.ChannelCredentials:
    """mTLS credentials of an enrolled agent's state directory (as the agent uses them)."""
    s = StateDir(state_dir)
    return grpc.ssl_channel_credentials(s.ca.read_bytes(), s.key.read_bytes(),
                                        s.cert.read_bytes())


def send_telemetry(api: str, state_dir: Path, records: list[agent_pb2.TelemetryRecord]) -> None:
    """Send records as the device enrolled in ``state_dir`` (its own mTLS credentials)."""
    with grpc.secure_channel(api, device_credentials(state_dir)) as channel:
        agent_pb2_grpc.AgentServiceStub(channel).SendTelemetry(
            agent_pb2.TelemetryBatch(records=records), timeout=30)


def kill_agent_after_a_failed_contact(state_dir: Path, *extra: str) -> None:
    """Run `edge-agent run` as a process until it has failed to reach its control plane (or
    broker) once, then kill -9 it: what it wrote must survive."""
    proc = subprocess.Popen([str(Path(sys.executable).parent / "edge-agent"), "run",
                             "--state-dir", str(state_dir), "--listen", "127.0.0.1:0",
                             "--grpc-listen", "127.0.0.1:0", *extra],
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in proc.stderr or []:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    while "retrying in" not in lines.get(timeout=WAIT):
        pass  # it tried and failed
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(WAIT) == -signal.SIGKILL


def assign_digits_v1(cp: RunningControlPlane, trained_bundle: Path, workdir: Path) -> None:
    """Publish the trained bundle as digits v1 and roll it out to every enrolled device, so
    that what devices report about digits v1 counts (no agent needed)."""
    from fleet.cli import main as fleet_main  # noqa: PLC0415 - only the tests that assign
    from tests.test_delivery import _bundle_for  # noqa: PLC0415

    bundle = _bundle_for(cp, trained_bundle, workdir / "digits-v1", version=1)
    config = str(cp.home / "operators/admin/fleet.toml")
    assert fleet_main(["--config", config, "--api", cp.api, "models", "publish",
                       str(bundle)]) == 0
    assert fleet_main(["--config", config, "--api", cp.api, "rollouts", "start", "--model",
                       "digits", "--version", "1"]) == 0


class InMemoryTransport(Transport):
    """A ``Transport`` in memory (no network) whose calls are not served: a subclass overrides
    the ones its test needs. The base class's invariants (timeouts, limits, error wrapping)
    apply to it exactly as to gRPC and MQTT."""

    name = "in-memory"

    async def _heartbeat(self, request: Any) -> Any:
        raise NotImplementedError

    async def _send_telemetry(self, batch: Any) -> list[int]:
        raise NotImplementedError

    async def _renew_certificate(self, csr_pem: bytes) -> tuple[bytes, bytes]:
        raise NotImplementedError

    async def _releases(self, have_serial: int) -> AsyncGenerator[Any, None]:
        raise NotImplementedError
        yield

    async def _fetch_bundle(self, digest: str, offset: int,
                            length: int) -> AsyncGenerator[Any, None]:
        raise NotImplementedError
        yield

    async def _reset(self) -> None:
        pass

    async def _close(self) -> None:
        pass


class FakeBundleServer(InMemoryTransport):
    """Serves a blob like FetchBundle, misbehaving on request (in memory, no network).

    A ``Transport``, so the base class's invariants (stall timeout, chunk size limit, error
    wrapping) apply to it exactly as to gRPC and MQTT."""

    name = "fake"

    def __init__(self, blob: bytes, *, extra: bytes = b"", break_after: int | None = None,
                 stall_after: int | None = None, chunk: int = 1000) -> None:
        super().__init__()
        self.blob, self.extra, self.chunk = blob, extra, chunk
        self.break_after, self.stall_after = break_after, stall_after
        self.requests: list[tuple[int, int]] = []
        self.sent = 0

    async def _fetch_bundle(
        self, digest: str, offset: int, length: int
    ) -> AsyncGenerator[agent_pb2.BundleChunk, None]:
        self.requests.append((offset, length))
        data = self.blob[offset:] + self.extra
        for chunks, i in enumerate(range(0, len(data), self.chunk)):
            if self.stall_after is not None and chunks >= self.stall_after:
                await asyncio.Event().wait()  # never answers again
            if self.break_after is not None and chunks >= self.break_after:
                self.break_after = None
                raise ConnectionResetError("connection reset")
            piece = data[i : i + self.chunk]
            self.sent += len(piece)
            yield agent_pb2.BundleChunk(offset=offset + i, data=piece)

