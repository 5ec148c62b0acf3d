"""TFLite export (optional ``tflite`` extra: litert-torch) and inference through LiteRT.

The runtime follows docs/design.md §1: ``ai_edge_litert.interpreter`` (LiteRT), falling back to
``tflite_runtime.interpreter`` when only that is installed.
"""

from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fleetcore.errors import InvalidInputError
from trainer.models import Serving
from trainer.models import serving as serving_of

__all__ = [
    "SIGNATURES",
    "converter_available",
    "export_tflite",
    "interpreter_class",
    "run_tflite",
]


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


# LiteRT cannot convert a dynamic batch dimension, so one file carries a signature per batch
# size (the weights are shared): "b1" for single requests, "b64" for batches.
SIGNATURES = {"b1": 1, "b64": 64}
INPUT_KEY = "args_0"
OUTPUT_KEY = "output_0"


def export_tflite(model: nn.Module, features: int, path: Path, *, int8: bool,
                  spec: dict[str, Any] | None = None) -> Path:
    """Convert raw features -> probabilities (or values, for a regression ``spec``) to .tflite
    (int8 weights when ``int8``)."""
    if not converter_available():
        raise InvalidInputError(
            "[export] formats lists tflite but litert-torch is not installed; "
            "install it with: pip install litert-torch ai-edge-litert"
        )
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "0")
    litert_torch = importlib.import_module("litert_torch")
    serving = Serving(model.cpu()).eval() if spec is None else serving_of(model, spec)
    converter: Any = litert_torch
    for name, batch in SIGNATURES.items():
        converter = converter.signature(name, serving, (torch.zeros(batch, features),))
    fp32 = path.with_suffix(".fp32.tflite") if int8 else path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converter.convert().export(str(fp32))
    if int8:
        # Dynamic range: int8 weights, float32 activations and I/O. Measured on digits it keeps
        # top-1 agreement with PyTorch, where full-integer int8 lost several points because the
        # in-graph standardization widens the activation range (see docs/trainer.md).
        quantizer = importlib.import_module("ai_edge_quantizer.quantizer")
        recipe = importlib.import_module("ai_edge_quantizer.recipe")
        q = quantizer.Quantizer(str(fp32), recipe.dynamic_wi8_afp32())
        q.quantize(enable_progress_report=False).export_model(str(path), overwrite=True)
        fp32.unlink()
    return path


def run_tflite(path: Path, X: np.ndarray) -> np.ndarray:
    """Run a bundle's .tflite on rows: the b64 signature for full batches, b1 for the rest."""
    interpreter = interpreter_class()(model_path=str(path))
    runners = {name: interpreter.get_signature_runner(name) for name in SIGNATURES}
    xs = np.ascontiguousarray(X, dtype=np.float32)
    out = []
    full = len(xs) - len(xs) % 64
    for i in range(0, full, 64):
        out.append(runners["b64"](**{INPUT_KEY: xs[i : i + 64]})[OUTPUT_KEY])
    for i in range(full, len(xs)):
        out.append(runners["b1"](**{INPUT_KEY: xs[i : i + 1]})[OUTPUT_KEY])
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)
