"""What OpenTelemetry costs, on against off in the same run (docs/observability.md):

* the control plane's heartbeat path with OTel off, then on (the fleet's metrics exported every
  second and logs bridged to a real OTLP receiver on 127.0.0.1), same machine, same calls;
* a call that carries a traceparent (a server span each) against the same call without one, on
  the control plane with OTel on;
* the agent process's resident memory after its tracing hooks start, with OTel off (nothing is
  imported) and on (the SDK and the OTLP exporters are);
* the agent's inference over HTTP (p50 and throughput of sequential requests on one keep-alive
  connection) with inference spans off, on at ``inference_sample_ratio`` 0 (the default: the
  front end's one attribute check) and on at ratio 1.0 (a span for every request, exported).

Run alone: ``python -m scripts.bench_otel``; ``make bench`` includes it.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from edgefleet.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc

from control_plane.config import ControlPlaneConfig
from control_plane.ops.home import init_home
from control_plane.server import ControlPlane
from edge_agent.enroll import enroll
from edge_agent.state import StateDir
from fleetcore.otel import new_traceparent
from scripts.otlp_receiver import OtlpReceiver

__all__ = ["bench_otel"]

REPO = Path(__file__).resolve().parent.parent


def _p50(call: Callable[[], Any], n: int) -> float:
    for _ in range(min(50, n)):
        call()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _heartbeats(work: Path, otel: dict[str, Any], n: int) -> tuple[float, float]:
    """(p50 of a heartbeat, p50 of a heartbeat carrying a traceparent), in seconds."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def on_loop(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(60)

    cfg = ControlPlaneConfig(home=work, api_listen="127.0.0.1:0", enroll_listen="127.0.0.1:0")
    cfg.otel = otel
    cfg = init_home(work, config=cfg)
    cp = ControlPlane(cfg)
    on_loop(cp.start())
    try:
        admin = cfg.layout.operator_dir("admin")
        creds = grpc.ssl_channel_credentials((admin / "ca.pem").read_bytes(),
                                             (admin / "operator.key").read_bytes(),
                                             (admin / "operator.pem").read_bytes())
        with grpc.secure_channel(cp.api_address, creds) as ch:
            token = admin_pb2_grpc.AdminServiceStub(ch).CreateEnrollmentToken(
                admin_pb2.CreateEnrollmentTokenRequest()).token
        enroll(cp.enroll_address, token, cp.authority.ca_pem, work / "agent")
        s = StateDir(work / "agent")
        device = grpc.ssl_channel_credentials(s.ca.read_bytes(), s.key.read_bytes(),
                                              s.cert.read_bytes())
        with grpc.secure_channel(cp.api_address, device) as ch:
            stub = agent_pb2_grpc.AgentServiceStub(ch)
            request = agent_pb2.HeartbeatRequest(agent_version="bench")
            plain = _p50(lambda: stub.Heartbeat(request), n)
            parent = (("traceparent", new_traceparent()),)
            traced = _p50(lambda: stub.Heartbeat(request, metadata=parent), n)
    finally:
        on_loop(cp.stop(0))
        loop.call_soon_threadsafe(loop.stop)
    return plain, traced


_RSS = """
import gc
from edge_agent.tracing import AgentTracing
import edge_agent.daemon  # the agent's own imports
t = AgentTracing.start({}, "dev-bench", {"site": "bench"})
gc.collect()
rss = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
           if line.startswith("VmRSS:"))
print(rss, t.enabled)
"""


