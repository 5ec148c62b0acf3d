"""The drift reference profile (``profile.json``) that agents compare live traffic against.

For each raw input feature: quantile bin edges computed on the training split and the share
of training rows in each bin (bin i holds values v with edges[i-1] <= v < edges[i], the first
bin everything below edges[0], the last everything at or above edges[-1]; this is
``numpy.searchsorted(edges, v, side="right")``). Duplicate edges (constant features such as
blank pixels) collapse, so a feature may have fewer bins. Also a bounded, seeded reference
sample of rows for two-sample KS tests, and the predicted-class distribution on the training
split.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["PROFILE_FORMAT", "build_profile", "feature_bins"]

PROFILE_FORMAT = "edgefleet.profile/v1"


def feature_bins(values: np.ndarray, bins: int) -> tuple[list[float], list[float]]:
    """(edges, proportions) for one feature: at most ``bins`` quantile bins."""
    qs = np.quantile(values.astype(np.float64), np.linspace(0, 1, bins + 1)[1:-1])
    edges = np.unique(qs)
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return [float(e) for e in edges], [float(c) / len(values) for c in counts]


def build_profile(
    X: np.ndarray,
    feature_names: list[str],
    predicted: np.ndarray,
    labels: list[str],
    *,
    bins: int,
    sample_rows: int,
    seed: int,
) -> dict[str, Any]:
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
    counts = np.bincount(predicted, minlength=len(labels))
    return {
        "format": PROFILE_FORMAT,
        "rows": len(X),
        "bins": bins,
        "features": features,
        "reference_sample": {"rows": [[float(v) for v in X[i]] for i in np.sort(take)]},
        "prediction": {
            "labels": labels,
            "proportions": [float(c) / len(predicted) for c in counts],
        },
    }
