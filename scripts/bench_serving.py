"""Serving benchmarks for `make bench` (docs/design.md §9), each against a baseline in the same run.

* in-process predict path (ServingCore.infer) vs raw InferenceSession.run, on a tiny model and
  on a >= 100 µs model (the 1.1M-parameter digits MLP in fp32);
* HTTP throughput of the agent's server vs a minimal Starlette/uvicorn + ONNX Runtime app;
* gRPC ModelInfer p50 (one row, local) vs raw InferenceSession.run;
* resident memory of the agent's serving process with one model loaded vs Python +
  onnxruntime + one session;
* drift update cost per sample, rows one at a time and in batches of 64;
* the agent's resident memory after a burst of hostile requests vs its idle RSS
  (``bench_hostile_rss``).
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from edgefleet.v1 import grpc_predict_v2_pb2 as pb
from edgefleet.v1 import grpc_predict_v2_pb2_grpc as pb_grpc
from sklearn.datasets import load_digits

from scripts.bench_agent_serving import (
    bench_hostile_rss,
    bench_http,
    bench_inprocess,
    bench_update_cost,
    grpc_servers,
)
from trainer.onnx_tools import session

__all__ = ["bench_serving", "rss_rows"]

_RSS_SCRIPT = """
import sys, json, numpy as np
from pathlib import Path
bundle = Path(sys.argv[2])
x = np.zeros((1, 64), dtype=np.float32)
if sys.argv[1] == "baseline":
    import onnxruntime as ort
    s = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    s.run(None, {"input": x})
else:
    # What `edge-agent run` loads for this configuration (tests/test_agent_footprint.py checks
    # the same lists on a real agent): its entry point, its transport, the listeners it has.
    import asyncio, importlib
    import edge_agent.cli
    transport, listeners = sys.argv[3], sys.argv[4].split(",")
    importlib.import_module(f"edge_agent.transport.{transport}")
    from edge_agent.serving.core import ServingCore
    m = json.loads((bundle / "manifest.json").read_text())
    core = ServingCore()
    core.set_model(m["name"], [(m["version"], 1.0, False)], {m["version"]: bundle})
    core.infer(m["name"], x)
    async def serve():
        if "http" in listeners:
            from edge_agent.serving.http import start_http
            from edge_agent.serving.metrics import ServingMetrics
            await start_http(core, "127.0.0.1", 0, metrics=ServingMetrics(core))
        if "grpc" in listeners:
            from edge_agent.serving.grpc_server import start_grpc
            await start_grpc(core, "127.0.0.1", 0)
    with asyncio.Runner(loop_factory=edge_agent.cli.event_loop_factory("auto")) as runner:
        runner.run(serve())
for line in open("/proc/self/status"):
    if line.startswith("VmRSS:"):
        print(int(line.split()[1]) * 1024)
"""

# (row name, transport, listeners) of the agent configurations whose memory is measured.
RSS_CONFIGS = (
    ("MQTT agent serving HTTP", "mqtt", "http"),
    ("gRPC agent serving HTTP", "grpc", "http"),
    ("gRPC agent serving HTTP and gRPC", "grpc", "http,grpc"),
)


def _rss(kind: str, bundle: Path, *config: str) -> int:
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, kind, str(bundle), *config],
                         capture_output=True, text=True, timeout=120, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def rss_rows(big: Path, runs: int = 3) -> list[dict[str, Any]]:
    """Resident memory of each agent configuration with the 1.1M model loaded against the
    bare baseline, medians of ``runs`` interleaved pairs of fresh processes."""
    rows = []
    for what, transport, listeners in RSS_CONFIGS:
        pairs = [(_rss("agent", big, transport, listeners), _rss("baseline", big))
                 for _ in range(runs)]
        agent_rss = statistics.median(a for a, _ in pairs)
        base_rss = statistics.median(b for _, b in pairs)
        rows.append(_row(f"resident memory, one 1.1M-param model loaded, {what}",
                         agent_rss / 2**20, base_rss / 2**20, "MiB",
                         "python + onnxruntime + one session", "<= 1.3x",
                         agent_rss / base_rss <= 1.3))
    return rows


def _grpc_p50_us(bundle: Path, n: int = 2000) -> dict[str, float]:
    """p50 µs of one-row ModelInfer (raw contents) against a bare gRPC echo of the same bytes
    (a generic handler on a grpc.aio server: no protobuf either way) and a raw
    ``InferenceSession.run``, interleaved call by call. Both servers run in one process of
    their own (``bench_agent_serving serve-grpc``), as a client's would be: a client in the
    server's process contends for its GIL (measured: the servicer's 40 µs took 85 µs)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    x = np.zeros((1, 64), dtype=np.float32)
    request = pb.ModelInferRequest(model_name=manifest["name"], inputs=[
        pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 64])],
        raw_input_contents=[x.tobytes()])
    payload = request.SerializeToString()
    raw = session(bundle / "model.onnx")
    with grpc_servers(bundle) as (port, echo_port), \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel, \
            grpc.insecure_channel(f"127.0.0.1:{echo_port}") as echo_channel:
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        ping = echo_channel.unary_unary("/bench.Echo/Ping")
        calls = {"grpc": lambda: infer(request), "echo": lambda: ping(payload),
                 "raw": lambda: raw.run(None, {"input": x})}
        times: dict[str, list[float]] = {k: [] for k in calls}
        for call in calls.values():
            for _ in range(200):
                call()
        for _ in range(n):
            for key, call in calls.items():
                t0 = time.perf_counter()
                call()
                times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


