"""The agent against the Python inference servers users would pick instead (issue 19).

KServe's ``ModelServer`` and Seldon's MLServer, each installed from PyPI into a virtualenv of
its own under ``.bench/`` (made on first use, kept while its package spec is the same), each
serving the same ONNX file with ONNX Runtime through a small model class
(``scripts/peers/kserve_onnx.py``) or custom runtime (``scripts/peers/mlserver_onnx.py``) with
the agent's session options. Every server runs in a process of its own; the load generator is
this process. Measured per server, in interleaved rounds (server A, B, C, then again) so that
a shared host's drift hits all of them:

* cold start to ready: from spawning the process to the model's ``/ready`` answering 200;
* HTTP throughput (v2 JSON infer, one row) at 1 and 8 keep-alive connections;
* p50 and p99 latency at 1 connection (sequential requests, each timed);
* gRPC ``ModelInfer`` p50 (one row as ``raw_input_contents``; the v2 service is the same on
  all three), where the server answers it;
* resident memory of the server process (and its children) after warm-up.

Each figure becomes a row: the agent's value, the peer's, their ratio, and whether the agent
is ahead. A peer that cannot be installed or started is reported with the reason instead.

    python -m scripts.bench_peers BUNDLE_DIR [--seconds S] [--rounds R] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from edgefleet.v1 import grpc_predict_v2_pb2 as pb
from edgefleet.v1 import grpc_predict_v2_pb2_grpc as pb_grpc

from scripts.bench_agent_serving import _load

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / ".bench"
PEERS_DIR = REPO / "scripts" / "peers"
# name -> (what the report calls it, pip requirements of its virtualenv)
PEERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "kserve": ("KServe ModelServer", ("kserve==0.21.0", "onnxruntime", "numpy")),
    "mlserver": ("MLServer", ("mlserver==1.7.1", "onnxruntime", "numpy")),
}
READY_TIMEOUT_S = 180.0
MODEL = "digits"

__all__ = ["bench_peers", "ensure_venv"]


def ensure_venv(name: str, requirements: tuple[str, ...]) -> tuple[Path | None, str]:
    """(the venv's python, "") once ``requirements`` are installed in ``.bench/NAME``, or
    (None, why not)."""
    venv = BENCH / name
    python = venv / "bin" / "python"
    stamp = venv / ".edgefleet-peer"
    spec = "\n".join(requirements)
    if python.exists() and stamp.exists() and stamp.read_text() == spec:
        return python, ""
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                           capture_output=True, text=True, timeout=300)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        *requirements], check=True, capture_output=True, text=True, timeout=1800)
    except subprocess.CalledProcessError as exc:
        lines = [ln for ln in (exc.stderr or "").splitlines()
                 if ln.strip() and not ln.startswith("WARNING: Location")]
        return None, f"pip install {' '.join(requirements)} failed: {' | '.join(lines[-3:])}"
    except subprocess.TimeoutExpired:
        return None, f"pip install {' '.join(requirements)} took over 30 minutes"
    stamp.write_text(spec)
    return python, ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class _Server:
    name: str
    argv: list[str]
    http_port: int
    grpc_port: int
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = REPO
    proc: subprocess.Popen[bytes] | None = None
    log: Any = None
    cold_start_s: float = 0.0

    def start(self) -> None:
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env={**os.environ, **self.env},
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        url = f"http://127.0.0.1:{self.http_port}/v2/models/{MODEL}/ready"
        while time.perf_counter() - t0 < READY_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): "
                                   f"{self.output()}")
            with contextlib.suppress(urllib.error.URLError, OSError), \
                    urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    self.cold_start_s = time.perf_counter() - t0
                    return
            time.sleep(0.01)  # the measurement itself: how soon it answers
        raise RuntimeError(f"{self.name} not ready within {READY_TIMEOUT_S:g} s: "
                           f"{self.output()}")

    def output(self) -> str:
        if self.log is None:
            return ""
        self.log.seek(0)
        lines = self.log.read().decode("utf-8", "replace").strip().splitlines()
        return " | ".join(lines[-4:])[-600:]

    def rss_mib(self) -> float:
        assert self.proc is not None
        return sum(_rss_kib(pid) for pid in _tree(self.proc.pid)) / 1024

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)
        if self.log is not None:
            self.log.close()


def _tree(pid: int) -> list[int]:
    out = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                out += _tree(int(child))
    return out


def _rss_kib(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _servers(bundle: Path, pythons: dict[str, Path], work: Path) -> list[_Server]:
    model = str((bundle / "model.onnx").resolve())
    out = []
    http, grpc_port = _free_port(), _free_port()
    out.append(_Server("agent", [sys.executable, "-m", "scripts.bench_agent_serving",
                                 "serve-both", str(bundle), str(http), str(grpc_port)],
                       http, grpc_port))
    if "kserve" in pythons:
        http, grpc_port = _free_port(), _free_port()
        out.append(_Server("kserve", [str(pythons["kserve"]), str(PEERS_DIR / "kserve_onnx.py"),
                                      model, MODEL, str(http), str(grpc_port)],
                           http, grpc_port))
    if "mlserver" in pythons:
        http, grpc_port = _free_port(), _free_port()
        folder = work / "mlserver"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "settings.json").write_text(json.dumps({
            "http_port": http, "grpc_port": grpc_port, "metrics_port": _free_port(),
            "parallel_workers": 0, "debug": False}))
        (folder / "model-settings.json").write_text(json.dumps({
            "name": MODEL, "implementation": "mlserver_onnx.OnnxModel",
            "parameters": {"uri": model}}))
        mlserver = pythons["mlserver"].parent / "mlserver"
        out.append(_Server("mlserver", [str(mlserver), "start", str(folder)], http, grpc_port,
                           env={"PYTHONPATH": str(PEERS_DIR)}))
    return out


async def _sequential(port: int, request: bytes, n: int) -> list[float]:
    """Seconds per request, ``n`` requests one after another on one keep-alive connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    times = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"bad answer: {head[:80]!r}")
            length = next(int(line[15:]) for line in head.split(b"\r\n")
                          if line[:15].lower() == b"content-length:")
            await reader.readexactly(length)
            times.append(time.perf_counter() - t0)
    finally:
        writer.close()
    return times


