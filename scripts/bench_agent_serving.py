"""Agent serving benchmarks for ``make bench`` (docs/design.md §9): ratios against a baseline in the
same run. Not shipped: this is a script, so the agent never carries Starlette.

* ``bench_inprocess``: p50 of ``ServingCore.infer`` against a bare ``InferenceSession.run`` on
  the same model and row (the same session options), measured in alternating blocks so that
  drift of a shared host hits both; also with an ``on_prediction`` hook and with a request id,
  which add the off-path queueing and the feedback log.
* ``bench_http``: requests/s of the agent's HTTP server against a minimal Starlette app on
  uvicorn with ONNX Runtime on the same model (the same session options: the stack is what is
  compared), and of the agent on its default stack (httptools + uvloop) against the plain one
  (h11 + asyncio), each in its own subprocess, driven by the same keep-alive load generator,
  alternating rounds.
* ``bench_session_options``: the ONNX Runtime thread/spinning table in
  ``edge_agent/serving/runtime.py``.
* ``bench_update_cost``: µs per row of the drift monitor (``edge_agent.reporting.drift``), fed
  in batches of a given size.
* ``bench_hostile_rss``: the agent's HTTP server process's resident memory after a burst of
  hostile requests (1 MB ids, deep JSON, bodies near and over the limit, ids at the limit that
  fill the feedback log) against its idle RSS, with a normal request's latency after the
  burst; in a subprocess of its own.

No thresholds here: callers compare against the targets. Command line::

    python -m scripts.bench_agent_serving inprocess BUNDLE_DIR [-n N]
    python -m scripts.bench_agent_serving http BUNDLE_DIR [--seconds S] [--concurrency C]
        [--kinds agent agent-plain starlette]
    python -m scripts.bench_agent_serving session-options MODEL.onnx [MODEL.onnx ...]
    python -m scripts.bench_agent_serving hostile BUNDLE_DIR
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from edge_agent.cli import event_loop_factory
from edge_agent.reporting.drift import DriftConfig, DriftMonitor
from edge_agent.serving.batching import policy as batch_policy
from edge_agent.serving.core import ServingCore
from edge_agent.serving.http import start_http
from edge_agent.serving.runtime import io_names, model_dims, onnx_session
from fleetcore.bundle import MANIFEST, MODEL_ONNX

REPO = Path(__file__).resolve().parent.parent

__all__ = ["bench_hostile_rss", "bench_http", "bench_inprocess", "bench_prepack",
           "bench_session_options",
           "bench_update_cost", "grpc_servers"]

_BLOCKS = 10
_HTTP_ROUNDS = 4  # alternating, so that a shared host's drift hits both servers


def _manifest(bundle_dir: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((Path(bundle_dir) / MANIFEST).read_text())
    return doc


def _row(manifest: dict[str, Any], rows: int = 1) -> np.ndarray:
    features, _ = model_dims(manifest)
    return np.random.default_rng(0).random((rows, features), dtype=np.float32) * 16


def _p50_us(calls: dict[str, Callable[[], Any]], n: int) -> dict[str, float]:
    """Median µs per call of each callable, timed in ``_BLOCKS`` interleaved blocks."""
    samples: dict[str, list[float]] = {k: [] for k in calls}
    for call in calls.values():
        for _ in range(min(n, 500)):
            call()
    per_block = max(1, n // _BLOCKS)
    clock = time.perf_counter
    for _ in range(_BLOCKS):
        for key, call in calls.items():
            out = samples[key]
            for _ in range(per_block):
                t0 = clock()
                call()
                out.append(clock() - t0)
    return {k: statistics.median(v) * 1e6 for k, v in samples.items()}


def bench_inprocess(bundle_dir: Path, n: int = 20_000) -> dict[str, Any]:
    """p50 µs of ``ServingCore.infer`` vs raw ``InferenceSession.run``, one row."""
    bundle_dir = Path(bundle_dir)
    manifest = _manifest(bundle_dir)
    name, version = manifest["name"], manifest["version"]
    x = _row(manifest)
    input_name, _ = io_names(manifest)
    session = onnx_session(bundle_dir / MODEL_ONNX)
    plain = ServingCore()
    hooked = ServingCore(on_prediction=lambda *_: None, on_result=lambda *_: None)
    try:
        for core in (plain, hooked):
            core.set_model(name, [(version, 1.0, False)], {version: bundle_dir})
        feed = {input_name: x}
        ids = iter(range(10**9))
        p50 = _p50_us({
            "raw": lambda: session.run(None, feed),
            "core": lambda: plain.infer(name, x),
            "core_hooks": lambda: hooked.infer(name, x),
            "core_request_id": lambda: plain.infer(name, x, request_id=str(next(ids))),
        }, n)
    finally:
        plain.close()
        hooked.close()
    return {
        "raw_p50_us": p50["raw"], "core_p50_us": p50["core"],
        "overhead_us": p50["core"] - p50["raw"], "ratio": p50["core"] / p50["raw"],
        "core_hooks_p50_us": p50["core_hooks"],
        "core_request_id_p50_us": p50["core_request_id"], "n": n,
    }


# ---------------------------------------------------------------------------- HTTP


def starlette_baseline(bundle_dir: Path) -> Starlette:
    """The minimal Starlette + ONNX Runtime v2 infer endpoint the agent is compared with."""
    manifest = _manifest(bundle_dir)
    input_name, output_name = io_names(manifest)
    session = onnx_session(Path(bundle_dir) / MODEL_ONNX)

    async def infer(request: Request) -> JSONResponse:
        doc = await request.json()
        tensor = doc["inputs"][0]
        x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        out = session.run(None, {input_name: x})[0]
        return JSONResponse({
            "model_name": request.path_params["name"], "model_version": str(manifest["version"]),
            "outputs": [{"name": output_name, "datatype": "FP32", "shape": list(out.shape),
                         "data": out.ravel().tolist()}],
        })

    return Starlette(routes=[Route("/v2/models/{name}/infer", infer, methods=["POST"])])


# Server kinds: the agent on its default stack (httptools and uvloop where installed), the
# agent on the plain stack (h11 and asyncio's loop), the minimal Starlette app.
# "agent-batched": the default stack with dynamic batching (max_batch_size 32, no queue delay:
# a batch holds what arrived while the previous one ran); "agent-batched-500us": waiting up to
# 500 µs for a batch to fill.
SERVER_KINDS = ("agent", "agent-plain", "agent-batched", "agent-batched-500us", "starlette")


def _serve_process(kind: str, bundle_dir: Path) -> None:
    factory = event_loop_factory("asyncio" if kind in ("agent-plain", "starlette") else "auto")
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve(kind, bundle_dir))


async def _serve(kind: str, bundle_dir: Path) -> None:
    if kind.startswith("agent"):
        manifest = _manifest(bundle_dir)
        core = ServingCore()
        core.set_model(manifest["name"], [(manifest["version"], 1.0, False)],
                       {manifest["version"]: bundle_dir})
        if kind.startswith("agent-batched"):
            core.set_batching(manifest["name"], batch_policy(
                32, 500 if kind.endswith("500us") else 0))
        _, port = await start_http(core, "127.0.0.1", 0,
                                   parser="h11" if kind == "agent-plain" else "auto")
        print(f"PORT {port}", flush=True)
        await asyncio.Event().wait()
    config = uvicorn.Config(starlette_baseline(bundle_dir), host="127.0.0.1", port=0,
                            lifespan="off", access_log=False, log_level="warning",
                            server_header=False)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:  # a benchmark helper process: polling its own flag is fine
        await asyncio.sleep(0.01)
    print(f"PORT {server.servers[0].sockets[0].getsockname()[1]}", flush=True)
    await task


async def _echo(request: bytes, context: Any) -> bytes:
    return request


async def _serve_grpc(bundle_dir: Path) -> None:
    """The agent's gRPC server and a bare echo server (a generic handler, bytes in and out) on
    one loop, in one process: ``PORT agent echo``."""
    import grpc  # noqa: PLC0415 (only this server process needs it)

    from edge_agent.serving.grpc_server import start_grpc  # noqa: PLC0415

    manifest = _manifest(bundle_dir)
    core = ServingCore()
    core.set_model(manifest["name"], [(manifest["version"], 1.0, False)],
                   {manifest["version"]: bundle_dir})
    _, port = await start_grpc(core, "127.0.0.1", 0)
    echo = grpc.aio.server()
    echo.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Echo", {"Ping": grpc.unary_unary_rpc_method_handler(_echo)}),))
    echo_port = echo.add_insecure_port("127.0.0.1:0")
    await echo.start()
    print(f"PORT {port} {echo_port}", flush=True)
    await asyncio.Event().wait()


async def _serve_both(bundle_dir: Path, http_port: int, grpc_port: int) -> None:
    """The agent's HTTP and gRPC servers on given ports (``scripts/bench_peers.py``: its cold
    start counts from the process start to the model's readiness)."""
    from edge_agent.serving.grpc_server import start_grpc  # noqa: PLC0415

    manifest = _manifest(bundle_dir)
    core = ServingCore()
    core.set_model(manifest["name"], [(manifest["version"], 1.0, False)],
                   {manifest["version"]: bundle_dir})
    servers = (await start_grpc(core, "127.0.0.1", grpc_port),  # kept: a dropped grpc.aio
               await start_http(core, "127.0.0.1", http_port))  # server stops
    await asyncio.Event().wait()
    del servers


