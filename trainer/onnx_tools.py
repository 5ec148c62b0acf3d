"""ONNX export, int8 post-training quantization, and ONNX Runtime measurements.

Quantization tries both ONNX Runtime recipes and keeps the better one, measured here:
static QDQ (weights and activations int8, calibrated on rows of the training snapshot) and
dynamic (int8 weights, activations quantized at run time). The faster at batch 64 wins among
those whose accuracy stays within the allowed drop; the choice and the numbers go into the
recipe so the report says why.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from trainer import metrics
from trainer.models import Serving
from trainer.models import serving as serving_of

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "VALUE_OUTPUT_NAME",
    "QuantChoice",
    "export_onnx",
    "int8_applies",
    "latency_us",
    "optimize",
    "output_name",
    "quantize_int8",
    "run_onnx",
    "session",
]

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
VALUE_OUTPUT_NAME = "prediction"  # a regression model's output, float32 [n, 1]
OPSET = 17
# The ops ONNX Runtime's int8 quantizers rewrite; a graph without any (a tree ensemble, a
# LinearClassifier of ai.onnx.ml) has nothing to quantize.
QUANTIZABLE_OPS = frozenset({"MatMul", "Gemm", "Conv"})


def output_name(task: str) -> str:
    return OUTPUT_NAME if task == "classification" else VALUE_OUTPUT_NAME


def export_onnx(model: nn.Module, features: int, path: Path,
                spec: dict[str, Any] | None = None) -> Path:
    """Export raw features -> probabilities (or the value [n, 1], for a regression ``spec``)
    with a dynamic batch dimension."""
    task = "classification" if spec is None else spec.get("task", "classification")
    model = Serving(model.cpu()).eval() if spec is None else serving_of(model, spec)
    out_name = output_name(task)
    sample = torch.zeros(2, features)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model, (sample,), str(path), input_names=[INPUT_NAME], output_names=[out_name],
            dynamic_axes={INPUT_NAME: {0: "batch"}, out_name: {0: "batch"}},
            opset_version=OPSET, dynamo=False,
        )
    return path


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(path: Path | ort.InferenceSession, X: np.ndarray, batch: int = 1024) -> np.ndarray:
    sess = path if isinstance(path, ort.InferenceSession) else session(path)
    xs = np.ascontiguousarray(X, dtype=np.float32)
    parts = [sess.run(None, {INPUT_NAME: xs[i : i + batch]})[0] for i in range(0, len(xs), batch)]
    return np.concatenate(parts)


def latency_us(path: Path, X: np.ndarray, batch: int, repeats: int = 200) -> float:
    """Median wall time of one ``run`` of ``batch`` rows, single-threaded, in microseconds."""
    sess = session(path)
    rows = np.ascontiguousarray(np.resize(X, (batch, X.shape[1])), dtype=np.float32)
    feed = {INPUT_NAME: rows}
    for _ in range(20):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def optimize(src: Path, out: Path) -> Path:
    """ONNX Runtime's basic graph optimisations (constant folding, redundant node removal),
    saved as a standard ONNX graph (no runtime-specific fused ops, so any ONNX Runtime loads
    it)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(out)
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    return out


def int8_applies(path: Path) -> tuple[bool, str]:
    """Whether int8 quantization has anything to rewrite in ``path``, and why (not)."""
    ops = sorted({n.op_type for n in onnx.load(str(path)).graph.node})
    found = sorted(QUANTIZABLE_OPS & set(ops))
    if found:
        return True, f"graph has {', '.join(found)}"
    return False, (f"no {'/'.join(sorted(QUANTIZABLE_OPS))} ops to quantize (ops: "
                   f"{', '.join(ops[:8])}{', ...' if len(ops) > 8 else ''})")


def _quantize_both(fp32: Path, tmpd: Path, calibration: np.ndarray, *,
                   tolerate_failure: bool) -> tuple[dict[str, Path], dict[str, dict[str, Any]]]:
    """Static QDQ and dynamic int8 variants of ``fp32`` in ``tmpd``; those that failed, with
    the reason (only when ``tolerate_failure``)."""
    pre = tmpd / "pre.onnx"
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    # A converted model's ai.onnx.ml ops can leave tensors without an inferred type.
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    jobs = {
        "static-qdq": lambda out: quantize_static(
            str(pre), str(out), _Calibration(calibration), quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
            calibrate_method=CalibrationMethod.MinMax, extra_options=extra),
        "dynamic": lambda out: quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8,
                                                per_channel=True, extra_options=extra),
    }
    paths: dict[str, Path] = {}
    failed: dict[str, dict[str, Any]] = {}
    for mode, job in jobs.items():
        out = tmpd / f"{mode}.onnx"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                job(out)
            run_onnx(out, calibration[:2])  # it must load and run, too
        except Exception as exc:
            if not tolerate_failure:
                raise
            failed[mode] = {"failed": " ".join(f"{type(exc).__name__}: {exc}".split())[:300]}
            continue
        paths[mode] = out
    return paths, failed


class _Calibration(CalibrationDataReader):
    def __init__(self, X: np.ndarray, batch: int = 32) -> None:
        xs = np.ascontiguousarray(X, dtype=np.float32)
        self._it: Iterator[dict[str, np.ndarray]] = iter(
            [{INPUT_NAME: xs[i : i + batch]} for i in range(0, len(xs), batch)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


@dataclass(frozen=True)
class QuantChoice:
    mode: str  # "static-qdq" | "dynamic"
    path: Path
    candidates: dict[str, dict[str, Any]]


def quantize_int8(
    fp32: Path,
    out: Path,
    calibration: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    *,
    max_drop: float = 0.01,
    task: str = "classification",
    keep_fp32: bool = False,
) -> QuantChoice:
    """Quantize ``fp32`` both ways, measure, and write the chosen model to ``out``.

    ``keep_fp32``: the fp32 model is a candidate too ("none"), and an int8 one wins only when
    it is faster at batch 64 and within the task's tolerance (trainer.metrics); otherwise the
    fastest int8 variant within the tolerance (the fastest overall if none is) is kept. With
    ``keep_fp32`` a quantizer that fails on the graph (a converted model's ai.onnx.ml ops can
    defeat its type inference) is recorded as failed instead of failing the step."""
    if task == "classification":
        base_acc = float((run_onnx(fp32, X_val).argmax(1) == y_val).mean())
    base = metrics.measure(task, run_onnx(fp32, X_val), y_val)
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        paths, failed = _quantize_both(fp32, tmpd, calibration, tolerate_failure=keep_fp32)
        if keep_fp32:
            paths = {"none": fp32, **paths}
        candidates: dict[str, dict[str, Any]] = dict(failed)
        within: dict[str, bool] = {}
        for mode, path in paths.items():
            measured = metrics.measure(task, run_onnx(path, X_val), y_val)
            candidates[mode] = {
                **measured,
                "size_bytes": path.stat().st_size,
                "latency_us_batch64": latency_us(path, X_val, 64),
                "latency_us_batch1": latency_us(path, X_val, 1),
            }
            if task == "classification":
                candidates[mode]["accuracy_drop"] = base_acc - measured["accuracy"]
                within[mode] = base_acc - measured["accuracy"] <= max_drop
            else:
                candidates[mode]["mae_increase"] = measured["mae"] - base["mae"]
                within[mode] = metrics.within_tolerance(task, base, measured)
        ok = [m for m in paths if within[m]] or list(paths)
        mode = min(ok, key=lambda m: candidates[m]["latency_us_batch64"])
        out.write_bytes(paths[mode].read_bytes())
    return QuantChoice(mode=mode, path=out, candidates=candidates)
