"""The smoke test a staged bundle must pass before it is served (docs/design.md §5).

The manifest carries ``smoke_test = {"file": "model.onnx", "inputs": [[...]], "expected":
[[...]], "atol": 0.02, "require_same_argmax": true}``, computed by the trainer on the model it
signed, and optionally ``"timeout_seconds"`` (a limit per call) and ``"latency_budget_ms"``
(for the median smoke batch). The agent runs the inputs through ONNX Runtime exactly as it will
serve (CPU, one intra-op thread) and requires the outputs to match within ``atol`` (and, if
asked, the same predicted class per row). ``atol`` is absolute: for a regression model
(``[n, 1]`` values, ``require_same_argmax`` false) it is in the target's units. A bad model
is an expected outcome here, not a bug:
every failure, whatever raised it, becomes ``SmokeResult(ok=False, reason=...)``.

Two ways to run it:

* ``run_smoke_test``: in this process (tests, and the worker below).
* ``run_smoke_isolated``: in a child process (``python -m edge_agent.install.smoke``) that the
  agent kills when the load or any single call overruns its limit. A model whose graph loops
  for hours, or a runtime that crashes (a signal, an abort), then fails its install with a
  reason instead of freezing or killing the agent. The child reports each step on stdout as
  one JSON line, so the parent knows which step overran. Limits: the manifest may only lower
  the agent's (``SmokeLimits``, from agent.toml), never raise them.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import onnxruntime as ort

from fleetcore.bundle import MODEL_ONNX

__all__ = ["DEFAULT_INPUT_NAME", "SmokeLimits", "SmokeResult", "effective_limits",
           "run_smoke_isolated", "run_smoke_test"]

logger = logging.getLogger(__name__)

DEFAULT_INPUT_NAME = "input"
_TIMED_RUNS = 5
_ORT_LOG_ERROR = 3  # keep ONNX Runtime's own warnings about a bad model off stderr


@dataclass(frozen=True)
class SmokeResult:
    ok: bool
    reason: str
    latency_us: float  # median wall time of one run of the whole smoke batch; 0.0 on failure


@dataclass(frozen=True)
class SmokeLimits:
    """The agent's limits for a smoke test (agent.toml); a manifest can only lower them."""

    call_timeout_s: float = 10.0  # one run of the smoke batch (the child is killed after it)
    load_timeout_s: float = 60.0  # start the child, import the runtime, load the model
    latency_budget_s: float = 1.0  # median run of the smoke batch
    # Address space of the child (RLIMIT_AS): a model that allocates without bound fails its
    # smoke test instead of swapping the host. The digits child peaks at ~250 MB.
    memory_bytes: int = 2 * 1024**3


def effective_limits(manifest: dict[str, Any], agent: SmokeLimits) -> SmokeLimits:
    """The agent's limits, lowered by the manifest's ``smoke_test`` where it asks for less
    (pure). A value that is not a positive number is ignored: the agent's limit stands."""
    spec = manifest.get("smoke_test")
    spec = spec if isinstance(spec, dict) else {}

    def declared(key: str, scale: float) -> float | None:
        value = spec.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return float(value) * scale
        return None

    timeout = declared("timeout_seconds", 1.0)
    budget = declared("latency_budget_ms", 1e-3)
    return SmokeLimits(
        call_timeout_s=min(agent.call_timeout_s, timeout or agent.call_timeout_s),
        load_timeout_s=agent.load_timeout_s,
        latency_budget_s=min(agent.latency_budget_s, budget or agent.latency_budget_s),
        memory_bytes=agent.memory_bytes,
    )


def run_smoke_test(bundle_dir: Path, manifest: dict[str, Any], *,
                   progress: Callable[[str], None] | None = None) -> SmokeResult:
    """Run the manifest's smoke test on ``bundle_dir`` in this process; never raises for a
    bad model. ``progress("loaded" | "call")`` is told after each step."""
    try:
        return SmokeResult(True, "", _run(Path(bundle_dir), manifest,
                                          progress or (lambda step: None)))
    except _Mismatch as exc:
        return SmokeResult(False, str(exc), 0.0)
    except Exception as exc:
        logger.warning("smoke test of %s raised: %s", bundle_dir, exc)
        return SmokeResult(False, f"smoke test raised {type(exc).__name__}: {exc}", 0.0)


class _Mismatch(Exception):
    """The model ran but does not do what the manifest says it does (or no test is given)."""


