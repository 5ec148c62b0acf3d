"""History for operators: drift windows over time (with per-feature PSI) and their daily
roll-ups, and per-arm statistics as a series (``domain/history.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from control_plane.domain.history import (
    ArmPoint,
    DriftDay,
    arm_series,
    check_since,
    series_step,
    window_limit,
)
from control_plane.domain.records import DriftWindowRecord
from control_plane.services.context import Context
from fleetcore import pki
from fleetcore.errors import InvalidInputError

__all__ = ["MAX_ARM_SNAPSHOTS", "ArmHistory", "DriftHistory", "HistoryService"]

# Arm snapshots one series is built from; a range holding more is refused (narrow it).
MAX_ARM_SNAPSHOTS = 200_000


@dataclass(frozen=True)
class DriftHistory:
    since: float
    windows: list[DriftWindowRecord]  # oldest first
    days: list[DriftDay]  # roll-ups of windows past their retention
    truncated: bool  # more windows matched than the limit (the newest are kept)


@dataclass(frozen=True)
class ArmHistory:
    model: str
    since: float
    step: float
    points: list[ArmPoint]


class HistoryService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.store = ctx.store

    def drift(self, caller: pki.Identity, model: str, device_id: str, since: float,
              limit: int) -> DriftHistory:
        self.ctx.authorize(caller, "drift.read", model)
        _check_names(model, device_id)
        since = check_since(since, self.ctx.clock())
        windows, truncated = self.store.drift_history(model, device_id, since,
                                                      window_limit(limit))
        return DriftHistory(since, windows, self.store.drift_days(model, device_id, since),
                            truncated)

    def arms(self, caller: pki.Identity, model: str, since: float, step: float) -> ArmHistory:
        self.ctx.authorize(caller, "experiments.status", model)
        if not model:
            raise InvalidInputError("arm history needs a model (--model)")
        _check_names(model, "")
        now = self.ctx.clock()
        since = check_since(since, now)
        step = series_step(since, now, step)
        snapshots, cut = self.store.arm_history(model, since, MAX_ARM_SNAPSHOTS)
        if cut:
            raise InvalidInputError(
                f"more than {MAX_ARM_SNAPSHOTS:,} arm snapshots of {model} since then; ask for "
                "a shorter range (--since)")
        return ArmHistory(model, since, step, arm_series(snapshots, since, now, step))


def _check_names(model: str, device_id: str) -> None:
    """Names go into queries as values only; still, only what could exist is asked for."""
    for what, value in (("model", model), ("device", device_id)):
        if len(value) > 128 or not value.isprintable():
            raise InvalidInputError(f"{what} must be a printable name of at most 128 characters")


