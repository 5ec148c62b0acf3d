"""The smoke test a staged bundle must pass before it is served (docs/design.md §5).

The manifest carries ``smoke_test = {"file": "model.onnx", "inputs": [[...]], "expected":
[[...]], "atol": 0.02, "require_same_argmax": true}``, computed by the trainer on the model it
signed. The agent runs the inputs through ONNX Runtime exactly as it will serve (CPU, one
intra-op thread) and requires the outputs to match within ``atol`` (and, if asked, the same
predicted class per row). A bad model is an expected outcome here, not a bug: every failure,
whatever raised it, becomes ``SmokeResult(ok=False, reason=...)``.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from fleetcore.bundle import MODEL_ONNX

__all__ = ["DEFAULT_INPUT_NAME", "SmokeResult", "run_smoke_test"]

logger = logging.getLogger(__name__)

DEFAULT_INPUT_NAME = "input"
_TIMED_RUNS = 5
_ORT_LOG_ERROR = 3  # keep ONNX Runtime's own warnings about a bad model off stderr


@dataclass(frozen=True)
class SmokeResult:
    ok: bool
    reason: str
    latency_us: float  # median wall time of one run of the whole smoke batch; 0.0 on failure


def run_smoke_test(bundle_dir: Path, manifest: dict[str, Any]) -> SmokeResult:
    """Run the manifest's smoke test on ``bundle_dir``; never raises for a bad model."""
    try:
        return SmokeResult(True, "", _run(Path(bundle_dir), manifest))
    except _Mismatch as exc:
        return SmokeResult(False, str(exc), 0.0)
    except Exception as exc:
        logger.warning("smoke test of %s raised: %s", bundle_dir, exc)
        return SmokeResult(False, f"smoke test raised {type(exc).__name__}: {exc}", 0.0)


class _Mismatch(Exception):
    """The model ran but does not do what the manifest says it does (or no test is given)."""


def _run(bundle_dir: Path, manifest: dict[str, Any]) -> float:
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

    got = np.asarray(sess.run(None, feed)[0], dtype=np.float64)  # also the warm-up run
    times = []
    for _ in range(_TIMED_RUNS):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)

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