def _row(name: str, figure: float, baseline: float, unit: str, baseline_name: str,
         target: str, ok: bool | None, ratio: float | None = None) -> dict[str, Any]:
    return {"name": name, "figure": round(figure, 2), "baseline": round(baseline, 2),
            "unit": unit, "baseline_name": baseline_name,
            "ratio": round(ratio if ratio is not None else figure / baseline, 3),
            "target": target, "pass": ok}


def bench_serving(tiny_bundle: Path, big_workdir: Path, work: Path) -> list[dict[str, Any]]:
    """``tiny_bundle``: a small model's bundle; ``big_workdir``: a digits-mlp trainer workdir."""
    big = work / "big-bundle"  # the fp32 1.1M-parameter model: a >= 100 µs model
    shutil.copytree(big_workdir / "bundle", big)
    shutil.copyfile(big_workdir / "compress" / "fp32.onnx", big / "model.onnx")
    rows = []
    tiny = bench_inprocess(tiny_bundle, n=20_000)
    rows.append(_row("in-process predict p50, tiny model", tiny["core_p50_us"],
                     tiny["raw_p50_us"], "us", "raw InferenceSession.run",
                     "<= raw + 15 us", tiny["overhead_us"] <= 15))
    large = bench_inprocess(big, n=3000)
    rows.append(_row("in-process predict p50, 1.1M-param fp32 model", large["core_p50_us"],
                     large["raw_p50_us"], "us", "raw InferenceSession.run", "<= 1.2x",
                     large["ratio"] <= 1.2))
    http = bench_http(tiny_bundle, seconds=9.0, concurrency=8,
                      kinds=("agent", "agent-plain", "starlette"))
    rows.append(_row("HTTP infer throughput, tiny model, 8 connections", http["agent_rps"],
                     http["starlette_rps"], "req/s", "minimal Starlette/uvicorn + ORT app",
                     ">= 1.0x", http["ratio"] >= 1.0))
    plain = "the agent on h11 + asyncio (the plain stack)"
    rows.append(_row("HTTP stack httptools + uvloop, tiny model, 8 connections",
                     http["agent_rps"], http["agent_plain_rps"], "req/s", plain, ">= 1.0x",
                     http["stack_ratio"] >= 1.0))
    one = bench_http(tiny_bundle, seconds=6.0, concurrency=1, kinds=("agent", "agent-plain"))
    rows.append(_row("HTTP stack httptools + uvloop, tiny model, 1 connection",
                     one["agent_rps"], one["agent_plain_rps"], "req/s", plain, ">= 1.0x",
                     one["stack_ratio"] >= 1.0))
    for connections in (1, 8, 32):  # dynamic batching, max 32 rows, no queue delay
        batched = bench_http(big, seconds=6.0, concurrency=connections,
                             kinds=("agent-batched", "agent"))
        rows.append(_row(f"HTTP dynamic batching, 1.1M-param model, {connections} "
                         f"connection{'s' if connections > 1 else ''}",
                         batched["agent_batched_rps"], batched["agent_rps"], "req/s",
                         "the same agent without batching", "-" if connections == 1
                         else ">= 1.0x", None if connections == 1
                         else batched["agent_batched_rps"] >= batched["agent_rps"]))
    large_http = bench_http(big, seconds=6.0, concurrency=8, kinds=("agent", "agent-plain"))
    rows.append(_row("HTTP stack httptools + uvloop, 1.1M-param model, 8 connections",
                     large_http["agent_rps"], large_http["agent_plain_rps"], "req/s", plain,
                     ">= 1.0x", large_http["stack_ratio"] >= 1.0))
    grpc_p50 = _grpc_p50_us(tiny_bundle)
    rows.append(_row("gRPC ModelInfer p50, tiny model", grpc_p50["grpc"], grpc_p50["echo"],
                     "us", "bare grpc.aio echo of the same request bytes", "-", None))
    rows.append(_row("gRPC ModelInfer p50 over the bare echo, tiny model",
                     grpc_p50["grpc"] - grpc_p50["echo"], grpc_p50["raw"], "us",
                     "raw InferenceSession.run (what the model itself takes)", "-", None))
    rows += rss_rows(big)
    hostile = bench_hostile_rss(tiny_bundle)
    rows.append(_row("resident memory after a hostile burst (1 MB ids, deep JSON, big bodies, "
                     "20k ids)", hostile["after_rss_mib"], hostile["idle_rss_mib"], "MiB",
                     "the same process idle", "<= 2x", hostile["ratio"] <= 2.0))
    profile = json.loads((big / "profile.json").read_text())
    data = np.tile(load_digits().data.astype(np.float32), (3, 1))
    for batch in (1, 64):
        cost = bench_update_cost(profile, data, batch)
        rows.append(_row(f"drift update per sample, batches of {batch}", cost, 2.0, "us",
                         "target", "<= 2 us", cost <= 2.0))
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m scripts.bench_serving rss BUNDLE [--runs 3]``: the resident-memory rows of
    ``make bench`` alone (BUNDLE: a bundle whose model.onnx is the 1.1M-param fp32 model)."""
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m scripts.bench_serving")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("rss")
    p.add_argument("bundle", type=Path)
    p.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    for row in rss_rows(args.bundle, args.runs):
        print(f"{row['name']}: {row['figure']} MiB vs {row['baseline']} MiB = "
              f"{row['ratio']}x (target {row['target']}: "
              f"{'pass' if row['pass'] else 'miss'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