def _agent_rss(endpoint: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if endpoint:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
    out = subprocess.run([sys.executable, "-c", _RSS], cwd=REPO, env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out[1] == str(bool(endpoint)), out
    return int(out[0])


def _digits_bundle(work: Path) -> Path:
    """A small trained digits bundle (what the agent serves in the inference figures)."""
    from trainer.cli import keygen  # noqa: PLC0415
    from trainer.config import Pipeline  # noqa: PLC0415
    from trainer.pipeline import Run, Workdir  # noqa: PLC0415

    text = (REPO / "examples" / "pipelines" / "digits-mlp.toml").read_text()
    text = text.replace("hidden = [1024, 1024]", "hidden = [32]").replace("epochs = 20",
                                                                           "epochs = 3")
    work.mkdir(parents=True, exist_ok=True)
    (work / "tiny.toml").write_text(text)
    key, _ = keygen(work / "publisher")
    Run(Pipeline.load(work / "tiny.toml"), Workdir(work / "tiny"), publisher_key=key,
        progress=lambda m: None).run_all()
    return work / "tiny" / "bundle"


def _inference(work: Path, endpoint: str, n: int) -> dict[str, tuple[float, float]]:
    """{mode: (p50 seconds, requests per second)} of HTTP inference, one row per request, for
    spans off, on at ratio 0 and on at ratio 1.0; the same server and client throughout."""
    import httpx  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from edge_agent.serving import ServingCore, start_http  # noqa: PLC0415
    from edge_agent.tracing import AgentTracing  # noqa: PLC0415
    from fleetcore import otel as otel_setup  # noqa: PLC0415

    bundle = _digits_bundle(work)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def on_loop(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(60)

    core = ServingCore()
    core.set_model("digits", [(1, 1.0, False)], {1: bundle})
    http, port = on_loop(start_http(core, "127.0.0.1", 0))
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                        "data": np.zeros(64).tolist()}]}
    tracings = {mode: AgentTracing(otel_setup.start(otel_setup.OtelSettings.load(
        {"enabled": True, "endpoint": endpoint, "inference_sample_ratio": ratio}, {}),
        "edgefleet-agent")) for mode, ratio in (("ratio 0", 0.0), ("ratio 1", 1.0))}
    out: dict[str, tuple[float, float]] = {}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            def call() -> None:
                client.post("/v2/models/digits/infer", json=body).raise_for_status()

            for mode, spans in (("off", None), *((m, t.inference_spans())
                                                 for m, t in tracings.items())):
                core.spans = spans
                t0 = time.perf_counter()
                p50 = _p50(call, n)
                out[mode] = (p50, (n + min(50, n)) / (time.perf_counter() - t0))
    finally:
        for tracing in tracings.values():
            tracing.shutdown()
        on_loop(http.stop())
        core.close()
        loop.call_soon_threadsafe(loop.stop)
    return out


def bench_otel(work: Path, n: int = 1000) -> list[dict[str, Any]]:
    receiver = OtlpReceiver().start()
    try:
        off, _ = _heartbeats(work / "off", {}, n)
        on, traced = _heartbeats(work / "on", {"enabled": True, "endpoint": receiver.endpoint,
                                               "metric_interval_seconds": 1}, n)
        rss_off, rss_on = _agent_rss(""), _agent_rss(receiver.endpoint)
        infer = _inference(work / "inference", receiver.endpoint, 2 * n)
        spans = sum(1 for s in receiver.spans if s.name == "infer digits")
    finally:
        receiver.stop()
    (off_p50, off_rps), (zero_p50, zero_rps), (one_p50, one_rps) = (
        infer["off"], infer["ratio 0"], infer["ratio 1"])
    return [
        {"name": "heartbeat p50 with OpenTelemetry on (metrics 1/s, logs)", "unit": "ms",
         "figure": round(on * 1e3, 3), "baseline": round(off * 1e3, 3),
         "baseline_name": "the same control plane code with OpenTelemetry off",
         "ratio": round(on / off, 2), "target": "<= 1.25x", "pass": on / off <= 1.25},
        {"name": "traced heartbeat p50 (a server span per call)", "unit": "ms",
         "figure": round(traced * 1e3, 3), "baseline": round(on * 1e3, 3),
         "baseline_name": "the same call without a traceparent, OpenTelemetry on",
         "ratio": round(traced / on, 2), "target": "<= 1.5x", "pass": traced / on <= 1.5},
        {"name": "agent resident memory with OpenTelemetry on", "unit": "MiB",
         "figure": round(rss_on / 2**20, 1), "baseline": round(rss_off / 2**20, 1),
         "baseline_name": "the agent's imports with OpenTelemetry off (nothing of it loaded)",
         "ratio": round(rss_on / rss_off, 2), "target": "-", "pass": None},
        {"name": "agent HTTP inference p50, inference spans on at ratio 0", "unit": "ms",
         "figure": round(zero_p50 * 1e3, 3), "baseline": round(off_p50 * 1e3, 3),
         "baseline_name": "the same requests with OpenTelemetry off",
         "ratio": round(zero_p50 / off_p50, 2), "target": "<= 1.1x",
         "pass": zero_p50 / off_p50 <= 1.1},
        {"name": f"agent HTTP inference p50, a span per request (ratio 1.0; {spans} exported)",
         "unit": "ms", "figure": round(one_p50 * 1e3, 3), "baseline": round(off_p50 * 1e3, 3),
         "baseline_name": "the same requests with OpenTelemetry off",
         "ratio": round(one_p50 / off_p50, 2), "target": "-", "pass": None},
        *({"name": f"agent HTTP inference throughput, inference spans on at {mode}",
           "unit": "req/s", "figure": round(rps), "baseline": round(off_rps),
           "baseline_name": "sequential requests with OpenTelemetry off",
           "ratio": round(rps / off_rps, 2), "target": "-", "pass": None}
          for mode, rps in (("ratio 0", zero_rps), ("ratio 1.0", one_rps))),
    ]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        for row in bench_otel(Path(tmp)):
            print(f"{row['name']}: {row['figure']} {row['unit']} vs {row['baseline']} "
                  f"{row['unit']} ({row['baseline_name']}): {row['ratio']}x, target "
                  f"{row['target']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