def _grpc_p50_us(port: int, request: pb.ModelInferRequest, n: int) -> float:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        for _ in range(50):
            infer(request, timeout=30)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            infer(request, timeout=30)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


@contextlib.contextmanager
def _running(servers: list[_Server]) -> Iterator[dict[str, str]]:
    """Start each (one at a time: cold start alone on the host); yield {name: why it could
    not start} for those that did not."""
    failed: dict[str, str] = {}
    try:
        for server in servers:
            try:
                server.start()
            except RuntimeError as exc:
                failed[server.name] = str(exc)
                server.stop()
        yield failed
    finally:
        for server in servers:
            server.stop()


def _measure(servers: list[_Server], bundle: Path, seconds: float, rounds: int,
             n: int) -> dict[str, dict[str, Any]]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    features = manifest["input"]["shape"][1] if "shape" in manifest["input"] else len(
        manifest["input"]["features"])
    x = np.random.default_rng(0).random((1, features), dtype=np.float32) * 16
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, features], "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    path = f"/v2/models/{MODEL}/infer"
    request = (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
               f"content-length: {len(body)}\r\n\r\n").encode() + body
    grpc_request = pb.ModelInferRequest(model_name=MODEL, inputs=[
        pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32",
                                              shape=[1, features])],
        raw_input_contents=[x.tobytes()])
    out: dict[str, dict[str, Any]] = {s.name: {"rps_1": [], "rps_8": [], "latency": [],
                                               "grpc_p50_us": [], "cold_start_s": s.cold_start_s}
                                      for s in servers}
    for server in servers:  # warm up
        asyncio.run(_load(server.http_port, body, path, 0.5, 8))
    for server in servers:
        out[server.name]["rss_mib"] = server.rss_mib()
    for _ in range(rounds):
        for server in servers:
            got = out[server.name]
            port = server.http_port
            got["rps_1"].append(asyncio.run(_load(port, body, path, seconds, 1)))
            got["rps_8"].append(asyncio.run(_load(port, body, path, seconds, 8)))
            got["latency"] += asyncio.run(_sequential(port, request, n))
            try:
                got["grpc_p50_us"].append(_grpc_p50_us(server.grpc_port, grpc_request, n))
            except grpc.RpcError as exc:
                got["grpc_error"] = f"{exc.code()}: {exc.details()}"[:200]
    return out


