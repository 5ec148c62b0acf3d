"""The fleet's view of drift, pure: a summary per model of each device's newest window."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from control_plane.domain.records import DriftWindowRecord

__all__ = ["DriftSummary", "fleet_summary"]


@dataclass(frozen=True)
class DriftSummary:
    model: str
    devices: int
    drifted_devices: int
    mean_score: float


def fleet_summary(windows: Sequence[DriftWindowRecord]) -> list[DriftSummary]:
    """``windows``: each device's newest window per model."""
    out = []
    for model in sorted({w.model for w in windows}):
        rows = [w for w in windows if w.model == model]
        out.append(DriftSummary(model, len(rows), sum(w.drifted for w in rows),
                                sum(w.score for w in rows) / len(rows)))
    return out