@contextlib.contextmanager
def grpc_servers(bundle_dir: Path) -> Iterator[tuple[int, int]]:
    """(agent port, echo port) of a ``serve-grpc`` process (``_serve_grpc``)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "scripts.bench_agent_serving", "serve-grpc", str(bundle_dir)],
        stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"gRPC servers did not start: {line!r}")
        _, port, echo_port = line.split()
        yield int(port), int(echo_port)
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def _server_process(kind: str, bundle_dir: Path) -> Iterator[int]:
    with _server(kind, bundle_dir) as (port, _):
        yield port


@contextlib.contextmanager
def _server(kind: str, bundle_dir: Path) -> Iterator[tuple[int, int]]:
    """(port, pid) of a server process of ``kind``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "scripts.bench_agent_serving", "serve", kind, str(bundle_dir)],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"{kind} server did not start: {line!r}")
        yield int(line.split()[1]), proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


async def _load(port: int, body: bytes, path: str, seconds: float, concurrency: int) -> float:
    """Requests/s over ``concurrency`` keep-alive connections; every answer must be 200."""
    request = (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
               f"content-length: {len(body)}\r\n\r\n").encode() + body
    deadline = time.perf_counter() + seconds
    counts = [0] * concurrency

    async def worker(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < deadline:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"bad answer: {head[:80]!r}")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                counts[i] += 1
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return sum(counts) / (time.perf_counter() - start)


