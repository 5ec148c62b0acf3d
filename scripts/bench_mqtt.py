"""MQTT figures for `make bench`: telemetry throughput and release fan-out through Mosquitto.

``python -m scripts.bench_mqtt [--records 100000] [--agents 1000]`` configures a real Mosquitto
with ``control-plane mqtt-config``, starts it, and runs the control plane (with its bridge) in
this process. Every baseline is measured in the same run, against the same broker:

* telemetry: ``--records`` records written to a device's SQLite outbox are sent by the agent's
  own ``TelemetrySender`` over its ``MqttTransport`` (batches of up to 500 records at QoS 1,
  deleted once the control plane's answer says they are stored) and timed until the control
  plane has stored every one; the median of 5 runs (the outbox filled again for each; at the
  default 100,000 records, the outbox's capacity, a run is mostly the steady state, where at
  20,000 the window's fill and drain weighed a fifth of it). Baseline:
  raw paho-mqtt publishing the same records at QoS 1 (one message per record, all PUBACKs
  awaited) from the same device certificate, before the bridge exists (so nobody consumes them).
  A second row compares with raw paho publishing the same 500-record batches (the median of
  5 runs: one lasts milliseconds), and a third the same batches from a raw paho publisher
  through the broker to a raw paho subscriber, the transport's own limit for what the path
  does (target: >= 0.5x, issue 18): measured right before each run of the path (the median of
  3 runs of it, with the bridge stopped), and judged by the median of the 5 pairs' ratios, so
  that each ratio compares the two at one speed of a shared machine. The agent runs in its
  own process (``--agent-state``, internal), as on a device, so its CPU is not the bridge's.
  Target: >= 0.8x of the per-record baseline.
* ``--stages``: the cost per record of each stage of that path, each timed alone.
* ``--loop-steps``: that path with the CPU and wall time per batch of each step on the
  control plane's event loop (``scripts/loop_steps.py``).
* ``--client``: the CPU a subscriber spends receiving one 45 KB message (a telemetry batch's
  size), ``fleetcore.mqtt_client`` against paho-mqtt's network thread, on a plain-TCP broker.
* release fan-out: ``--agents`` simulated agents (paho clients with their own enrolled device
  certificates, subscribed to their release topic) and a rollout to all of them; the figure is
  the time from the rollout call until the last one has received its signed release (each is
  verified afterwards). Baseline: the same fan-out to 10 agents. Target: all within 10 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import queue
import resource
import selectors
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from edgefleet.v1 import agent_pb2

from control_plane.config import ControlPlaneConfig
from control_plane.ops.home import init_home
from control_plane.ops.mqtt_config import write_broker_config
from control_plane.server import ControlPlane
from control_plane.storage import open_store
from edge_agent.reporting.outbox import Outbox
from edge_agent.reporting.telemetry import TelemetrySender, encode
from edge_agent.reporting.wire import frame_batch
from edge_agent.state import AgentConfig, StateDir
from edge_agent.transport.mqtt import MqttTransport
from fleetcore import pki
from fleetcore.mqtt_client import MqttClient
from fleetcore.mqtt_wire import Leaf, topic
from fleetcore.release import SignedRelease, verify_release
from scripts.broker import Mosquitto, said, start_mosquitto, start_plain_mosquitto
from tests.mqtt_support import free_port
from tests.support import LoopThread, RunningControlPlane
from tests.trainer_support import write_pipeline
from trainer.bundle import sign_bundle
from trainer.config import Pipeline
from trainer.pipeline import Run, Workdir

TIMEOUT = 120.0
RAW_REPEATS = 5
PATH_REPEATS = 5  # runs of the telemetry path, each paired with the raw pair; medians reported
RAW_PER_PAIR = 3  # runs of the raw pair in a pair (one lasts ~0.1 s): their median
# A run of the path: seconds, CPU seconds by process and by thread, batches a transaction.
PathRun = tuple[float, dict[str, float], dict[str, float], float]
SINGLE_MAX = 20_000


def _control_plane(work: Path, loop: LoopThread, database: str = "",
                   bridges: int = 1) -> tuple[RunningControlPlane, Mosquitto]:
    port = free_port()
    cfg = ControlPlaneConfig(home=work / "cp", api_listen="127.0.0.1:0",
                             enroll_listen="127.0.0.1:0", mqtt_url=f"mqtts://127.0.0.1:{port}",
                             database_url=database)
    # One device sends the whole run's records here: this measures the transport, so the
    # per-device telemetry quota (a flood guard, measured by scripts/bench_flood.py) is lifted.
    cfg.telemetry_burst_records = cfg.telemetry_records_per_second = 1e9
    cfg.telemetry_burst_bytes = cfg.telemetry_bytes_per_second = 1e12
    cfg = init_home(work / "cp", config=cfg)
    store = open_store(cfg.store_location)
    try:
        settings = write_broker_config(cfg, store, work / "broker", port=port, bind="127.0.0.1",
                                       fleet_size=2000, now=time.time(), bridges=bridges)
    finally:
        store.close()
    broker = start_mosquitto(settings)
    from fleetcore import operator_config  # noqa: PLC0415

    admin = operator_config.load(cfg.home / "operators/admin/fleet.toml")
    running = RunningControlPlane(home=cfg.home, cp=ControlPlane(cfg), loop=loop, admin=admin)
    running.transport, running.broker = "mqtt", broker
    return running, broker


def _tls(state: StateDir) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=state.ca.read_text())
    ctx.load_cert_chain(state.cert, state.key)
    return ctx


def _records(n: int) -> list[bytes]:
    return [encode({"where": "bench", "error": f"record {i:08d} " + "x" * 64}) for i in range(n)]


def no_delay(client: Any) -> None:
    """Nagle off on a connected raw paho client's socket (paho leaves it on), as
    ``fleetcore.mqtt_client`` has it on every connection: a small message behind a large
    unacknowledged one would otherwise wait ~40 ms for the peer's delayed ACK."""
    sock = client.socket()
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _paho_publisher(client_id: str, tls: ssl.SSLContext | None, port: int,
                    expected: int) -> tuple[mqtt.Client, threading.Event]:
    """A connected raw paho publisher (QoS 1, 100 in flight, Nagle off as the agent and the
    bridge have it) and an event set once ``expected`` PUBACKs came back."""
    done, acked = threading.Event(), [0]
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=mqtt.MQTTv5)
    if tls is not None:
        c.tls_set_context(tls)
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)

    def on_publish(*_: Any) -> None:
        acked[0] += 1
        if acked[0] == expected:
            done.set()

    c.on_publish = on_publish
    connected = threading.Event()
    c.on_connect = lambda *a: connected.set()
    c.connect("127.0.0.1", port)
    c.loop_start()
    connected.wait(TIMEOUT)
    no_delay(c)
    return c, done