def _run(bundle_dir: Path, manifest: dict[str, Any], progress: Callable[[str], None]) -> float:
    """Check the outputs and return the median latency of the smoke batch in microseconds."""
    spec = manifest.get("smoke_test")
    if not isinstance(spec, dict):
        raise _Mismatch("manifest has no smoke_test object")
    file_name = spec.get("file", MODEL_ONNX)
    if not isinstance(file_name, str) or file_name in {"", ".", ".."} or (
        Path(file_name).name != file_name
    ):
        raise _Mismatch(f"smoke_test.file must be a file name in the bundle; got {file_name!r}")
    inputs = np.asarray(spec.get("inputs"), dtype=np.float32)
    expected = np.asarray(spec.get("expected"), dtype=np.float64)
    atol = float(spec.get("atol", 0.0))
    if inputs.ndim < 2 or inputs.shape[0] == 0:
        raise _Mismatch(f"smoke_test.inputs must be a non-empty batch; got shape {inputs.shape}")

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = _ORT_LOG_ERROR
    sess = ort.InferenceSession(str(bundle_dir / file_name), opts,
                                providers=["CPUExecutionProvider"])
    section = manifest.get("input")
    declared = section.get("name") if isinstance(section, dict) else None
    feed = {declared if isinstance(declared, str) else DEFAULT_INPUT_NAME:
            np.ascontiguousarray(inputs)}
    progress("loaded")

    got = np.asarray(sess.run(None, feed)[0], dtype=np.float64)  # also the warm-up run
    progress("call")
    times = []
    for _ in range(_TIMED_RUNS):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
        progress("call")

    if got.shape != expected.shape:
        raise _Mismatch(f"output shape {got.shape}; expected {expected.shape}")
    if not np.allclose(got, expected, atol=atol, rtol=0.0):
        worst = float(np.max(np.abs(got - expected)))
        raise _Mismatch(f"outputs differ from expected by up to {worst:.4g} (atol {atol})")
    if spec.get("require_same_argmax", False):
        same = got.argmax(axis=-1) == expected.argmax(axis=-1)
        if not same.all():
            raise _Mismatch(f"predicted class differs on {int((~same).sum())} of {same.size} rows")
    return statistics.median(times) * 1e6


# ---------------------------------------------------------------------------- isolated
_STDERR_TAIL = 2000  # bytes of the child's stderr kept for a crash reason
_MAX_LINE = 64 * 1024


def run_smoke_isolated(bundle_dir: Path, manifest: dict[str, Any],
                       limits: SmokeLimits = SmokeLimits()) -> SmokeResult:
    """Run the smoke test in a child process with hard time limits; never raises for a bad
    model. A load or a call that overruns, a crash of the runtime, or a median batch over the
    latency budget fails it, with the reason."""
    limits = effective_limits(manifest, limits)
    request = json.dumps({"bundle": str(bundle_dir), "manifest": manifest,
                          "memory_bytes": limits.memory_bytes}).encode()
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)}
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as req:
        req.write(request)
        req.seek(0)
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge_agent.install.smoke"], stdin=req,
            stdout=subprocess.PIPE, stderr=err, env=env, start_new_session=True)
        try:
            result = _follow(proc, limits)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        if result is None:
            result = _crashed(proc.returncode, err)
    if result.ok and result.latency_us > limits.latency_budget_s * 1e6:
        return SmokeResult(False, f"smoke batch took {result.latency_us / 1e3:.3f} ms (median); "
                                  f"the latency budget is {limits.latency_budget_s * 1e3:g} ms",
                           result.latency_us)
    return result


def _follow(proc: subprocess.Popen[bytes], limits: SmokeLimits) -> SmokeResult | None:
    """Read the child's step lines, each within its limit; its result, a timeout result, or
    None when it ended without a result (a crash)."""
    assert proc.stdout is not None
    calls = 0
    step, limit = "loading the model", limits.load_timeout_s
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        buffer = b""
        deadline = time.monotonic() + limit
        while True:
            while b"\n" not in buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    proc.kill()
                    return SmokeResult(False, f"smoke test overran its time limit of {limit:g} s "
                                              f"{step} (the model was stopped)", 0.0)
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    return None
                buffer += chunk
                if len(buffer) > _MAX_LINE:
                    return SmokeResult(False, "smoke test worker wrote too much output", 0.0)
            line, buffer = buffer.split(b"\n", 1)
            try:
                msg = json.loads(line)
            except ValueError:
                return SmokeResult(False, f"smoke test worker wrote {line[:80]!r}", 0.0)
            if msg.get("step") == "result":
                return SmokeResult(bool(msg["ok"]), str(msg["reason"]),
                                   float(msg["latency_us"]))
            calls += msg.get("step") == "call"
            step = f"in smoke call {calls + 1}"
            limit = limits.call_timeout_s
            deadline = time.monotonic() + limit


def _crashed(returncode: int, err: IO[bytes]) -> SmokeResult:
    err.seek(0, os.SEEK_END)
    err.seek(max(0, err.tell() - _STDERR_TAIL))
    tail = err.read().decode(errors="replace").strip().splitlines()
    last = tail[-1] if tail else ""
    if returncode < 0:
        try:
            how = f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"signal {-returncode}"
    else:
        how = f"exit status {returncode}"
    return SmokeResult(False, f"the runtime crashed during the smoke test ({how})"
                              + (f": {last[:300]}" if last else ""), 0.0)


def _worker() -> int:
    """The child: read {bundle, manifest} from stdin, report each step on stdout."""
    request = json.loads(sys.stdin.buffer.read())
    try:
        import resource  # noqa: PLC0415 (POSIX only)

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash leaves no core file
        memory = int(request.get("memory_bytes") or 0)
        if memory > 0:  # before the runtime loads: it is what allocates
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    except (ImportError, ValueError, OSError):
        pass
    out = sys.stdout

    def say(doc: dict[str, Any]) -> None:
        out.write(json.dumps(doc) + "\n")
        out.flush()

    result = run_smoke_test(Path(request["bundle"]), request["manifest"],
                            progress=lambda step: say({"step": step}))
    say({"step": "result", "ok": result.ok, "reason": result.reason,
         "latency_us": result.latency_us})
    return 0


if __name__ == "__main__":
    sys.exit(_worker())
