"""Fleet scale: one control-plane process, many simulated agents speaking the real protocol.

``python -m scripts.bench_fleet [-n 1000] [--duration 10]`` starts a real ``control-plane
serve`` child process (so its CPU and memory are read from ``/proc/<pid>``), enrolls N devices
through the real one-time-token + CSR flow (tokens from the AdminService, an EC P-256 key and a
CSR per device, ``Enroll`` on the enrollment port, 32 at a time), and then runs every device in
this one asyncio process: each has its own grpc.aio channel (its own TCP + TLS connection) with
its own client certificate and holds an open ``Sync`` stream throughout. Then, in order:

1. baseline phase: 10 devices heartbeat every 0.5 s for 5 s, each heartbeat followed by a
   small ``TelemetryBatch`` (as the agent sends its outbox after each heartbeat);
2. heartbeat phase: all N devices heartbeat at the control plane's default interval (10 s:
   100 heartbeats/s at N=1000; ``--interval 2`` for 5x that) for ``--duration`` seconds, each
   followed by a 5-record batch;
3. ingest phase: within ``--duration`` seconds every device sends one 500-record batch (the
   agent's batch size) after a heartbeat: N x 500 records offered over the window;
4. fan-out: two versions of a tiny digits bundle are published; a rollout of v1 to the 10
   baseline devices, then of v2 to all N, each timed from the ``StartRollout`` call until the
   last device's ``Sync`` stream delivered its signed release (each verified afterwards
   against the control plane's release key and the device id, and checked to name the version).

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
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from edgefleet.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc, common_pb2

from fleetcore import pki
from fleetcore.archive import pack_bundle
from fleetcore.release import SignedRelease, reverify_release
from scripts.machine import machine_info
from scripts.procs import Child, run
from tests.trainer_support import write_pipeline
from trainer.bundle import sign_bundle
from trainer.config import Pipeline
from trainer.pipeline import Run, Workdir

__all__ = ["FleetResult", "bench_fleet", "main"]

RPC_TIMEOUT = 60.0
ENROLL_CONCURRENCY = 32
PUBLISH_CHUNK = 1024 * 1024
BASE_LABEL, FLEET_LABEL = "base", "fleet"
_CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]  # one connection per device


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


@dataclass
class FleetResult:
    rows: list[dict[str, Any]]
    devices: list[SimDevice]
    figures: dict[str, float]


# ---------------------------------------------------------------------------- /proc readings
class ProcStats:
    """CPU seconds and memory of a process from /proc (Linux)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.tick = os.sysconf("SC_CLK_TCK")

    def cpu_seconds(self) -> float:
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / self.tick  # utime + stime

    def memory(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0


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
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                dev.errors.append(f"sync: {exc.code().name}")

    dev.sync_task = asyncio.create_task(receive())


_ARM_STATS = json.dumps({"model": "digits", "version": 1, "requests": 120, "errors": 0,
                         "p50_ms": 0.4, "p95_ms": 0.9, "labelled": 12, "correct": 11},
                        sort_keys=True, separators=(",", ":")).encode()


def _drift(now: float) -> bytes:
    return json.dumps({"model": "digits", "version": 1, "start": now - 60, "end": now,
                       "rows": 500, "score": 0.05, "drifted": False, "prediction_psi": 0.01,
                       "drifted_features": []}, sort_keys=True, separators=(",", ":")).encode()


def _batch(dev: SimDevice, size: int) -> agent_pb2.TelemetryBatch:
    now = time.time()
    records = []
    for k in range(size):
        dev.seq += 1
        kind, payload = ("drift", _drift(now)) if k == 0 else ("arm_stats", _ARM_STATS)
        records.append(agent_pb2.TelemetryRecord(seq=dev.seq, kind=kind, created_at=now,
                                                 payload=payload))
    return agent_pb2.TelemetryBatch(records=records, dropped=0, depth=0)


async def _device_loop(dev: SimDevice, stop_at: float, interval: float, batch: int) -> None:
    """Heartbeat every ``interval`` (first one at a random offset), telemetry after each."""
    loop = asyncio.get_running_loop()
    request = agent_pb2.HeartbeatRequest(agent_version="bench-sim", uptime_seconds=1)
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
    bundle: Path | None = None,
    progress: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> FleetResult:
    """Run the fleet benchmark in ``work``; return the table rows and the raw figures."""
    work.mkdir(parents=True, exist_ok=True)
    _raise_fd_limit()
    home = work / "cp"
    run("control-plane", "init", "--home", str(home))
    publisher_key = home / "publisher" / "publisher.key"
    t_train = time.perf_counter()
    source = bundle or _train_bundle(work / "bundle", publisher_key)
    v1 = _resign(source, work / "v1", 1, publisher_key)
    v2 = _resign(source, work / "v2", 2, publisher_key)
    progress(f"fleet: bundles ready ({time.perf_counter() - t_train:.1f} s)")
    cp = Child("control-plane", "control-plane", "serve", "--home", str(home),
               "--api", "127.0.0.1:0", "--enroll", "127.0.0.1:0", log=work / "control-plane.log")
    try:
        api = cp.expect(r"api \(mTLS\) listening on (\S+)").group(1)
        enroll = cp.expect(r"enrollment .* listening on (\S+)").group(1)
        # Not asyncio.run: grpc.aio's poller thread keeps calling into the loop after the
        # channels close, and a closed loop turns each call into a logged traceback.
        loop = asyncio.new_event_loop()
        return loop.run_until_complete(_bench(
            home, api, enroll, ProcStats(cp.proc.pid), work, v1, v2, devices=devices,
            duration=duration, interval=interval, batch=batch, ingest_batch=ingest_batch,
            baseline_devices=min(baseline_devices, devices), baseline_interval=baseline_interval,
            baseline_duration=min(baseline_duration, duration), fanout_timeout=fanout_timeout,
            progress=progress))
    finally:
        cp.stop()


async def _bench(home: Path, api: str, enroll: str, proc: ProcStats, work: Path, v1: Path,
                 v2: Path, *, devices: int, duration: float, interval: float, batch: int,
                 ingest_batch: int, baseline_devices: int, baseline_interval: float,
                 baseline_duration: float, fanout_timeout: float,
                 progress: Callable[[str], None]) -> FleetResult:
    idle_rss = proc.memory("VmRSS")
    admin_channel = grpc.aio.secure_channel(api, _admin_credentials(home))
    admin = admin_pb2_grpc.AdminServiceStub(admin_channel)
    ca_pem = (home / "operators" / "admin" / "ca.pem").read_bytes()
    fleet: list[SimDevice] = []
    try:
        t0 = time.perf_counter()
        fleet = await _enroll_fleet(admin, enroll, ca_pem, devices, baseline_devices)
        enroll_s = time.perf_counter() - t0
        progress(f"fleet: enrolled {devices} devices in {enroll_s:.1f} s")
        t0 = time.perf_counter()
        sem = asyncio.Semaphore(64)

        async def connect(d: SimDevice) -> None:
            async with sem:
                await _open_sync(d, api)

        await asyncio.gather(*(connect(d) for d in fleet))
        progress(f"fleet: {devices} Sync streams open in {time.perf_counter() - t0:.1f} s")
        small = fleet[:baseline_devices]
        base = await _phase(small, baseline_duration, baseline_interval, batch, proc)
        progress(f"fleet: baseline phase, {len(small)} devices: {len(base.latencies)} beats")
        full = await _phase(fleet, duration, interval, batch, proc)
        progress(f"fleet: heartbeat phase, {devices} devices: {len(full.latencies)} beats, "
                 f"{full.acked} records acknowledged")
        # Telemetry ingest: each device sends one agent-sized batch within the phase.
        ingest = await _phase(fleet, duration, duration, ingest_batch, proc)
        progress(f"fleet: ingest phase, {devices} devices: {ingest.acked} records acknowledged "
                 f"in {ingest.seconds:.1f} s")
        await _publish(admin, v1, work)
        await _publish(admin, v2, work)
        fan_base, _, late_base = await _fan_out(admin, small, 1, {"bench": BASE_LABEL},
                                                fanout_timeout)
        fan_full, call_full, late_full = await _fan_out(admin, fleet, 2, {}, fanout_timeout)
        progress(f"fleet: fan-out to {devices} in {fan_full:.2f} s "
                 f"(StartRollout call {call_full:.2f} s), {late_full} late")
        peak_rss = proc.memory("VmHWM")
    finally:
        for d in fleet:
            if d.channel is not None:
                await d.channel.close()
        await admin_channel.close()
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
        "errors": sum(len(d.errors) for d in fleet),
    }
    return FleetResult(_rows(figures, baseline_devices, duration), fleet, figures)