def _raw_paho(state: StateDir, device: str, port: int, payloads: list[bytes],
              received: threading.Event | None = None) -> float:
    """Seconds for raw paho to publish ``payloads`` at QoS 1 and see every PUBACK (and, with
    ``received``, until that is set: a subscriber has them all)."""
    c, done = _paho_publisher(device, _tls(state), port, len(payloads))
    name = topic(device, Leaf.TELEMETRY)
    t0 = time.perf_counter()
    for p in payloads:
        c.publish(name, p, qos=1)
    if not done.wait(TIMEOUT):
        raise RuntimeError("raw paho: PUBACKs missing")
    if received is not None and not received.wait(TIMEOUT):
        raise RuntimeError("raw paho: the subscriber did not receive every message")
    elapsed = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    return elapsed


def _baselines(state: StateDir, device: str, port: int,
               payloads: list[bytes]) -> tuple[float, float, list[bytes]]:
    """Seconds for raw paho to move ``payloads``: a message each; in 500-record batches to
    nobody. And the batches (the raw pair's, to a subscriber, go with the path's runs)."""
    per_record = [agent_pb2.TelemetryRecord(seq=i + 1, kind="error", created_at=1.0,
                                            payload=p).SerializeToString()
                  for i, p in enumerate(payloads)]
    # A message a record is slow: at most SINGLE_MAX of them (a rate, whatever --records).
    raw_single = _raw_paho(state, device, port, per_record[:SINGLE_MAX]) * (
        len(per_record) / min(len(per_record), SINGLE_MAX))
    batches = [agent_pb2.TelemetryBatch(records=[
        agent_pb2.TelemetryRecord(seq=i + j + 1, kind="error", created_at=1.0, payload=p)
        for j, p in enumerate(payloads[i:i + 500])]).SerializeToString()
        for i in range(0, len(payloads), 500)]
    # A run of the batches lasts milliseconds: the median of several, or one stall of this
    # shared machine makes the baseline.
    raw_batched = statistics.median(
        _raw_paho(state, device, port, batches) for _ in range(RAW_REPEATS))
    return raw_single, raw_batched, batches


def _watch_stored(cp: RunningControlPlane, device: str, records: int, batches: int, *,
                  shared: bool) -> threading.Event:
    """An event set once the control plane has stored ``records`` records of ``device``:
    checked after each batch this process's bridge stored, or, when other processes' bridges
    store batches too (``shared``), by polling the count every 5 ms (its CPU is this
    process's)."""
    stored = threading.Event()
    assert cp.cp.bridge is not None
    if shared:
        def poll() -> None:  # one indexed query, not the four counts of _count
            while int(cp.cp.store._query(  # type: ignore[attr-defined]
                    "SELECT COALESCE(SUM(records), 0) FROM telemetry_segments"
                    " WHERE device_id = ?", (device,))[0][0]) < records:
                time.sleep(0.005)
            stored.set()

        threading.Thread(target=poll, daemon=True).start()
        return stored
    seen = [0]

    def counted(what: str, device_id: str) -> None:
        if what != "telemetry":
            return
        seen[0] += 1  # counting rows only once every batch could be there
        if seen[0] >= batches and _count(cp, device_id) >= records:
            stored.set()

    cp.cp.bridge.on_event = counted
    return stored


