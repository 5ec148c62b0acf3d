"""Fleet scale: one control-plane process, many simulated agents speaking the real protocol.

``python -m scripts.bench_fleet [-n 1000] [--duration 10]`` starts a real ``control-plane
serve`` child process (so its CPU and memory are read from ``/proc/<pid>``), enrolls N devices
through the real one-time-token + CSR flow (tokens from the AdminService, an EC P-256 key and a
CSR per device, ``Enroll`` on the enrollment port, 32 at a time), and then runs every device in
this one asyncio process: each has its own grpc.aio channel (its own TCP + TLS connection) with
its own client certificate and holds an open ``Sync`` stream throughout. Then, in order:

1. fan-out: two versions of a tiny digits bundle are published; a rollout of v1 to the 10
   baseline devices, then of v2 to all N, each timed from the ``StartRollout`` call until the
   last device's ``Sync`` stream delivered its signed release (each verified afterwards
   against the control plane's release key and the device id, and checked to name the
   version). It comes first so that every device runs digits v2, which its reports name:
   they are stored as a fleet's are (a report of a version the device was not told to run
   is refused, a cheaper path);
2. baseline phase: 10 devices heartbeat every 0.5 s for 5 s, each heartbeat followed by a
   small ``TelemetryBatch`` (as the agent sends its outbox after each heartbeat);
3. heartbeat phase: all N devices heartbeat at the control plane's default interval (10 s:
   100 heartbeats/s at N=1000; ``--interval 2`` for 5x that) for ``--duration`` seconds, each
   followed by a 5-record batch;
4. ingest phase: within ``--duration`` seconds every device sends one 500-record batch (the
   agent's batch size) after a heartbeat: N x 500 records offered over the window.

Telemetry records are ``arm_stats`` plus one ``drift`` window per batch (the payloads of
control_plane/domain/telemetry.py). What is reported, against a baseline of the same run
(docs/design.md §9):

* heartbeat p50/p99 of the heartbeat phase against the baseline phase: the ratio is what the
  fleet's size and rate cost. Target: p99 < 100 ms (and no failed call).
* telemetry records/s acknowledged in the ingest phase (over the seconds until the last answer)
  against the rate offered (records sent over the window): a ratio of 1.0 means the control
  plane kept up. Target: >= 20,000 records/s.
* release fan-out time to N devices against the fan-out to 10. Target: all within 10 s.
* control-plane CPU (cores busy: CPU-seconds over wall seconds, heartbeat phase vs baseline
  phase) and peak RSS (``VmHWM`` at the end vs ``VmRSS`` of the idle process just started).
  No target: they show whether the one event loop is the bottleneck.

The load generator shares the machine with the control plane (on a 2-core machine both compete
for the CPU); its own CPU is reported as ``gen_cores``. Anything else running on the machine
inflates the latencies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
from edgefleet.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc, common_pb2

from control_plane.config import ControlPlaneConfig
from edge_agent.backoff import Backoff
from edge_agent.failover import AddressRing
from edge_agent.reporting.wire import encode_records, frame_batch
from fleetcore import pki
from fleetcore.archive import pack_bundle
from fleetcore.release import SignedRelease, reverify_release
from scripts.machine import machine_info
from scripts.procs import Child, run
from tests.trainer_support import write_pipeline
from trainer.bundle import sign_bundle
from trainer.config import Pipeline
from trainer.pipeline import Run, Workdir

__all__ = ["DEFAULT_PG", "FleetResult", "bench_fleet", "main"]

RPC_TIMEOUT = 60.0
ENROLL_CONCURRENCY = 32
PUBLISH_CHUNK = 1024 * 1024
BASE_LABEL, FLEET_LABEL = "base", "fleet"
_CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]  # one connection per device
# Where --database pg (and `make bench`) create the bench's own database, and drop it after.
DEFAULT_PG = os.environ.get("EDGEFLEET_BENCH_DATABASE",
                            "postgresql://postgres@127.0.0.1:5432/postgres")
# The agent's defaults (edge_agent/state.py AgentConfig): its reconnection backoff.
AGENT_BACKOFF = (0.5, 30.0)
LEADS = "now leads 'scheduler'"


@dataclass
class SimDevice:
    """One simulated agent: its identity, its channel and what it saw."""

    index: int
    device_id: str
    credentials: grpc.ChannelCredentials
    release_key: Any
    channel: grpc.aio.Channel | None = None
    stub: Any = None
    seq: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    sent: int = 0
    acked: int = 0
    releases: list[tuple[float, SignedRelease]] = field(default_factory=list)
    got_release: asyncio.Event = field(default_factory=asyncio.Event)
    sync_task: asyncio.Task[None] | None = None
    # Which replica it talks to (round-robin at the start) and where it goes when that one dies:
    # the agent's own AddressRing, started at the device's replica.
    ring: AddressRing | None = None
    api: str = ""
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    roaming: bool = False  # failover phase: a broken Sync stream moves the device on
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    broken: str = ""  # the address whose Sync stream broke (failover phase)
    failover_s: float | None = None  # kill -> first heartbeat answered by another replica
    victim: bool = False  # on the killed replica when it was killed


@dataclass
class FleetResult:
    rows: list[dict[str, Any]]
    devices: list[SimDevice]
    figures: dict[str, float]


# ---------------------------------------------------------------------------- /proc readings
class ProcStats:
    """CPU seconds and memory of processes from /proc (Linux), summed over them: the replicas
    (a process that is gone counts nothing)."""

    def __init__(self, *pids: int) -> None:
        self.pids = list(pids)
        self.tick = os.sysconf("SC_CLK_TCK")

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            total += (int(fields[11]) + int(fields[12])) / self.tick  # utime + stime
        return total

    def memory(self, key: str) -> int:
        total = 0
        for pid in self.pids:
            try:
                lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            except OSError:
                continue
            total += next((int(line.split()[1]) * 1024 for line in lines
                           if line.startswith(key + ":")), 0)
        return total


class DbStats:
    """CPU seconds of the PostgreSQL backends serving the bench's database (same machine): the
    server processes whose pids ``pg_stat_activity`` lists for it at each reading."""

    def __init__(self, url: str) -> None:
        self.url = url

    def cpu_seconds(self) -> float:
        if not self.url:
            return 0.0
        import psycopg  # noqa: PLC0415 - only with PostgreSQL

        name = urlsplit(self.url).path.lstrip("/")
        with psycopg.connect(_admin_url(self.url), autocommit=True) as conn:
            pids = [r[0] for r in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s", (name,)).fetchall()]
        return ProcStats(*pids).cpu_seconds()


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# ---------------------------------------------------------------------------- the control plane
def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # children inherit it: two sockets per device on either side
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _admin_credentials(home: Path) -> grpc.ChannelCredentials:
    d = home / "operators" / "admin"
    return grpc.ssl_channel_credentials((d / "ca.pem").read_bytes(),
                                        (d / "operator.key").read_bytes(),
                                        (d / "operator.pem").read_bytes())


def _train_bundle(work: Path, publisher_key: Path) -> Path:
    """A tiny digits bundle signed with the control plane's publisher key (a few seconds)."""
    pipeline = write_pipeline(work, hidden="32", epochs=3, prune=0.25)
    Run(Pipeline.load(pipeline), Workdir(work / "train"), publisher_key=publisher_key,
        progress=lambda m: None).run_all()
    return work / "train" / "bundle"


