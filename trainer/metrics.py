"""Quality measures per task, on a model's raw output (pure NumPy).

classification: the output is class probabilities [n, C]; ``accuracy`` is top-1.
regression: the output is the predicted value [n, 1] (or [n]); ``mae``, ``rmse`` and ``r2``
(the coefficient of determination, 1 - SS_res / SS_tot; 0 when the targets are constant).

``within_tolerance`` is the one rule compression uses to keep a cheaper model: at most
``MAX_ACCURACY_DROP`` accuracy lost (classification) or the MAE grown by at most
``MAX_MAE_INCREASE`` of the reference MAE (regression).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "MAX_ACCURACY_DROP",
    "MAX_MAE_INCREASE",
    "measure",
    "primary",
    "values",
    "within_tolerance",
]

MAX_ACCURACY_DROP = 0.01  # one accuracy point
MAX_MAE_INCREASE = 0.02  # 2% of the reference MAE


def values(output: np.ndarray) -> np.ndarray:
    """A regression model's output [n, 1] or [n] as a float64 vector."""
    return np.asarray(output, dtype=np.float64).reshape(len(output), -1)[:, 0]


def measure(task: str, output: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """The task's metrics of ``output`` against ``y`` (see the module doc)."""
    if len(y) == 0:
        raise ValueError("no rows to measure on")
    if task == "classification":
        return {"accuracy": float((np.asarray(output).argmax(1) == y).mean())}
    pred, truth = values(output), np.asarray(y, dtype=np.float64)
    err = pred - truth
    ss_tot = float(((truth - truth.mean()) ** 2).sum())
    return {
        "mae": float(np.abs(err).mean()),
        "rmse": float(np.sqrt((err**2).mean())),
        "r2": 1.0 - float((err**2).sum()) / ss_tot if ss_tot > 0 else 0.0,
    }


def primary(task: str) -> str:
    """The metric that decides: accuracy (higher is better) or MAE (lower is better)."""
    return "accuracy" if task == "classification" else "mae"


def within_tolerance(task: str, reference: dict[str, Any], candidate: dict[str, Any]) -> bool:
    if task == "classification":
        return bool(reference["accuracy"] - candidate["accuracy"] <= MAX_ACCURACY_DROP)
    return bool(candidate["mae"] <= reference["mae"] * (1 + MAX_MAE_INCREASE) + 1e-12)