def bench_http(bundle_dir: Path, seconds: float = 4.0, concurrency: int = 8,
               kinds: tuple[str, ...] = ("agent", "starlette")) -> dict[str, Any]:
    """Requests/s of each server kind (``SERVER_KINDS``) on the same requests, alternating
    rounds; ``ratio``: the agent against the Starlette baseline, ``stack_ratio``: the agent's
    default stack against its plain one (when both ran)."""
    bundle_dir = Path(bundle_dir)
    manifest = _manifest(bundle_dir)
    input_name, _ = io_names(manifest)
    x = _row(manifest)
    body = json.dumps({"inputs": [{"name": input_name, "shape": list(x.shape),
                                   "datatype": "FP32", "data": x.ravel().tolist()}]}).encode()
    path = f"/v2/models/{manifest['name']}/infer"
    rounds: dict[str, list[float]] = {kind: [] for kind in kinds}
    with contextlib.ExitStack() as stack:
        ports = {kind: stack.enter_context(_server_process(kind, bundle_dir)) for kind in kinds}
        for port in ports.values():
            asyncio.run(_load(port, body, path, 0.3, concurrency))  # warm up
        for _ in range(_HTTP_ROUNDS):
            for kind, port in ports.items():
                rounds[kind].append(asyncio.run(_load(
                    port, body, path, seconds / (len(kinds) * _HTTP_ROUNDS), concurrency)))
    rps = {kind: statistics.mean(r) for kind, r in rounds.items()}
    out: dict[str, Any] = {f"{kind.replace('-', '_')}_rps": v for kind, v in rps.items()}
    if "starlette" in rps and "agent" in rps:
        out["ratio"] = rps["agent"] / rps["starlette"]
    if "agent-plain" in rps and "agent" in rps:
        out["stack_ratio"] = rps["agent"] / rps["agent-plain"]
    return {**out, "rounds": rounds, "concurrency": concurrency, "seconds": seconds}


# ---------------------------------------------------------------------------- hostile burst


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


async def _exchange(port: int, request: bytes, times: int) -> list[int]:
    """Send ``request`` ``times`` over one keep-alive connection; the statuses (a closed
    connection is reopened)."""
    statuses: list[int] = []
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while len(statuses) < times:
            writer.write(request)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            statuses.append(int(head.split(b" ", 2)[1]))
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if b"connection: close" in head.lower():
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
    finally:
        writer.close()
    return statuses