def _resign(source: Path, dest: Path, version: int, publisher_key: Path) -> Path:
    """A copy of ``source`` as ``version``, signed again (as tests/test_delivery.py does)."""
    shutil.copytree(source, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["version"] = version
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    sign_bundle(dest, publisher_key)
    return dest


# ---------------------------------------------------------------------------- the simulated fleet
async def _enroll_fleet(admin: Any, enroll_address: str, ca_pem: bytes, n: int,
                        base: int) -> list[SimDevice]:
    """Enroll n devices (the first ``base`` labelled as the small fleet), 32 at a time."""
    channel = grpc.aio.secure_channel(enroll_address,
                                      grpc.ssl_channel_credentials(root_certificates=ca_pem))
    enroll_stub = agent_pb2_grpc.AgentServiceStub(channel)
    gate = asyncio.Semaphore(ENROLL_CONCURRENCY)

    async def one(i: int) -> SimDevice:
        async with gate:
            label = BASE_LABEL if i < base else FLEET_LABEL
            token = (await admin.CreateEnrollmentToken(
                admin_pb2.CreateEnrollmentTokenRequest(labels={"bench": label}),
                timeout=RPC_TIMEOUT)).token
            key = pki.generate_key()
            reply = await enroll_stub.Enroll(agent_pb2.EnrollRequest(
                token=token, csr_pem=pki.make_csr(key), agent_version="bench-sim",
                host=common_pb2.HostFacts(hostname=f"sim-{i:05d}", os="Linux", arch="x86_64",
                                          cpu_count=1)), timeout=RPC_TIMEOUT)
        creds = grpc.ssl_channel_credentials(reply.ca_pem or ca_pem, pki.private_key_pem(key),
                                             reply.certificate_pem)
        return SimDevice(i, reply.device_id, creds,
                         pki.load_public_key(reply.release_public_key_pem))

    try:
        return list(await asyncio.gather(*(one(i) for i in range(n))))
    finally:
        await channel.close()


async def _open_sync(dev: SimDevice, api: str) -> None:
    """Connect the device and hold its Sync stream open; return once the stream is live."""
    dev.api = api
    dev.channel = grpc.aio.secure_channel(api, dev.credentials, options=_CHANNEL_OPTIONS)
    dev.stub = agent_pb2_grpc.AgentServiceStub(dev.channel)
    call = dev.stub.Sync(agent_pb2.SyncRequest(have_serial=0))
    await call.initial_metadata()  # the server subscribed the device before sending it

    async def receive() -> None:
        try:
            async for event in call:
                dev.releases.append((time.perf_counter(), SignedRelease(
                    event.release.document, event.release.signature)))
                dev.got_release.set()
                dev.wake.set()
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return
            if dev.roaming:  # its replica died: the agent's stream loop fails over at once
                dev.broken = api
                dev.wake.set()
            else:
                dev.errors.append(f"sync: {exc.code().name}")

    dev.sync_task = asyncio.create_task(receive())


_ARM_STATS = json.dumps({"model": "digits", "version": 2, "requests": 120, "errors": 0,
                         "p50_ms": 0.4, "p95_ms": 0.9, "labelled": 12, "correct": 11},
                        sort_keys=True, separators=(",", ":")).encode()


def _drift(now: float) -> bytes:
    return json.dumps({"model": "digits", "version": 2, "start": now - 60, "end": now,
                       "rows": 500, "score": 0.05, "drifted": False, "prediction_psi": 0.01,
                       "drifted_features": []}, sort_keys=True, separators=(",", ":")).encode()


def _batch(dev: SimDevice, size: int) -> agent_pb2.TelemetryBatch:
    now = time.time()
    records = []
    for k in range(size):
        dev.seq += 1
        kind, payload = ("drift", _drift(now)) if k == 0 else ("arm_stats", _ARM_STATS)
        records.append((dev.seq, kind, now, payload))
    # As the agent sends a batch: its records as columns (TelemetryBatch.columns).
    return agent_pb2.TelemetryBatch.FromString(frame_batch(encode_records(records), 0, 0))


async def _settle(admin: Any, fleet: list[SimDevice]) -> None:
    """Every device reports the fanned-out release installed (one heartbeat each, not timed),
    then the rollout is waited for until it completed: the phases measure a fleet at rest,
    not the scheduler ticking a rollout across all of it."""
    sem = asyncio.Semaphore(64)

    async def beat(dev: SimDevice) -> None:
        async with sem:
            await dev.stub.Heartbeat(agent_pb2.HeartbeatRequest(
                agent_version="bench-sim", uptime_seconds=1, models=_installed(dev)),
                timeout=RPC_TIMEOUT)

    await asyncio.gather(*(beat(d) for d in fleet))
    deadline = time.monotonic() + 120.0
    while (await admin.GetRollout(admin_pb2.GetRolloutRequest(model="digits"),
                                  timeout=RPC_TIMEOUT)).state == "running":
        if time.monotonic() > deadline:
            raise RuntimeError("the fan-out rollout did not complete within 120 s")
        await asyncio.sleep(0.2)


async def _device_loop(dev: SimDevice, stop_at: float, interval: float, batch: int) -> None:
    """Heartbeat every ``interval`` (first one at a random offset), telemetry after each; the
    heartbeat reports the device's release installed, as an agent's does."""
    loop = asyncio.get_running_loop()
    request = agent_pb2.HeartbeatRequest(agent_version="bench-sim", uptime_seconds=1,
                                         models=_installed(dev))
    await asyncio.sleep(random.uniform(0, interval))  # noqa: S311 (jitter)
    tick = loop.time()
    while tick < stop_at:
        try:
            t0 = time.perf_counter()
            await dev.stub.Heartbeat(request, timeout=RPC_TIMEOUT)
            dev.latencies.append(time.perf_counter() - t0)
            if batch:
                dev.sent += batch
                ack = await dev.stub.SendTelemetry(_batch(dev, batch), timeout=RPC_TIMEOUT)
                dev.acked += len(ack.acked)
        except grpc.aio.AioRpcError as exc:
            dev.errors.append(f"heartbeat/telemetry: {exc.code().name}")
        tick += interval
        if tick >= stop_at:
            break  # the phase ends with the last answer, not after another interval
        await asyncio.sleep(max(0.0, tick - loop.time()))


@dataclass
class Phase:
    devices: int
    seconds: float
    latencies: list[float]
    acked: int
    offered_per_s: float
    cp_cpu: float
    own_cpu: float

    @property
    def records_per_s(self) -> float:
        return self.acked / self.seconds

    @property
    def cp_cores(self) -> float:
        return self.cp_cpu / self.seconds


async def _phase(devices: list[SimDevice], duration: float, interval: float, batch: int,
                 proc: ProcStats) -> Phase:
    loop = asyncio.get_running_loop()
    before = [(len(d.latencies), d.acked, d.sent) for d in devices]
    cpu0, own0, t0 = proc.cpu_seconds(), _own_cpu(), time.perf_counter()
    stop_at = loop.time() + duration
    await asyncio.gather(*(_device_loop(d, stop_at, interval, batch) for d in devices))
    seconds = time.perf_counter() - t0
    latencies = [x for d, (n, _, _) in zip(devices, before, strict=True)
                 for x in d.latencies[n:]]
    acked = sum(d.acked - a for d, (_, a, _) in zip(devices, before, strict=True))
    sent = sum(d.sent - s for d, (_, _, s) in zip(devices, before, strict=True))
    # Offered: what the devices sent over the phase's window; accepted (records_per_s): what
    # came back acknowledged over the seconds until the last answer.
    return Phase(len(devices), seconds, latencies, acked, sent / duration,
                 proc.cpu_seconds() - cpu0, _own_cpu() - own0)


async def _publish(admin: Any, bundle: Path, work: Path) -> None:
    archive = work / f"{bundle.name}.tar"
    pack_bundle(bundle, archive)

    async def chunks() -> AsyncIterator[admin_pb2.PublishModelChunk]:
        with archive.open("rb") as fh:
            while data := fh.read(PUBLISH_CHUNK):
                yield admin_pb2.PublishModelChunk(data=data)

    await admin.PublishModel(chunks(), timeout=RPC_TIMEOUT)


async def _fan_out(admin: Any, devices: list[SimDevice], version: int, selector: dict[str, str],
                   timeout: float) -> tuple[float, float, int]:
    """Start a rollout; return (seconds until the last device got a release, seconds the
    StartRollout call took, devices that got none within ``timeout``)."""
    before = [len(d.releases) for d in devices]
    for d in devices:
        d.got_release.clear()
    t0 = time.perf_counter()
    await admin.StartRollout(admin_pb2.StartRolloutRequest(
        model="digits", version=version, selector=selector), timeout=RPC_TIMEOUT)
    call_s = time.perf_counter() - t0

    async def arrived(dev: SimDevice, n: int) -> None:
        while len(dev.releases) <= n:
            dev.got_release.clear()
            if len(dev.releases) > n:
                break
            await dev.got_release.wait()

    waits = [asyncio.ensure_future(arrived(d, n)) for d, n in zip(devices, before, strict=True)]
    _, pending = await asyncio.wait(waits, timeout=timeout)
    for w in pending:
        w.cancel()
    late = [d for d, n in zip(devices, before, strict=True) if len(d.releases) <= n]
    last = max((d.releases[n][0] for d, n in zip(devices, before, strict=True)
                if len(d.releases) > n), default=t0)
    # Each delivered release must be the signed document of this device, naming the version.
    for d, n in zip(devices, before, strict=True):
        for _, signed in d.releases[n:]:
            doc = reverify_release(signed, public_key=d.release_key, device_id=d.device_id)
            model = doc.model("digits")
            if model is None or version not in {a.version for a in model.arms}:
                raise AssertionError(f"{d.device_id}: release serial {doc.serial} lacks "
                                     f"digits v{version}")
    return last - t0, call_s, len(late)


# ---------------------------------------------------------------------------- the replicas
class Replica(Child):
    """A ``control-plane serve`` child that notes when it logs that it took the scheduler."""

    def __init__(self, name: str, *args: str, log: Path | None = None) -> None:
        self.leads_at: float | None = None  # perf_counter() of its "now leads" line
        super().__init__(name, *args, log=log)

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if LEADS in line:
                self.leads_at = time.perf_counter()
            if self._log:
                self._log.write(line)
                self._log.flush()
            self._lines.put(line)
        self._lines.put(None)


@dataclass
class Cluster:
    replicas: list[Replica]
    apis: list[str]
    enroll: str
    database: str  # the bench's own PostgreSQL database ("" on SQLite)
    tick: float  # the scheduler's tick on every replica (seconds)

    @property
    def stats(self) -> ProcStats:
        return ProcStats(*(r.proc.pid for r in self.replicas))


def _admin_url(url: str) -> str:
    """The same server's ``postgres`` database: where the bench's database is created."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/postgres"))


@contextmanager
def bench_database(server: str) -> Iterator[str]:
    """A fresh database on the PostgreSQL server at ``server`` (a URL naming any database on it
    that the user may connect to), dropped afterwards; "" (SQLite) when ``server`` is ""."""
    if not server:
        yield ""
        return
    import psycopg  # noqa: PLC0415 - only with PostgreSQL

    name = f"ef_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(server)._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(server, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pg_reachable(server: str) -> str:
    """"" when PostgreSQL answers at ``server``; else why not (one line)."""
    try:
        import psycopg  # noqa: PLC0415

        with psycopg.connect(server, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # any failure means "not reachable", said how
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
    return ""


def _start_replicas(work: Path, home: Path, n: int) -> list[Replica]:
    """N ``serve`` processes on copies of ``home`` (same database, same keys; copies made before
    any of them runs, as tests/test_three_replicas.py does), started together."""
    homes = [home] + [work / f"cp{i}" for i in range(1, n)]
    for h in homes[1:]:
        shutil.copytree(home, h)
    return [Replica(f"control-plane r{i}", "control-plane", "serve", "--home", str(h),
                    "--api", "127.0.0.1:0", "--enroll", "127.0.0.1:0",
                    log=work / f"control-plane-r{i}.log") for i, h in enumerate(homes)]


# ---------------------------------------------------------------------------- the benchmark
def bench_fleet(
    work: Path,
    *,
    devices: int = 1000,
    duration: float = 10.0,
    interval: float = 10.0,
    batch: int = 5,
    ingest_batch: int = 500,
    baseline_devices: int = 10,
    baseline_interval: float = 0.5,
    baseline_duration: float = 5.0,
    fanout_timeout: float = 120.0,
    replicas: int = 1,
    database: str = "",
    failover: bool = False,
    failover_interval: float = 2.0,
    tick: float | None = None,
    bundle: Path | None = None,
    progress: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> FleetResult:
    """Run the fleet benchmark in ``work``; return the table rows and the raw figures.

    ``database``: "" for SQLite (one replica), or a PostgreSQL server's URL: the bench creates
    its own database there and drops it at the end. ``replicas`` > 1 needs PostgreSQL;
    ``failover`` needs two replicas or more."""
    if replicas < 1:
        raise ValueError("replicas must be >= 1")
    if replicas > 1 and not database.startswith("postgresql://"):
        raise ValueError("several replicas share a PostgreSQL database: pass "
                         "--database postgresql://USER@HOST:PORT/DB")
    if failover and replicas < 2:
        raise ValueError("--failover needs --replicas 2 or more")
    work.mkdir(parents=True, exist_ok=True)
    _raise_fd_limit()
    with bench_database(database) as url:
        home = work / "cp"
        run("control-plane", "init", "--home", str(home), *(("--database", url) if url else ()))
        if tick is not None:
            cfg = ControlPlaneConfig.load(home)
            cfg.rollout_tick_seconds = tick
            cfg.save()
        tick_s = ControlPlaneConfig.load(home).rollout_tick_seconds
        publisher_key = home / "publisher" / "publisher.key"
        t_train = time.perf_counter()
        source = bundle or _train_bundle(work / "bundle", publisher_key)
        versions = [_resign(source, work / f"v{v}", v, publisher_key)
                    for v in ((1, 2, 3) if failover else (1, 2))]
        progress(f"fleet: bundles ready ({time.perf_counter() - t_train:.1f} s)")
        children = _start_replicas(work, home, replicas)
        try:
            apis = [c.expect(r"api \(mTLS\) listening on (\S+)").group(1) for c in children]
            enrolls = [c.expect(r"enrollment .* listening on (\S+)").group(1) for c in children]
            cluster = Cluster(children, apis, enrolls[0], url, tick_s)
            # Not asyncio.run: grpc.aio's poller thread keeps calling into the loop after the
            # channels close, and a closed loop turns each call into a logged traceback.
            loop = asyncio.new_event_loop()
            return loop.run_until_complete(_bench(
                home, cluster, work, versions, devices=devices,
                duration=duration, interval=interval, batch=batch, ingest_batch=ingest_batch,
                baseline_devices=min(baseline_devices, devices),
                baseline_interval=baseline_interval,
                baseline_duration=min(baseline_duration, duration),
                fanout_timeout=fanout_timeout, failover=failover,
                failover_interval=failover_interval, progress=progress))
        finally:
            for c in children:
                c.stop()


async def _bench(home: Path, cluster: Cluster, work: Path, versions: list[Path], *, devices: int,
                 duration: float, interval: float, batch: int, ingest_batch: int,
                 baseline_devices: int, baseline_interval: float, baseline_duration: float,
                 fanout_timeout: float, failover: bool, failover_interval: float,
                 progress: Callable[[str], None]) -> FleetResult:
    proc, db = cluster.stats, DbStats(cluster.database)
    idle_rss = proc.memory("VmRSS")
    creds = _admin_credentials(home)
    admin_channels = [grpc.aio.secure_channel(api, creds) for api in cluster.apis]
    admins = [admin_pb2_grpc.AdminServiceStub(c) for c in admin_channels]
    admin = admins[0]
    ca_pem = (home / "operators" / "admin" / "ca.pem").read_bytes()
    fleet: list[SimDevice] = []
    fail: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        fleet = await _enroll_fleet(admin, cluster.enroll, ca_pem, devices, baseline_devices)
        enroll_s = time.perf_counter() - t0
        progress(f"fleet: enrolled {devices} devices in {enroll_s:.1f} s")
        t0 = time.perf_counter()
        sem = asyncio.Semaphore(64)

        async def connect(d: SimDevice) -> None:
            first = cluster.apis[d.index % len(cluster.apis)]  # round-robin over the replicas
            d.ring = _ring_from(cluster.apis, first)
            async with sem:
                await _open_sync(d, first)

        await asyncio.gather(*(connect(d) for d in fleet))
        progress(f"fleet: {devices} Sync streams open on {len(cluster.apis)} replica(s) in "
                 f"{time.perf_counter() - t0:.1f} s")
        small = fleet[:baseline_devices]
        # Fan-out first: every device is then assigned digits v2, which its reports name, so
        # the phases below store arm statistics and drift windows as a fleet's are (reports of
        # a version a device was not told to run are refused, a cheaper path).
        for v in versions:
            await _publish(admin, v, work)
        fan_base, _, late_base = await _fan_out(admin, small, 1, {"bench": BASE_LABEL},
                                                fanout_timeout)
        fan_full, call_full, late_full = await _fan_out(admin, fleet, 2, {}, fanout_timeout)
        progress(f"fleet: fan-out to {devices} in {fan_full:.2f} s "
                 f"(StartRollout call {call_full:.2f} s), {late_full} late")
        await _settle(admin, fleet)
        base = await _phase(small, baseline_duration, baseline_interval, batch, proc)
        progress(f"fleet: baseline phase, {len(small)} devices: {len(base.latencies)} beats")
        db0 = db.cpu_seconds()
        full = await _phase(fleet, duration, interval, batch, proc)
        db_cores = (db.cpu_seconds() - db0) / full.seconds
        progress(f"fleet: heartbeat phase, {devices} devices: {len(full.latencies)} beats, "
                 f"{full.acked} records acknowledged")
        # Telemetry ingest: each device sends one agent-sized batch within the phase.
        db0 = db.cpu_seconds()
        ingest = await _phase(fleet, duration, duration, ingest_batch, proc)
        db_ingest_cores = (db.cpu_seconds() - db0) / ingest.seconds
        progress(f"fleet: ingest phase, {devices} devices: {ingest.acked} records acknowledged "
                 f"in {ingest.seconds:.1f} s")
        peak_rss = proc.memory("VmHWM")
        if failover:
            fail = await _failover(cluster, admins, fleet, 3, failover_interval, progress)
    finally:
        for d in fleet:
            if d.channel is not None:
                await d.channel.close()
        for c in admin_channels:
            await c.close()
    figures = {
        "devices": devices, "enroll_s": enroll_s,
        "hb_p50_ms": _percentile(full.latencies, 0.5) * 1e3,
        "hb_p99_ms": _percentile(full.latencies, 0.99) * 1e3,
        "hb_base_p50_ms": _percentile(base.latencies, 0.5) * 1e3,
        "hb_base_p99_ms": _percentile(base.latencies, 0.99) * 1e3,
        "heartbeats": len(full.latencies), "records_per_s": ingest.records_per_s,
        "offered_per_s": ingest.offered_per_s,
        "ingest_hb_p99_ms": _percentile(ingest.latencies, 0.99) * 1e3,
        "records_per_s_light": full.records_per_s, "fanout_s": fan_full, "fanout_base_s": fan_base,
        "fanout_call_s": call_full, "fanout_late": late_full + late_base,
        "cp_cores": full.cp_cores, "cp_base_cores": base.cp_cores, "cp_cpu_s": full.cp_cpu,
        "gen_cores": full.own_cpu / full.seconds, "peak_rss": peak_rss, "idle_rss": idle_rss,
        "gen_ingest_cores": ingest.own_cpu / ingest.seconds,
        "replicas": len(cluster.replicas), "postgresql": bool(cluster.database),
        "db_cores": db_cores, "db_ingest_cores": db_ingest_cores,
        "cp_ingest_cores": ingest.cp_cores, "tick_s": cluster.tick,
        "errors": sum(len(d.errors) for d in fleet),
        **fail,
    }
    return FleetResult(_rows(figures, baseline_devices, duration), fleet, figures)


# ---------------------------------------------------------------------------- failover
def _ring_from(apis: list[str], first: str) -> AddressRing:
    """The agent's ring over every replica (its own random order), turned to ``first``."""
    ring = AddressRing(apis)
    while ring.current != first:
        ring.advance(ring.current)
    return ring


async def _close(dev: SimDevice) -> None:
    if dev.channel is not None:
        await dev.channel.close()  # cancels the Sync call: its task ends quietly
        dev.channel = None


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def _installed(dev: SimDevice) -> list[common_pb2.InstalledModel]:
    """What the device reports: the newest release's digits arms, installed at once."""
    if not dev.releases:
        return []
    doc = reverify_release(dev.releases[-1][1], public_key=dev.release_key,
                           device_id=dev.device_id)
    model = doc.model("digits")
    return [common_pb2.InstalledModel(name="digits", version=a.version, state="committed",
                                      bundle_digest=a.digest, serving=True)
            for a in (model.arms if model else ())]


async def _roam(dev: SimDevice, stop: asyncio.Event, interval: float,
                killed: list[tuple[float, str]]) -> None:
    """The agent's failover rules on one device: heartbeat its ring's current replica every
    ``interval`` (and at once after a new release, reporting it installed); a failed call or a
    broken Sync stream advances the ring past that address, then the agent's full-jitter
    backoff (edge_agent/backoff.py, its default 0.5 s initial window) before the next try."""
    assert dev.ring is not None
    backoff = Backoff(*AGENT_BACKOFF)
    while not stop.is_set():
        api = dev.ring.current
        dev.wake.clear()
        try:
            if dev.channel is None or dev.api != api:
                await _close(dev)
                await _open_sync(dev, api)
            await dev.stub.Heartbeat(agent_pb2.HeartbeatRequest(
                agent_version="bench-sim", uptime_seconds=1, models=_installed(dev),
                session_id=dev.session_id), timeout=RPC_TIMEOUT)
        except grpc.aio.AioRpcError:
            dev.ring.advance(api)
            await _close(dev)
            await _pause(stop, backoff.next_delay())
            continue
        backoff.reset()
        if killed and dev.failover_s is None and dev.victim and api != killed[0][1]:
            dev.failover_s = time.perf_counter() - killed[0][0]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(dev.wake.wait(), interval)
        if dev.broken:
            broken, dev.broken = dev.broken, ""
            dev.ring.advance(broken)
            await _close(dev)
            await _pause(stop, backoff.next_delay())


async def _rollout(admins: list[Any], alive: list[int]) -> Any:
    """The digits rollout as the first live replica that answers says."""
    for i in alive:
        with contextlib.suppress(grpc.aio.AioRpcError):
            return await admins[i].GetRollout(admin_pb2.GetRolloutRequest(model="digits"),
                                              timeout=5)
    raise RuntimeError("no live replica answered GetRollout")


async def _until(check: Callable[[], Any], timeout: float, poll: float = 0.05) -> float | None:
    """perf_counter() when ``await check()`` first holds, or None after ``timeout``."""
    end = time.perf_counter() + timeout
    while time.perf_counter() < end:
        if await check():
            return time.perf_counter()
        await asyncio.sleep(poll)
    return None


async def _failover(cluster: Cluster, admins: list[Any], fleet: list[SimDevice], version: int,
                    interval: float, progress: Callable[[str], None],
                    timeout: float = 60.0) -> dict[str, Any]:
    """A staged rollout (34/67/100%, no bake) with every device heartbeating through its ring;
    once step 2 has begun, SIGKILL the replica that leads the scheduler (the one whose log
    said "now leads 'scheduler'": PostgreSQL gives the advisory lock to one session at a time).
    Measure the seconds until another replica leads, until the rollout moves on and completes,
    and until each agent of the killed replica heartbeats on another."""
    n = len(cluster.replicas)

    async def one_leader() -> bool:
        return sum(r.leads_at is not None for r in cluster.replicas) == 1

    if await _until(one_leader, max(10.0, 5 * cluster.tick)) is None:
        raise RuntimeError("no replica (or more than one) says it leads the scheduler")
    k = next(i for i, r in enumerate(cluster.replicas) if r.leads_at is not None)
    killed_api, alive = cluster.apis[k], [i for i in range(n) if i != k]
    stop = asyncio.Event()
    killed: list[tuple[float, str]] = []
    for d in fleet:
        d.roaming = True
    loops = [asyncio.create_task(_roam(d, stop, interval, killed)) for d in fleet]
    try:
        await admins[alive[0]].StartRollout(admin_pb2.StartRolloutRequest(
            model="digits", version=version, steps=[34, 67, 100]), timeout=RPC_TIMEOUT)

        async def step2() -> bool:
            r = await _rollout(admins, alive)
            return bool(r.version == version and (r.step >= 2 or r.state != "running"))

        if await _until(step2, timeout, 0.1) is None:
            raise RuntimeError("the staged rollout did not reach step 2")
        started = await _rollout(admins, alive)
        if started.state != "running" or started.step != 2:
            raise RuntimeError(f"the rollout passed step 2 before the kill ({started.state}, "
                               f"step {started.step}): a longer tick would catch it")
        for d in fleet:
            d.victim = d.ring is not None and d.ring.current == killed_api
        victims = [d for d in fleet if d.victim]
        cluster.replicas[k].proc.send_signal(signal.SIGKILL)
        killed.append((time.perf_counter(), killed_api))
        killed_at = killed[0][0]
        await asyncio.to_thread(cluster.replicas[k].proc.wait, 10)
        progress(f"fleet: SIGKILL of replica {k} ({killed_api}), the scheduler's, at step 2; "
                 f"{len(victims)} agents on it")

        async def new_leader() -> bool:
            return any((cluster.replicas[i].leads_at or 0.0) > killed_at for i in alive)

        async def moved_on() -> bool:
            r = await _rollout(admins, alive)
            return bool(r.step > 2 or r.state != "running")

        async def done() -> bool:
            return bool((await _rollout(admins, alive)).state != "running")

        async def all_moved() -> bool:
            return all(d.failover_s is not None for d in victims)

        lead_t = await _until(new_leader, timeout)
        moved_t = await _until(moved_on, timeout, 0.1)
        done_t = await _until(done, timeout, 0.1)
        await _until(all_moved, timeout)
        final = await _rollout(admins, alive)
    finally:
        stop.set()
        for d in fleet:
            d.wake.set()
        await asyncio.gather(*loops, return_exceptions=True)
    times = [d.failover_s for d in victims if d.failover_s is not None]
    passed = [sum(1 for h in final.history if h.startswith(f"step {s} (") and " passed" in h)
              for s in (1, 2, 3)]
    nan = float("nan")
    return {
        "killed_replica": k, "victims": len(victims), "moved": len(times),
        "takeover_s": lead_t - killed_at if lead_t else nan,
        "rollout_moved_s": moved_t - killed_at if moved_t else nan,
        "rollout_done_s": done_t - killed_at if done_t else nan,
        "rollout_state": final.state, "steps_passed": passed,
        "failover_p50_s": _percentile(times, 0.5), "failover_p99_s": _percentile(times, 0.99),
        "failover_max_s": max(times, default=nan),
    }


def setup_label(replicas: int, postgresql: bool) -> str:
    """"" for the embedded default (one replica on SQLite), else e.g. ", 2 replicas on PG"."""
    if not postgresql:
        return ""
    return f", {replicas} replica{'s' if replicas > 1 else ''} on PostgreSQL"


def _rows(f: dict[str, Any], base_n: int, duration: float) -> list[dict[str, Any]]:
    n = f["devices"]
    small = f"{base_n} devices"
    at = setup_label(f["replicas"], f["postgresql"])

    def ratio(a: float, b: float) -> float:
        return round(a / b, 2) if b else float("nan")

    return [
        {"name": f"fleet heartbeat p50 ({n} agents + telemetry{at})", "unit": "ms",
         "figure": round(f["hb_p50_ms"], 2), "baseline": round(f["hb_base_p50_ms"], 2),
         "baseline_name": small, "ratio": ratio(f["hb_p50_ms"], f["hb_base_p50_ms"]),
         "target": "-", "pass": None},
        {"name": f"fleet heartbeat p99 ({n} agents + telemetry{at})", "unit": "ms",
         "figure": round(f["hb_p99_ms"], 2), "baseline": round(f["hb_base_p99_ms"], 2),
         "baseline_name": small, "ratio": ratio(f["hb_p99_ms"], f["hb_base_p99_ms"]),
         "target": "p99 < 100 ms", "pass": f["hb_p99_ms"] < 100 and f["errors"] == 0},
        {"name": f"fleet telemetry accepted ({n} agents{at})", "unit": "rec/s",
         "figure": round(f["records_per_s"]), "baseline": round(f["offered_per_s"]),
         "baseline_name": "offered by the devices",
         "ratio": ratio(f["records_per_s"], f["offered_per_s"]),
         "target": ">= 20000 rec/s", "pass": f["records_per_s"] >= 20000},
        {"name": f"release fan-out to {n} open Sync streams{at and ' (' + at[2:] + ')'}",
         "unit": "s",
         "figure": round(f["fanout_s"], 3), "baseline": round(f["fanout_base_s"], 3),
         "baseline_name": small, "ratio": ratio(f["fanout_s"], f["fanout_base_s"]),
         "target": "all within 10 s", "pass": f["fanout_s"] <= 10 and f["fanout_late"] == 0},
        {"name": f"control-plane CPU, cores busy ({n} agents, {duration:g} s{at})",
         "unit": "cores",
         "figure": round(f["cp_cores"], 2), "baseline": round(f["cp_base_cores"], 2),
         "baseline_name": small, "ratio": ratio(f["cp_cores"], f["cp_base_cores"]),
         "target": "-", "pass": None},
        {"name": f"control-plane peak RSS ({n} agents{at})", "unit": "MiB",
         "figure": round(f["peak_rss"] / 2**20, 1), "baseline": round(f["idle_rss"] / 2**20, 1),
         "baseline_name": "idle, just started", "ratio": ratio(f["peak_rss"], f["idle_rss"]),
         "target": "-", "pass": None},
    ] + (_failover_rows(f) if "takeover_s" in f else [])


def _failover_rows(f: dict[str, Any]) -> list[dict[str, Any]]:
    """The failover figures: the scheduler's move against one tick (a survivor takes the lock
    on its next tick), the agents' against the agent's first backoff window."""
    tick, window = f["tick_s"], AGENT_BACKOFF[0]
    at = f", {f['replicas']} replicas on PostgreSQL"
    ok = f["rollout_state"] == "completed" and f["steps_passed"] == [1, 1, 1]
    return [
        {"name": f"scheduler takeover after SIGKILL of its replica ({f['devices']} agents{at})",
         "unit": "s", "figure": round(f["takeover_s"], 2), "baseline": tick,
         "baseline_name": "one scheduler tick", "ratio": round(f["takeover_s"] / tick, 2),
         "target": "within 10 s, rollout completes, each step once",
         "pass": bool(f["takeover_s"] <= 10 and ok)},
        {"name": f"staged rollout moves on after that kill ({f['devices']} agents{at})",
         "unit": "s", "figure": round(f["rollout_moved_s"], 2), "baseline": tick,
         "baseline_name": "one scheduler tick",
         "ratio": round(f["rollout_moved_s"] / tick, 2), "target": "-", "pass": None},
        {"name": f"agent failover p50 ({f['victims']} agents of the killed replica{at})",
         "unit": "s", "figure": round(f["failover_p50_s"], 3), "baseline": window,
         "baseline_name": "the agent's first backoff window",
         "ratio": round(f["failover_p50_s"] / window, 2), "target": "-", "pass": None},
        {"name": f"agent failover p99 ({f['victims']} agents of the killed replica{at})",
         "unit": "s", "figure": round(f["failover_p99_s"], 3), "baseline": window,
         "baseline_name": "the agent's first backoff window",
         "ratio": round(f["failover_p99_s"] / window, 2),
         "target": "all moved within 10 s",
         "pass": bool(f["moved"] == f["victims"] and f["failover_max_s"] <= 10)},
    ]


def _print(rows: list[dict[str, Any]]) -> None:
    table = [("benchmark", "figure", "baseline", "ratio", "target", "pass")] + [
        (r["name"], f'{r["figure"]} {r["unit"]}', f'{r["baseline"]} {r["unit"]}',
         f'{r["ratio"]}x', r["target"], {True: "PASS", False: "FAIL", None: "-"}[r["pass"]])
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(6)]
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--devices", type=int, default=1000, help="simulated agents")
    p.add_argument("--duration", type=float, default=10.0,
                   help="seconds of each fleet phase (heartbeats, then ingest)")
    p.add_argument("--interval", type=float, default=10.0,
                   help="heartbeat interval, seconds (the control plane's default: 10)")
    p.add_argument("--batch", type=int, default=5,
                   help="telemetry records after each heartbeat in the heartbeat phase")
    p.add_argument("--ingest-batch", type=int, default=500,
                   help="records per batch in the ingest phase (the agent's batch size)")
    p.add_argument("--replicas", type=int, default=1,
                   help="control-plane serve processes sharing the database (default 1)")
    p.add_argument("--database", default="", metavar="URL",
                   help="a PostgreSQL server (postgresql://USER@HOST:PORT/DB): the bench creates "
                        "its own database there and drops it at the end; 'pg' for "
                        f"{DEFAULT_PG} (EDGEFLEET_BENCH_DATABASE); default: SQLite")
    p.add_argument("--failover", action="store_true",
                   help="then SIGKILL the scheduler's replica mid staged rollout (>= 2 replicas)")
    p.add_argument("--failover-interval", type=float, default=2.0,
                   help="heartbeat interval of the failover phase, seconds")
    p.add_argument("--tick", type=float, help="scheduler tick, seconds (default: the config's)")
    p.add_argument("--bundle", type=Path, help="a trained bundle (default: train a tiny one)")
    p.add_argument("--out", type=Path, help="write the rows and figures as JSON here")
    args = p.parse_args(argv)
    database = {"pg": DEFAULT_PG, "sqlite": ""}.get(args.database, args.database)
    if database and not database.startswith("postgresql://"):
        print(f"error: --database {args.database!r} is not a PostgreSQL URL (hint: "
              "postgresql://USER@HOST:PORT/DB, 'pg', or leave it out for SQLite)", file=sys.stderr)
        return 2
    if args.replicas > 1 and not database:
        print("error: several replicas share a PostgreSQL database (hint: add --database pg)",
              file=sys.stderr)
        return 2
    if args.failover and args.replicas < 2:
        print("error: --failover kills one of several replicas (hint: --replicas 2)",
              file=sys.stderr)
        return 2
    if database and (why := pg_reachable(database)):
        print(f"error: PostgreSQL at {database} does not answer: {why} (hint: start it, or "
              "leave out --database for SQLite)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        result = bench_fleet(Path(tmp), devices=args.devices, duration=args.duration,
                             interval=args.interval, batch=args.batch,
                             ingest_batch=args.ingest_batch, replicas=args.replicas,
                             database=database, failover=args.failover,
                             failover_interval=args.failover_interval, tick=args.tick,
                             bundle=args.bundle)
    _print(result.rows)
    keys = ["enroll_s", "heartbeats", "records_per_s_light", "ingest_hb_p99_ms",
            "fanout_call_s", "gen_cores", "gen_ingest_cores", "cp_ingest_cores", "db_cores",
            "db_ingest_cores", "errors"]
    if args.failover:
        keys += ["victims", "moved", "takeover_s", "rollout_moved_s", "rollout_done_s",
                 "failover_p50_s", "failover_p99_s", "failover_max_s"]
    for key in keys:
        print(f"{key}: {result.figures[key]:.3g}")
    if args.failover:
        print(f"rollout: {result.figures['rollout_state']}, steps passed "
              f"{result.figures['steps_passed']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine_info(), "results": result.rows,
                                        "figures": result.figures, "time": time.time()},
                                       indent=2))
    return 1 if any(r["pass"] is False for r in result.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
