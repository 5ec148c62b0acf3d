"""The drift reference profile (``profile.json``) that agents compare live traffic against.

For each raw input feature: quantile bin edges computed on the training split and the share
of training rows in each bin (bin i holds values v with edges[i-1] <= v < edges[i], the first
bin everything below edges[0], the last everything at or above edges[-1]; this is
``numpy.searchsorted(edges, v, side="right")``). Duplicate edges (constant features such as
blank pixels) collapse, so a feature may have fewer bins. Also a bounded, seeded reference
sample of rows for two-sample KS tests, and the distribution of the model's predictions on the
training split: the predicted classes' proportions (classification), or quantile bins of the
predicted value with the same binning rule as the features (regression, ``"kind": "value"``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["PROFILE_FORMAT", "build_profile", "class_prediction", "feature_bins",
           "value_prediction"]

PROFILE_FORMAT = "edgefleet.profile/v1"


def feature_bins(values: np.ndarray, bins: int) -> tuple[list[float], list[float]]:
    """(edges, proportions) for one feature: at most ``bins`` quantile bins."""
    qs = np.quantile(values.astype(np.float64), np.linspace(0, 1, bins + 1)[1:-1])
    edges = np.unique(qs)
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return [float(e) for e in edges], [float(c) / len(values) for c in counts]


def class_prediction(predicted: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """The predicted classes' shares (``predicted``: class ids)."""
    counts = np.bincount(predicted, minlength=len(labels))
    return {"labels": labels, "proportions": [float(c) / len(predicted) for c in counts]}


def value_prediction(values: np.ndarray, bins: int) -> dict[str, Any]:
    """Quantile bins of the predicted value, and its mean, std, min and max."""
    v = np.asarray(values, dtype=np.float64)
    edges, proportions = feature_bins(v, bins)
    return {"kind": "value", "edges": edges, "proportions": proportions,
            "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
            "max": float(v.max())}


def build_profile(
    X: np.ndarray,
    feature_names: list[str],
    predicted: np.ndarray | None = None,
    labels: list[str] | None = None,
    *,
    bins: int,
    sample_rows: int,
    seed: int,
    prediction: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The profile of training rows ``X``; the prediction section is ``prediction`` (from
    ``class_prediction`` or ``value_prediction``), else the classes ``predicted`` of
    ``labels``."""
    if prediction is None:
        assert predicted is not None and labels is not None
        prediction = class_prediction(predicted, labels)
    features = []
    for j, name in enumerate(feature_names):
        col = X[:, j]
        edges, proportions = feature_bins(col, bins)
        features.append({
            "name": name,
            "edges": edges,
            "proportions": proportions,
            "mean": float(col.mean()),
            "std": float(col.std()),
            "min": float(col.min()),
            "max": float(col.max()),
        })
    rng = np.random.default_rng(seed)
    take = rng.choice(len(X), size=min(sample_rows, len(X)), replace=False)
    return {
        "format": PROFILE_FORMAT,
        "rows": len(X),
        "bins": bins,
        "features": features,
        "reference_sample": {"rows": [[float(v) for v in X[i]] for i in np.sort(take)]},
        "prediction": prediction,
    }