def _other_bridges(cp: RunningControlPlane, work: Path, bridges: int
                   ) -> list[subprocess.Popen[str]]:
    """``control-plane serve --bridge I`` for I in 2..``bridges``, each on a copy of the home
    (same database, same keys), returned once each has said its bridge is connected."""
    procs: list[subprocess.Popen[str]] = []
    for i in range(2, bridges + 1):
        home = work / f"cp-{i}"
        shutil.copytree(cp.home, home, ignore=shutil.ignore_patterns("serve.lock"))
        proc = subprocess.Popen(
            [sys.executable, "-m", "control_plane.cli", "serve", "--home", str(home),
             "--bridge", str(i), "--api", "127.0.0.1:0", "--enroll", "127.0.0.1:0"],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        procs.append(proc)
        said(proc, "MQTT bridge connected", f"bridge {i}")
    return procs


def bench_telemetry(work: Path, records: int, database: str = "",
                    bridges: int = 1) -> list[dict[str, Any]]:
    """``bridges`` > 1 (PostgreSQL only): that many control-plane processes share the device
    topics through the shared subscription, this one and ``serve --bridge I`` children."""
    if bridges > 1 and not database:
        raise SystemExit("error: --bridges needs --database postgresql://... (replicas "
                         "share one database)")
    loop = LoopThread()
    cp, broker = _control_plane(work, loop, database, bridges)
    others: list[subprocess.Popen[str]] = []
    try:
        # The device enrolls while the control plane runs; the baselines run with it stopped.
        loop.run(cp.cp.start())
        cfg = cp.enroll_agent(work / "agent")
        loop.run(cp.cp.stop(0))
        _forget_bridge_session(cp, broker.settings.port)
        state = StateDir(work / "agent")
        payloads = _records(records)
        raw_single, raw_batched, batches = _baselines(state, cfg.device_id,
                                                      broker.settings.port, payloads)
        runs, throughs = _paired_runs(cp, broker, loop, work, state, cfg.device_id, payloads,
                                      batches, bridges, others)
        ours, cpu, threads, group = sorted(runs, key=lambda run: run[0])[len(runs) // 2]
        pairs = [t / run[0] for run, t in zip(runs, throughs, strict=True)]
        raw_through = statistics.median(throughs)
        paired = statistics.median(pairs)
        assert _count(cp, cfg.device_id) == records * PATH_REPEATS
    finally:
        for other in others:
            other.terminate()
            other.wait(TIMEOUT)
        cp.stop()
        broker.stop()
        loop.close()
    rate, single, batched = records / ours, records / raw_single, records / raw_batched
    through = records / raw_through
    # CPU per record of each process on the path: what bounds the rate on this machine
    # (2 cores for the three of them), less sensitive to other load than the rate itself.
    # The control plane's threads that used a measurable share of it: its event loop (the
    # bridge's handling and its MQTT client, the services, an SQLite store's writes).
    busiest = sorted(((s, name) for name, s in threads.items() if s >= 0.05 * cpu[
        "control plane (bridge, services, store)"]), reverse=True)
    cpu.update({f"  of which thread {name}": s for s, name in busiest})
    cpu_rows = [{"name": f"CPU per record: {who}", "figure": round(s / records * 1e6, 2),
                 "baseline": "-", "unit": "us", "baseline_name": "-", "ratio": "-",
                 "target": "-", "pass": None} for who, s in cpu.items()]
    shared = f", {bridges} bridges sharing the topics" if bridges > 1 else ""
    return [*cpu_rows,
        {"name": f"MQTT telemetry outbox -> Mosquitto -> control plane ({records:,} records"
                 f"{shared}, median of {PATH_REPEATS} runs)",
         "figure": round(rate), "baseline": round(single), "unit": "records/s",
         "baseline_name": "raw paho QoS 1, one message per record, same broker",
         "ratio": round(rate / single, 2), "target": ">= 0.8x", "pass": rate / single >= 0.8},
        {"name": "MQTT telemetry vs raw paho QoS 1 with the same 500-record batches",
         "figure": round(rate), "baseline": round(batched), "unit": "records/s",
         "baseline_name": "raw paho QoS 1, same batches, nobody consuming",
         "ratio": round(rate / batched, 2), "target": "-", "pass": None},
        {"name": "MQTT telemetry vs raw paho QoS 1, same batches, to a raw subscriber "
                 f"(ratio: the median of {PATH_REPEATS} pairs' ratios)",
         "figure": round(rate), "baseline": round(through), "unit": "records/s",
         "baseline_name": "raw paho publisher -> Mosquitto -> raw paho subscriber, QoS 1",
         "ratio": round(paired, 2), "target": ">= 0.5x", "pass": paired >= 0.5,
         "note": "CPU per record in the two Python processes (the agent's outbox rows, "
                 "protobuf and its MQTT client; the bridge's parsing, checks and the segment "
                 "write) against paho alone on both ends (docs/mqtt.md)"},
        {"name": "  batches a store transaction (this process's bridge, the median run's "
                 "mean)", "figure": round(group, 1), "baseline": "-", "unit": "",
         "baseline_name": "-", "ratio": "-", "target": "-", "pass": None},
        {"name": "  each pair's ratio, in the order run", "figure": " ".join(
            f"{r:.2f}" for r in pairs), "baseline": "-", "unit": "", "baseline_name": "-",
         "ratio": "-", "target": "-", "pass": None},
    ]


def _paired_runs(cp: RunningControlPlane, broker: Mosquitto, loop: LoopThread, work: Path,
                 state: StateDir, device: str, payloads: list[bytes], batches: list[bytes],
                 bridges: int, others: list[subprocess.Popen[str]]
                 ) -> tuple[list[PathRun], list[float]]:
    """``PATH_REPEATS`` runs of the path (``_path_run``), each right after the raw pair's
    seconds for the same batches; ``others``: the extra bridges' processes, started here."""
    # The path and the raw pair in pairs, one right after the other: a pair's ratio is
    # measured at one speed of this shared machine (the raw pair alone moves by 1.5x
    # within minutes, which decided the ratio more than the path did).
    runs: list[PathRun] = []
    throughs: list[float] = []
    profile = None
    for k in range(PATH_REPEATS):
        if k and others:  # their bridges would store what the raw pair sends: measured once
            throughs.append(throughs[-1])
        else:
            if k:
                loop.run(cp.cp.stop(0))
                _forget_bridge_session(cp, broker.settings.port)
            # No bridge is subscribed: what the raw pair publishes reaches only its
            # subscriber.
            throughs.append(statistics.median(
                _raw_paho_through(cp, state, device, broker.settings.port, batches)
                for _ in range(RAW_PER_PAIR)))
            cp.restart()
            assert cp.cp.bridge is not None
            loop.run(asyncio.wait_for(cp.cp.bridge.connected.wait(), TIMEOUT))
            if not others:
                others += _other_bridges(cp, work, bridges)
        profile = profile or _profile_loop(loop)  # BENCH_CP_PROFILE=FILE: the loop's CPU
        if profile is not None:
            loop.run(_enable(profile))
        runs.append(_path_run(cp, broker, others, state, device, payloads,
                              len(batches), len(payloads) * (k + 1)))
        if profile is not None:  # the restarts between runs are not profiled
            loop.run(_disable(profile))
    if profile is not None:
        profile.dump_stats(os.environ["BENCH_CP_PROFILE"])
    return runs, throughs


def _path_run(cp: RunningControlPlane, broker: Mosquitto, others: list[subprocess.Popen[str]],
              state: StateDir, device: str, payloads: list[bytes], batches: int,
              total: int) -> PathRun:
    """One run of the path: ``payloads`` into the agent's outbox, sent by the agent's process
    until the control plane holds ``total`` records of ``device``. Its seconds, the CPU
    seconds of each process on the path and of each thread of this one, and the batches this
    process's bridge stored a transaction (the mean: its groups)."""
    stored = _watch_stored(cp, device, total, batches, shared=bool(others))
    with Outbox(state.outbox) as outbox:
        outbox.append_many([("error", p) for p in payloads], 1.0)
    cpu0 = time.process_time(), _cpu_of(broker.pid), [_cpu_of(o.pid) for o in others]
    threads0 = _threads_cpu()
    store = cp.cp.services.telemetry.store
    real = store.ingest_telemetry_many
    groups: list[int] = []  # the batches of each of this process's store transactions

    def counting(writes: Any, *args: Any, **kwargs: Any) -> None:
        groups.append(len(writes))
        real(writes, *args, **kwargs)

    store.ingest_telemetry_many = counting  # type: ignore[method-assign]
    try:
        ours, agent_cpu = _send_from_agent_process(state, stored)
    finally:
        del store.ingest_telemetry_many  # the class's again
    threads = {name: cpu - threads0.get(name, 0.0) for name, cpu in _threads_cpu().items()}
    cpu = {"control plane (bridge, services, store)": time.process_time() - cpu0[0],
           **{f"control plane, bridge {i + 2} (its own process)": _cpu_of(o.pid) - c0
              for i, (o, c0) in enumerate(zip(others, cpu0[2], strict=True))},
           "agent (outbox, encoding, MQTT client)": agent_cpu,
           "Mosquitto": _cpu_of(broker.pid) - cpu0[1]}
    return ours, cpu, threads, statistics.mean(groups) if groups else 0.0


def bench_stages(work: Path, records: int, database: str = "") -> list[dict[str, Any]]:
    """Cost per record of each stage of the path, each timed alone (no broker): where the
    time goes. ``--stages`` prints these rows."""
    from control_plane.api.convert import telemetry_from_proto  # noqa: PLC0415
    from control_plane.domain.telemetry import check_reports, derive, screen  # noqa: PLC0415
    from fleetcore.mqtt_wire import parse_message  # noqa: PLC0415

    loop = LoopThread()
    cp, broker = _control_plane(work, loop, database)
    rows: list[tuple[str, float]] = []
    try:
        loop.run(cp.cp.start())
        cfg = cp.enroll_agent(work / "agent")
        state = StateDir(work / "agent")
        payloads = _records(records)
        with Outbox(state.outbox) as outbox:
            t0 = time.perf_counter()
            outbox.append_many([("error", p) for p in payloads], 1.0)
            rows.append(("outbox append (agent)", time.perf_counter() - t0))
            t0 = time.perf_counter()
            read: list[tuple[list[int], bytes]] = []
            after = 0
            for _ in range(0, records, 500):
                read.append(outbox.next_batch(500, after=after))
                after = read[-1][0][-1]
            rows.append(("outbox read, 500 at a time, as stored batches (agent)",
                         time.perf_counter() - t0))
            t0 = time.perf_counter()
            wire = [agent_pb2.TelemetryBatch.FromString(frame_batch(body, 0, 0))
                    .SerializeToString() for _, body in read]
            rows.append(("batch message -> protobuf bytes (agent)", time.perf_counter() - t0))
            t0 = time.perf_counter()
            parsed = [telemetry_from_proto(parse_message(agent_pb2.TelemetryBatch, w))
                      for w in wire]
            if sum(map(len, parsed)) != records:
                raise RuntimeError("the control plane read fewer records than were sent: it "
                                   "does not read TelemetryBatch.columns")
            rows.append(("protobuf bytes -> checked columns (bridge)", time.perf_counter() - t0))
            t0 = time.perf_counter()
            prepared = []
            for batch in parsed:
                kept, _ = screen(cfg.device_id, batch)
                derived, problems = derive(cfg.device_id, kept)
                prepared.append((kept, check_reports(cfg.device_id, kept, derived, problems,
                                                     set(), 1.0)))
            rows.append(("screen + derive + check (telemetry service)",
                         time.perf_counter() - t0))
            store = cp.cp.services.telemetry.store
            t0 = time.perf_counter()
            for kept, derived in prepared:
                store.ingest_telemetry(cfg.device_id, kept, derived, 1.0, 0, 0)
            rows.append(("store write, one transaction a batch", time.perf_counter() - t0))
            t0 = time.perf_counter()
            for seqs, _ in read:
                outbox.ack(seqs)
            rows.append(("outbox delete of acknowledged seqs (agent)",
                         time.perf_counter() - t0))
    finally:
        cp.stop()
        broker.stop()
        loop.close()
    return [{"name": f"stage: {name}", "figure": round(s / records * 1e6, 2), "baseline": "-",
             "unit": "us/record", "baseline_name": "-", "ratio": "-", "target": "-",
             "pass": None} for name, s in rows]


def _profile_loop(loop: LoopThread) -> Any:
    """With ``BENCH_CP_PROFILE``, a CPU profile of the control plane's event loop thread
    (the bridge's handling, the services, the store's writes where they run on the loop)."""
    if not os.environ.get("BENCH_CP_PROFILE"):
        return None
    import cProfile  # noqa: PLC0415

    return cProfile.Profile(time.thread_time)


async def _enable(profile: Any) -> None:  # on the loop's thread: its profile
    profile.enable()


async def _disable(profile: Any) -> None:
    profile.disable()


def _threads_cpu() -> dict[str, float]:
    """CPU seconds each thread of this process has used, by its Python name (each thread's
    CPU clock: nanoseconds, not the 10 ms ticks of /proc)."""
    out = {}
    for t in threading.enumerate():
        with contextlib.suppress(OSError, TypeError):
            out[t.name] = time.clock_gettime(time.pthread_getcpuclockid(t.ident))  # type: ignore[arg-type]
    return out


def _cpu_of(pid: int) -> float:
    """CPU seconds (user + system) a running process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _send_from_agent_process(state: StateDir, stored: threading.Event) -> tuple[float, float]:
    """Seconds from ``go`` until the agent's process has sent its whole outbox (each batch
    acknowledged) and the control plane has stored every record."""
    # The agent in its own process, as on a device: its CPU is not the control plane's.
    agent = subprocess.Popen(
        [sys.executable, "-m", "scripts.bench_mqtt", "--agent-state", str(state.root)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert agent.stdin is not None and agent.stdout is not None
        if agent.stdout.readline().strip() != "ready":
            raise RuntimeError("the bench's agent process did not start")
        t0 = time.perf_counter()
        agent.stdin.write("go\n")
        agent.stdin.flush()
        if agent.stdout.readline().strip() != "done":
            raise RuntimeError("the bench's agent process failed")
        if not stored.wait(TIMEOUT):
            raise RuntimeError("telemetry missing at the control plane")
        ours = time.perf_counter() - t0
    finally:
        with contextlib.suppress(Exception):
            agent.stdin.close()  # type: ignore[union-attr]
        agent.wait(TIMEOUT)
    return ours, float(agent.stdout.readline() or "nan")


def _agent_process(state_dir: Path) -> int:
    """``--agent-state DIR``: the bench's agent, in its own process. Connects, says
    ``ready``, waits for ``go`` on stdin, sends the whole outbox with the agent's own
    ``TelemetrySender`` over its ``MqttTransport``, says ``done``."""
    state = StateDir(state_dir)
    config = AgentConfig.load(state)

    async def run() -> None:
        with Outbox(state.outbox) as outbox:
            transport = MqttTransport(config.mqtt_url, config.device_id, state)
            sender = TelemetrySender(outbox, max_batches=1000)
            transport._ensure_started()
            await asyncio.wait_for(transport._connected.wait(), TIMEOUT)
            print("ready", flush=True)
            await asyncio.to_thread(sys.stdin.readline)
            cpu0 = time.process_time()
            while outbox.stats().depth:
                await sender.send(transport)
            print("done", flush=True)
            busy = time.process_time() - cpu0
            await transport.close()
            print(busy, flush=True)  # CPU seconds it used, from "go" to "done"

    if os.environ.get("BENCH_AGENT_PROFILE"):  # where the agent's CPU goes (its event loop)
        import cProfile  # noqa: PLC0415

        profile = cProfile.Profile(time.process_time)  # CPU, not waiting
        profile.runcall(asyncio.run, run())
        profile.dump_stats(os.environ["BENCH_AGENT_PROFILE"])
    else:
        asyncio.run(run())
    return 0


def _raw_paho_through(cp: RunningControlPlane, state: StateDir, device: str, port: int,
                      payloads: list[bytes]) -> float:
    """``_raw_paho`` to a raw paho subscriber at QoS 1 (the bridge's certificate, a clean
    session), timed until it has received every message: the transport's own limit for what
    the telemetry path does (publisher -> broker -> subscriber), with no work on either end."""
    assert cp.cp.mqtt is not None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(cp.cp.mqtt.ca))
    ctx.load_cert_chain(cp.cp.mqtt.bridge_cert(cp.home), cp.cp.mqtt.bridge_key(cp.home))
    got, received, subscribed = [0], threading.Event(), threading.Event()

    def on_message(*_: Any) -> None:
        got[0] += 1
        if got[0] == len(payloads):
            received.set()

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.tls_set_context(ctx)
    sub.on_message = on_message
    sub.on_connect = lambda c, *a: c.subscribe(topic(device, Leaf.TELEMETRY), qos=1)
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.connect("127.0.0.1", port, clean_start=True)
    sub.loop_start()
    try:
        if not subscribed.wait(TIMEOUT):
            raise RuntimeError("raw paho subscriber: no SUBACK")
        no_delay(sub)
        return _raw_paho(state, device, port, payloads, received)
    finally:
        sub.disconnect()
        sub.loop_stop()


def _forget_bridge_session(cp: RunningControlPlane, port: int) -> None:
    """Connect as the bridge with a clean start and no session expiry: its queue is dropped,
    so what the baselines publish reaches nobody."""
    assert cp.cp.mqtt is not None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(cp.cp.mqtt.ca))
    ctx.load_cert_chain(cp.cp.mqtt.bridge_cert(cp.home), cp.cp.mqtt.bridge_key(cp.home))
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.tls_set_context(ctx)
    c.connect("127.0.0.1", port, clean_start=True)
    c.loop_start()
    c.disconnect()
    c.loop_stop()


def _count(cp: RunningControlPlane, device: str) -> int:
    return cp.cp.store.telemetry_counts()["telemetry"]  # the run's one device


class _SimAgent:
    """A paho client with an enrolled device's certificate, waiting for its release. Its
    network loop is ``_Multiplexer``'s one thread, shared by every simulated agent (a thread
    per client stopped scaling at a few hundred)."""

    def __init__(self, state: StateDir, device: str) -> None:
        self.device, self.state = device, state
        self.got = threading.Event()
        self.payload = b""
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device,
                                  protocol=mqtt.MQTTv5)
        self.client.tls_set_context(_tls(state))
        self.client.on_connect = lambda c, *a: c.subscribe(topic(device, Leaf.RELEASE), qos=1)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._message

    def _message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.payload and not self.got.is_set():
            self.payload = bytes(msg.payload)
            self.got.set()


class _Multiplexer:
    """One thread runs the network loop of many paho clients (paho's external-loop API:
    ``loop_read``/``loop_write``/``loop_misc`` driven by a selector)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.selector = selectors.DefaultSelector()
        self.pending: queue.Queue[_SimAgent] = queue.Queue()
        self.agents: list[_SimAgent] = []
        self.stopping = threading.Event()
        self.failed: list[str] = []
        self.thread = threading.Thread(target=self._run, name="mqtt-sims", daemon=True)
        self.thread.start()

    def add(self, agent: _SimAgent) -> None:
        self.pending.put(agent)

    def _connect_pending(self) -> None:
        while not self.pending.empty():
            agent = self.pending.get()
            try:
                agent.client.connect("127.0.0.1", self.port)  # TLS handshake, here
            except OSError as exc:
                self.failed.append(f"{agent.device}: {exc}")
                continue
            sock = agent.client.socket()
            if sock is not None:
                self.selector.register(sock, selectors.EVENT_READ, agent)
                self.agents.append(agent)

    def _run(self) -> None:
        last_misc = time.monotonic()
        while not self.stopping.is_set():
            self._connect_pending()
            for key, _ in self.selector.select(timeout=0.05):
                client = key.data.client
                client.loop_read()
                sock = client.socket()
                while sock is not None and getattr(sock, "pending", lambda: 0)() > 0:
                    client.loop_read()  # TLS records already decrypted into the buffer
            for agent in self.agents:
                if agent.client.want_write():
                    agent.client.loop_write()
            if time.monotonic() - last_misc > 1.0:
                for agent in self.agents:
                    agent.client.loop_misc()  # keepalive pings
                last_misc = time.monotonic()

    def close(self) -> None:
        for agent in self.agents:
            with contextlib.suppress(Exception):
                agent.client.disconnect()
                agent.client.loop_write()
        self.stopping.set()
        self.thread.join(TIMEOUT)
        self.selector.close()


