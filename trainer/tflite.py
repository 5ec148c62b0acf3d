"""TFLite export (optional ``tflite`` extra: litert-torch) and inference through LiteRT.

The runtime follows DESIGN.md §1: ``ai_edge_litert.interpreter`` (LiteRT), falling back to
``tflite_runtime.interpreter`` when only that is installed.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from fleetcore.errors import InvalidInputError

__all__ = ["converter_available", "export_tflite", "interpreter_class", "run_tflite"]


def converter_available() -> bool:
    try:
        importlib.import_module("litert_torch")
    except ImportError:
        return False
    return True


def interpreter_class() -> Any:
    for module in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
        try:
            return importlib.import_module(module).Interpreter
        except ImportError:
            continue
    raise InvalidInputError(
        "no TFLite runtime: install ai-edge-litert (or tflite-runtime) to run .tflite models"
    )


def export_tflite(
    model: nn.Module, features: int, path: Path, *, int8: bool, calibration: np.ndarray
) -> Path:
    if not converter_available():
        raise InvalidInputError(
            "[export] formats lists tflite but litert-torch is not installed; "
            "install the tflite extra: pip install 'edgefleet[tflite]'"
        )
    raise InvalidInputError("TFLite export is not wired up yet")


def run_tflite(path: Path, X: np.ndarray) -> np.ndarray:
    interpreter = interpreter_class()(model_path=str(path))
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    rows = []
    for row in np.asarray(X, dtype=np.float32):
        interpreter.set_tensor(inp["index"], row[None, :])
        interpreter.invoke()
        rows.append(interpreter.get_tensor(out["index"])[0])
    return np.stack(rows)