def _summary(raw: dict[str, Any]) -> dict[str, Any]:
    lat = sorted(raw["latency"])
    return {
        "http_rps_1": statistics.mean(raw["rps_1"]), "http_rps_8": statistics.mean(raw["rps_8"]),
        "p50_ms": lat[len(lat) // 2] * 1e3, "p99_ms": lat[min(len(lat) - 1,
                                                            int(0.99 * len(lat)))] * 1e3,
        "grpc_p50_us": statistics.median(raw["grpc_p50_us"]) if raw["grpc_p50_us"] else None,
        "grpc_error": raw.get("grpc_error"), "rss_mib": raw["rss_mib"],
        "cold_start_s": raw["cold_start_s"],
    }


# (key, row label, unit, True when higher is better)
_FIGURES = (
    ("http_rps_1", "HTTP throughput, 1 connection", "req/s", True),
    ("http_rps_8", "HTTP throughput, 8 connections", "req/s", True),
    ("p50_ms", "HTTP p50, 1 connection", "ms", False),
    ("p99_ms", "HTTP p99, 1 connection", "ms", False),
    ("grpc_p50_us", "gRPC ModelInfer p50", "us", False),
    ("rss_mib", "resident memory after warm-up", "MiB", False),
    ("cold_start_s", "cold start to ready", "s", False),
)


def _rows(summary: dict[str, dict[str, Any]], unavailable: dict[str, str]) -> list[dict[str, Any]]:
    agent = summary["agent"]
    rows = []
    for peer, (label, _) in PEERS.items():
        if peer in unavailable:
            rows.append({"name": f"peer {label}: not measured", "figure": "-", "baseline": "-",
                         "unit": "", "baseline_name": label, "ratio": "-", "target": "-",
                         "pass": None, "note": unavailable[peer]})
            continue
        theirs = summary[peer]
        for key, what, unit, higher in _FIGURES:
            mine, other = agent[key], theirs[key]
            if mine is None or other is None:
                rows.append({"name": f"peer {label}: {what}", "figure": mine, "baseline": other,
                             "unit": unit, "baseline_name": label, "ratio": "-", "target": "-",
                             "pass": None, "note": theirs.get("grpc_error") or "not served"})
                continue
            # ratio: how many times the agent is better (> 1: the agent is ahead)
            ratio = mine / other if higher else other / mine
            rows.append({"name": f"peer {label}: {what}", "figure": round(mine, 3),
                         "baseline": round(other, 3), "unit": unit, "baseline_name": label,
                         "ratio": round(ratio, 2), "target": "agent ahead (ratio >= 1)",
                         "pass": ratio >= 1.0})
    return rows


def bench_peers(bundle: Path, *, seconds: float = 2.0, rounds: int = 3,
                n: int = 500) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(rows for ``make bench``, the raw figures per server); see the module docstring."""
    pythons: dict[str, Path] = {}
    unavailable: dict[str, str] = {}
    for peer, (_, requirements) in PEERS.items():
        python, why = ensure_venv(peer, requirements)
        if python is None:
            unavailable[peer] = why
        else:
            pythons[peer] = python
    with tempfile.TemporaryDirectory() as tmp:
        servers = _servers(Path(bundle), pythons, Path(tmp))
        with _running(servers) as failed:
            if "agent" in failed:
                raise RuntimeError(f"the agent did not start: {failed['agent']}")
            unavailable.update(failed)
            running = [s for s in servers if s.name not in failed]
            raw = _measure(running, Path(bundle), seconds, rounds, n)
    summary = {name: _summary(r) for name, r in raw.items()}
    return _rows(summary, unavailable), {"servers": summary, "unavailable": unavailable}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_peers")
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-n", type=int, default=500, help="timed requests per round")
    parser.add_argument("--out", type=Path, default=BENCH / "peers.json")
    args = parser.parse_args(argv)
    rows, raw = bench_peers(args.bundle, seconds=args.seconds, rounds=args.rounds, n=args.n)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, **raw}, indent=2))
    for row in rows:
        print(f"{row['name']:60s} agent {row['figure']} {row['unit']}  peer {row['baseline']}  "
              f"ratio {row['ratio']}  {'' if row['pass'] is not False else 'PEER AHEAD'}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