def bench_fanout(work: Path, agents: int, base: int = 10) -> list[dict[str, Any]]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # a socket per simulated agent here, and one each in the broker (a child)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = LoopThread()
    cp, broker = _control_plane(work, loop)
    mux = _Multiplexer(broker.settings.port)
    try:
        loop.run(cp.cp.start())
        assert cp.cp.bridge is not None
        loop.run(asyncio.wait_for(cp.cp.bridge.connected.wait(), TIMEOUT))
        key = cp.home / "publisher" / "publisher.key"
        pipeline = write_pipeline(work, hidden="32", epochs=2, prune=0.25)
        Run(Pipeline.load(pipeline), Workdir(work / "train"), publisher_key=key,
            progress=lambda m: None).run_all()
        bundle = work / "train" / "bundle"
        from fleet.cli import main as fleet_cli  # noqa: PLC0415

        def fleet(args: list[str]) -> int:
            with contextlib.redirect_stdout(io.StringIO()):
                return fleet_cli(args)

        conf = str(cp.home / "operators/admin/fleet.toml")
        assert fleet(["--config", conf, "--api", cp.api, "models", "publish", str(bundle)]) == 0
        v2 = work / "v2"
        shutil.copytree(bundle, v2)
        manifest = json.loads((v2 / "manifest.json").read_text())
        manifest["version"] = 2
        (v2 / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        sign_bundle(v2, key)
        assert fleet(["--config", conf, "--api", cp.api, "models", "publish", str(v2)]) == 0
        release_key = pki.load_public_key(cp.cp.authority.release_public_pem)
        timings = {}
        for label, n, version in (("base", base, 1), ("fleet", agents, 2)):
            group = []
            for i in range(n):
                cfg = cp.enroll_agent(work / f"{label}-{i}", labels={"bench": label})
                sim = _SimAgent(StateDir(work / f"{label}-{i}"), cfg.device_id)
                mux.add(sim)
                group.append(sim)
            for sim in group:
                if not sim.subscribed.wait(TIMEOUT):
                    raise RuntimeError(f"a simulated agent never subscribed {mux.failed[:3]}")
            t0 = time.perf_counter()
            assert fleet(["--config", conf, "--api", cp.api, "rollouts", "start", "--model",
                          "digits", "--version", str(version), "--selector",
                          f"bench={label}"]) == 0
            for sim in group:
                if not sim.got.wait(TIMEOUT):
                    raise RuntimeError("a simulated agent never got its release")
            timings[label] = time.perf_counter() - t0
            for sim in group:  # every one is a valid signed release for that device
                from edgefleet.v1 import common_pb2  # noqa: PLC0415

                signed = common_pb2.SignedRelease.FromString(sim.payload)
                verify_release(SignedRelease(signed.document, signed.signature),
                               public_key=release_key, device_id=sim.device, now=time.time(),
                               trusted=None)
    finally:
        mux.close()
        cp.stop()
        broker.stop()
        loop.close()
    fleet_s, base_s = timings["fleet"], timings["base"]
    return [{"name": f"MQTT release fan-out to {agents} connected agents", "figure":
             round(fleet_s, 3), "baseline": round(base_s, 3), "unit": "s",
             "baseline_name": f"the same fan-out to {base} agents",
             "ratio": round(fleet_s / base_s, 2), "target": "all within 10 s",
             "pass": fleet_s < 10}]


def _publish_plain(port: int, payloads: int, size: int) -> None:
    """A raw paho publisher: ``payloads`` messages of ``size`` bytes at QoS 1, all acked."""
    c, done = _paho_publisher("bench-pub", None, port, payloads)
    body = os.urandom(size)
    for _ in range(payloads):
        c.publish("bench/x", body, qos=1)
    done.wait(TIMEOUT)
    c.disconnect()
    c.loop_stop()


def _paho_receives(port: int, payloads: int, size: int) -> float:
    """CPU seconds per message of a paho subscriber's network thread (QoS 1)."""
    got, all_in, subscribed, cpu = [0], threading.Event(), threading.Event(), [0.0, 0.0]

    def on_message(*_: Any) -> None:
        got[0] += 1
        if got[0] == 1:
            cpu[0] = time.thread_time()
        if got[0] == payloads:
            cpu[1] = time.thread_time()
            all_in.set()

    s = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-sub",
                    protocol=mqtt.MQTTv5)
    s.on_message = on_message
    s.on_connect = lambda c, *a: c.subscribe("bench/#", qos=1)
    s.on_subscribe = lambda *a: subscribed.set()
    s.connect("127.0.0.1", port)
    s.loop_start()
    subscribed.wait(TIMEOUT)
    _publish_plain(port, payloads, size)
    if not all_in.wait(TIMEOUT):
        raise RuntimeError("paho subscriber: messages missing")
    s.disconnect()
    s.loop_stop()
    return (cpu[1] - cpu[0]) / (payloads - 1)


