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

from trainer.models import Serving

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "QuantChoice",
    "export_onnx",
    "latency_us",
    "quantize_int8",
    "run_onnx",
    "session",
]

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
OPSET = 17


def export_onnx(model: nn.Module, features: int, path: Path) -> Path:
    """Export raw features -> probabilities with a dynamic batch dimension."""
    model = Serving(model.cpu()).eval()
    sample = torch.zeros(2, features)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model, (sample,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
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
) -> QuantChoice:
    """Quantize ``fp32`` both ways, measure, and write the chosen model to ``out``."""
    base_acc = float((run_onnx(fp32, X_val).argmax(1) == y_val).mean())
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        pre = tmpd / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        paths = {"static-qdq": tmpd / "static.onnx", "dynamic": tmpd / "dynamic.onnx"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(
                str(pre), str(paths["static-qdq"]), _Calibration(calibration),
                quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8, per_channel=True,
                calibrate_method=CalibrationMethod.MinMax,
            )
            quantize_dynamic(str(pre), str(paths["dynamic"]), weight_type=QuantType.QInt8,
                             per_channel=True)
        candidates: dict[str, dict[str, Any]] = {}
        for mode, path in paths.items():
            acc = float((run_onnx(path, X_val).argmax(1) == y_val).mean())
            candidates[mode] = {
                "accuracy": acc,
                "accuracy_drop": base_acc - acc,
                "size_bytes": path.stat().st_size,
                "latency_us_batch64": latency_us(path, X_val, 64),
                "latency_us_batch1": latency_us(path, X_val, 1),
            }
        ok = [m for m, c in candidates.items() if c["accuracy_drop"] <= max_drop] or list(paths)
        mode = min(ok, key=lambda m: candidates[m]["latency_us_batch64"])
        out.write_bytes(paths[mode].read_bytes())
    return QuantChoice(mode=mode, path=out, candidates=candidates)