def _post(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nhost: agent\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


def bench_hostile_rss(bundle_dir: Path) -> dict[str, Any]:
    """RSS of the agent's server process idle and after a hostile burst (module docstring)."""
    bundle_dir = Path(bundle_dir)
    manifest = _manifest(bundle_dir)
    input_name, _ = io_names(manifest)
    path = f"/v2/models/{manifest['name']}/infer"
    features, _ = model_dims(manifest)

    def infer_body(rows: int, **extra: Any) -> bytes:
        x = _row(manifest, rows).astype(np.float64).round(2)
        return json.dumps({"inputs": [{"name": input_name, "shape": [rows, features],
                                       "datatype": "FP32", "data": x.ravel().tolist()}],
                           **extra}).encode()

    normal = _post(path, infer_body(1))
    burst = [  # (what, request, times, expected status)
        ("1 MB ids", _post(path, infer_body(1, id="i" * 2**20)), 300, 400),
        ("deep JSON", _post(path, b"[" * 200_000 + b"]" * 200_000), 300, 400),
        ("5 MB bodies", _post(path, infer_body(12_000)), 10, 200),
        ("declared over 8 MiB", f"POST {path} HTTP/1.1\r\nhost: agent\r\ncontent-length: "
                                f"{9 * 2**20}\r\n\r\n".encode(), 50, 413),
        ("ids at the limit", None, 20_000, 200),
    ]
    counts: dict[str, int] = {}
    with _server("agent", bundle_dir) as (port, pid):
        asyncio.run(_exchange(port, normal, 200))  # warm up
        idle = _rss_bytes(pid)
        for what, request, times, expected in burst:
            if request is None:  # distinct ids: each takes a place in the feedback log
                statuses: list[int] = []
                for i in range(times // 100):
                    batch = b"".join(_post(path, infer_body(1, id=f"{i:06d}-{j:03d}".ljust(
                        256, "x"))) for j in range(100))
                    statuses += asyncio.run(_exchange_batch(port, batch, 100))
            else:
                statuses = asyncio.run(_exchange(port, request, times))
            if set(statuses) != {expected}:
                raise RuntimeError(f"{what}: expected {expected}; got {sorted(set(statuses))}")
            counts[what] = len(statuses)
        after = _rss_bytes(pid)
        t0 = time.perf_counter()
        asyncio.run(_exchange(port, normal, 100))
        normal_ms = (time.perf_counter() - t0) * 10  # per request
    return {"idle_rss_mib": idle / 2**20, "after_rss_mib": after / 2**20,
            "ratio": after / idle, "requests": counts, "normal_ms_after": normal_ms}


async def _exchange_batch(port: int, requests: bytes, n: int) -> list[int]:
    """``n`` pipelined requests in one write; their statuses."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    statuses = []
    try:
        writer.write(requests)
        for _ in range(n):
            head = await reader.readuntil(b"\r\n\r\n")
            statuses.append(int(head.split(b" ", 2)[1]))
            length = next(int(line[15:]) for line in head.split(b"\r\n")
                          if line[:15].lower() == b"content-length:")
            await reader.readexactly(length)
    finally:
        writer.close()
    return statuses


# ---------------------------------------------------------------------------- session options


def _throughput(call: Callable[[], Any], callers: int, seconds: float) -> float:
    stop = time.perf_counter() + seconds
    counts = [0] * callers

    def work(i: int) -> None:
        while time.perf_counter() < stop:
            call()
            counts[i] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / seconds


def bench_session_options(model: Path, n: int = 2000) -> list[dict[str, Any]]:
    """intra-op threads 1/2 x spinning on/off: p50 µs at batch 1 and 64, and requests/s of
    batch 1 with two caller threads sharing the session."""
    out = []
    session0 = onnx_session(model)
    features = session0.get_inputs()[0].shape[1]
    input_name = session0.get_inputs()[0].name
    rng = np.random.default_rng(0)
    for threads in (1, 2):
        for spinning in (True, False):
            session = onnx_session(model, threads=threads, spinning=spinning)
            row: dict[str, Any] = {"intra_op_threads": threads, "spinning": spinning}
            for batch in (1, 64):
                run = functools.partial(session.run, None, {
                    input_name: rng.random((batch, features), dtype=np.float32)})
                row[f"p50_us_b{batch}"] = _p50_us({"run": run}, n)["run"]
                if batch == 1:
                    row["rps_b1_2_callers"] = _throughput(run, 2, 1.0)
            out.append(row)
    return out


_SESSION_RSS = """
import sys, numpy as np
from pathlib import Path
from edge_agent.serving.runtime import onnx_session
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:"))
before = rss()
s = onnx_session(Path(sys.argv[1]), prepack=sys.argv[2] == "1")
name, features = s.get_inputs()[0].name, s.get_inputs()[0].shape[1]
s.run(None, {name: np.zeros((1, features), np.float32)})
print((rss() - before) * 1024)
"""


def bench_prepack(model: Path, n: int = 2000) -> dict[str, Any]:
    """ONNX Runtime weight prepacking on and off (edge_agent/serving/runtime.py): the session's
    resident memory (each in a fresh process) and p50 µs of one ``run`` at batch 1 and 64,
    the two sessions interleaved call by call."""
    out: dict[str, Any] = {}
    for prepack in (True, False):
        rss = subprocess.run([sys.executable, "-c", _SESSION_RSS, str(model),
                              "1" if prepack else "0"], capture_output=True, text=True,
                             timeout=120, check=True)
        out[f"session_mib_prepack_{'on' if prepack else 'off'}"] = round(
            int(rss.stdout.split()[-1]) / 2**20, 2)
    sessions = {"on": onnx_session(model, prepack=True), "off": onnx_session(model, prepack=False)}
    first = sessions["on"].get_inputs()[0]
    rng = np.random.default_rng(0)
    for batch in (1, 64):
        x = rng.random((batch, first.shape[1]), dtype=np.float32)
        p50 = _p50_us({k: functools.partial(s.run, None, {first.name: x})
                       for k, s in sessions.items()}, n if batch == 1 else n // 8)
        for k, v in p50.items():
            out[f"p50_us_b{batch}_prepack_{k}"] = round(v, 1)
    return out


def bench_update_cost(profile: dict[str, Any], rows: np.ndarray, batch: int,
                      *, config: DriftConfig | None = None, repeats: int = 5) -> float:
    """Median over ``repeats`` runs of µs per row fed through ``observe`` in ``batch``-row calls.

    Includes the windows closed on the way (KS and PSI), amortized over their rows. The batches
    are sliced before timing: a caller already holds each request's array.
    """
    config = config or DriftConfig()
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    predicted = np.zeros(len(rows), np.int64)
    batches = [(rows[i:i + batch], predicted[i:i + batch]) for i in range(0, len(rows), batch)]
    runs = []
    for r in range(repeats + 1):  # the first run warms up
        monitor = DriftMonitor("bench", 1, profile, config, seed=r)
        t0 = time.perf_counter()
        for x, p in batches:
            monitor.observe(x, p, 0.0)
        runs.append((time.perf_counter() - t0) / len(rows) * 1e6)
    return statistics.median(runs[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_agent_serving")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inprocess")
    p.add_argument("bundle", type=Path)
    p.add_argument("-n", type=int, default=20_000)
    p = sub.add_parser("http")
    p.add_argument("bundle", type=Path)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--kinds", nargs="+", choices=SERVER_KINDS, default=list(SERVER_KINDS))
    p = sub.add_parser("session-options")
    p.add_argument("models", type=Path, nargs="+")
    p = sub.add_parser("prepack")
    p.add_argument("model", type=Path)
    p = sub.add_parser("hostile")
    p.add_argument("bundle", type=Path)
    p = sub.add_parser("serve-both")  # internal: the agent of scripts/bench_peers.py
    p.add_argument("bundle", type=Path)
    p.add_argument("http_port", type=int)
    p.add_argument("grpc_port", type=int)
    p = sub.add_parser("serve-grpc")  # internal: the gRPC servers of grpc_servers
    p.add_argument("bundle", type=Path)
    p = sub.add_parser("serve")  # internal: one server process of bench_http
    p.add_argument("kind", choices=SERVER_KINDS)
    p.add_argument("bundle", type=Path)
    args = parser.parse_args(argv)
    if args.command == "serve":
        _serve_process(args.kind, args.bundle)
        return 0
    if args.command == "serve-both":
        with asyncio.Runner(loop_factory=event_loop_factory("auto")) as runner:
            runner.run(_serve_both(args.bundle, args.http_port, args.grpc_port))
        return 0
    if args.command == "serve-grpc":
        with asyncio.Runner(loop_factory=event_loop_factory("auto")) as runner:
            runner.run(_serve_grpc(args.bundle))
        return 0
    if args.command == "inprocess":
        result: Any = bench_inprocess(args.bundle, args.n)
    elif args.command == "http":
        result = bench_http(args.bundle, args.seconds, args.concurrency, tuple(args.kinds))
    elif args.command == "hostile":
        result = bench_hostile_rss(args.bundle)
    elif args.command == "prepack":
        result = bench_prepack(args.model)
    else:
        result = {str(m): bench_session_options(m) for m in args.models}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