def _client_receives(port: int, payloads: int, size: int) -> float:
    """CPU seconds per message of ``fleetcore.mqtt_client`` on its event loop (QoS 1)."""
    async def run() -> float:
        loop = asyncio.get_running_loop()
        all_in: asyncio.Future[float] = loop.create_future()
        got, cpu0 = [0], [0.0]

        def on_message(msg: Any) -> None:
            got[0] += 1
            if got[0] == 1:
                cpu0[0] = time.thread_time()
            if got[0] == payloads:
                all_in.set_result(time.thread_time() - cpu0[0])

        client = MqttClient("127.0.0.1", port, None, "bench-sub", on_message=on_message)
        client.start()
        await asyncio.wait_for(client.connected.wait(), TIMEOUT)
        await client.subscribe([("bench/#", 1)])
        publisher = loop.run_in_executor(None, _publish_plain, port, payloads, size)
        spent = await asyncio.wait_for(all_in, TIMEOUT)
        await publisher
        await client.close()
        return spent / (payloads - 1)

    return asyncio.run(run())


def bench_client(work: Path, payloads: int = 400, size: int = 45_000) -> list[dict[str, Any]]:
    """``--client``: what receiving one telemetry-sized message costs the subscriber,
    paho's network thread against ``fleetcore.mqtt_client`` on asyncio (median of 3 each,
    interleaved, the same raw paho publisher and a plain-TCP Mosquitto)."""
    port = free_port()
    proc = start_plain_mosquitto(work, port)
    try:
        paho_s, ours_s = [], []
        for _ in range(3):
            paho_s.append(_paho_receives(port, payloads, size))
            ours_s.append(_client_receives(port, payloads, size))
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)
    paho_us, ours_us = statistics.median(paho_s) * 1e6, statistics.median(ours_s) * 1e6
    return [{"name": f"MQTT client: receiving one {size:,}-byte message at QoS 1 (subscriber "
                     "CPU)", "figure": round(ours_us, 1), "baseline": round(paho_us, 1),
             "unit": "us", "baseline_name": "paho-mqtt's network thread, same messages",
             "ratio": round(ours_us / paho_us, 2), "target": "-", "pass": None}]