def _rows(f: dict[str, Any], base_n: int, duration: float) -> list[dict[str, Any]]:
    n = f["devices"]
    small = f"{base_n} devices"

    def ratio(a: float, b: float) -> float:
        return round(a / b, 2) if b else float("nan")

    return [
        {"name": f"fleet heartbeat p50 ({n} agents + telemetry)", "unit": "ms",
         "figure": round(f["hb_p50_ms"], 2), "baseline": round(f["hb_base_p50_ms"], 2),
         "baseline_name": small, "ratio": ratio(f["hb_p50_ms"], f["hb_base_p50_ms"]),
         "target": "-", "pass": None},
        {"name": f"fleet heartbeat p99 ({n} agents + telemetry)", "unit": "ms",
         "figure": round(f["hb_p99_ms"], 2), "baseline": round(f["hb_base_p99_ms"], 2),
         "baseline_name": small, "ratio": ratio(f["hb_p99_ms"], f["hb_base_p99_ms"]),
         "target": "p99 < 100 ms", "pass": f["hb_p99_ms"] < 100 and f["errors"] == 0},
        {"name": f"fleet telemetry accepted ({n} agents)", "unit": "rec/s",
         "figure": round(f["records_per_s"]), "baseline": round(f["offered_per_s"]),
         "baseline_name": "offered by the devices",
         "ratio": ratio(f["records_per_s"], f["offered_per_s"]),
         "target": ">= 20000 rec/s", "pass": f["records_per_s"] >= 20000},
        {"name": f"release fan-out to {n} open Sync streams", "unit": "s",
         "figure": round(f["fanout_s"], 3), "baseline": round(f["fanout_base_s"], 3),
         "baseline_name": small, "ratio": ratio(f["fanout_s"], f["fanout_base_s"]),
         "target": "all within 10 s", "pass": f["fanout_s"] <= 10 and f["fanout_late"] == 0},
        {"name": f"control-plane CPU, cores busy ({n} agents, {duration:g} s)", "unit": "cores",
         "figure": round(f["cp_cores"], 2), "baseline": round(f["cp_base_cores"], 2),
         "baseline_name": small, "ratio": ratio(f["cp_cores"], f["cp_base_cores"]),
         "target": "-", "pass": None},
        {"name": f"control-plane peak RSS ({n} agents)", "unit": "MiB",
         "figure": round(f["peak_rss"] / 2**20, 1), "baseline": round(f["idle_rss"] / 2**20, 1),
         "baseline_name": "idle, just started", "ratio": ratio(f["peak_rss"], f["idle_rss"]),
         "target": "-", "pass": None},
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
    p.add_argument("--bundle", type=Path, help="a trained bundle (default: train a tiny one)")
    p.add_argument("--out", type=Path, help="write the rows and figures as JSON here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = bench_fleet(Path(tmp), devices=args.devices, duration=args.duration,
                             interval=args.interval, batch=args.batch,
                             ingest_batch=args.ingest_batch, bundle=args.bundle)
    _print(result.rows)
    for key in ("enroll_s", "heartbeats", "records_per_s_light", "ingest_hb_p99_ms",
                "fanout_call_s", "gen_cores", "errors"):
        print(f"{key}: {result.figures[key]:.3g}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine_info(), "results": result.rows,
                                        "figures": result.figures, "time": time.time()},
                                       indent=2))
    return 1 if any(r["pass"] is False for r in result.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