def bench_mqtt(work: Path, records: int = 100_000, agents: int = 1000,
               database: str = "", bridges: int = 1) -> list[dict[str, Any]]:
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        print("mosquitto is not installed: MQTT benchmarks skipped", file=sys.stderr)
        return []
    return [*bench_telemetry(work / "telemetry", records, database, bridges),
            *bench_fanout(work / "fanout", agents)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--stages", action="store_true",
                   help="print the cost per record of each stage of the telemetry path")
    p.add_argument("--database", default="",
                   help="postgresql://USER@HOST:PORT/DB for the control plane's store (an "
                        "empty database: its tables are created); default SQLite")
    p.add_argument("--bridges", type=int, default=1,
                   help="control-plane processes whose bridges share the device topics "
                        "(with --database)")
    p.add_argument("--client", action="store_true",
                   help="the subscriber's CPU per received message: fleetcore.mqtt_client "
                        "against paho-mqtt")
    p.add_argument("--loop-steps", action="store_true",
                   help="the telemetry path only, with the CPU and wall time per batch of "
                        "each step on the control plane's event loop (scripts/loop_steps.py)")
    p.add_argument("--agent-state", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.agent_state is not None:
        return _agent_process(args.agent_state)
    from scripts.bench import _print  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        if args.client:
            rows = bench_client(Path(tmp))
        elif args.stages:
            rows = bench_stages(Path(tmp), args.records, args.database)
        elif args.loop_steps:
            from scripts import loop_steps  # noqa: PLC0415

            with loop_steps.timed() as steps:
                rows = bench_telemetry(Path(tmp), args.records, args.database)
            rows += loop_steps.rows(steps, PATH_REPEATS * -(-args.records // 500))
        else:
            rows = bench_mqtt(Path(tmp), args.records, args.agents, args.database,
                              args.bridges)
    _print(rows)
    return 1 if any(r["pass"] is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
