"""History of what devices reported: the limits of a history query, and per-arm statistics
over time as a series of points (pure: the store hands in the snapshots).

Arm counters are cumulative per agent run, and an agent reports an arm only when its counters
changed. A point at time t sums, over the arm's devices, each device's newest snapshot at or
before t: the fleet's counters as they stood then (a device restarted mid-range starts again
from 0, as its own counters did)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from control_plane.domain.records import ArmStatsRecord
from fleetcore.errors import InvalidInputError

__all__ = ["DEFAULT_WINDOWS", "MAX_POINTS", "MAX_WINDOWS", "MIN_STEP_SECONDS", "ArmPoint",
           "DriftDay",
           "arm_series", "check_since", "series_step", "window_limit"]

DEFAULT_WINDOWS = 1000
MAX_WINDOWS = 10_000  # windows one history answer holds (the rest: narrow --since or --device)
MAX_POINTS = 500  # points per arm in one series (the step grows to fit)
MIN_STEP_SECONDS = 60.0
MAX_SPAN_SECONDS = 400 * 86400.0  # no retention keeps more


@dataclass(frozen=True)
class DriftDay:
    """A device's drift windows of one UTC day, rolled up once past their retention."""

    device_id: str
    model: str
    version: int
    day: int  # UTC days since 1970-01-01 of the windows' end
    windows: int
    drifted: int
    rows: int
    mean_score: float
    max_score: float


@dataclass(frozen=True)
class ArmPoint:
    time: float
    version: int
    requests: int
    errors: int
    labelled: int
    correct: int
    abs_error_sum: float
    p95_ms: float  # request-weighted mean of the devices' p95 (as the rollout gates use)
    devices: int


def check_since(since: float, now: float) -> float:
    """A history query's start: a finite time, at most ``MAX_SPAN_SECONDS`` back (0: that
    far), not in the future."""
    if not math.isfinite(since) or since < 0:
        raise InvalidInputError(f"since must be a time (Unix seconds); got {since!r}")
    if since == 0 or since < now - MAX_SPAN_SECONDS:
        return now - MAX_SPAN_SECONDS
    if since > now:
        raise InvalidInputError("since is in the future")
    return since


def window_limit(limit: int) -> int:
    if limit < 0 or limit > MAX_WINDOWS:
        raise InvalidInputError(f"limit must be 0..{MAX_WINDOWS} (0: {DEFAULT_WINDOWS})")
    return limit or DEFAULT_WINDOWS


def series_step(since: float, now: float, step: float) -> float:
    """The step between points: as asked (0: automatic), at least ``MIN_STEP_SECONDS``, and
    wide enough that the range holds at most ``MAX_POINTS``."""
    if not math.isfinite(step) or step < 0:
        raise InvalidInputError(f"step must be a number of seconds >= 0; got {step!r}")
    span = max(now - since, MIN_STEP_SECONDS)
    return max(step or span / 100, MIN_STEP_SECONDS, span / MAX_POINTS)


def arm_series(snapshots: Sequence[ArmStatsRecord], since: float, now: float,
               step: float) -> list[ArmPoint]:
    """Points every ``step`` from ``since + step`` to ``now`` (the last point is ``now``), per
    version, from snapshots ordered or not (``updated_at`` is when each was taken)."""
    ordered = sorted(snapshots, key=lambda s: s.updated_at)
    current: dict[tuple[str, int], ArmStatsRecord] = {}
    points: list[ArmPoint] = []
    i, t = 0, since
    while t < now:
        t = min(t + step, now)
        while i < len(ordered) and ordered[i].updated_at <= t:
            s = ordered[i]
            current[(s.device_id, s.version)] = s
            i += 1
        for version in sorted({v for _, v in current}):
            arms = [s for (_, v), s in current.items() if v == version]
            requests = sum(s.requests for s in arms)
            points.append(ArmPoint(
                t, version, requests, sum(s.errors for s in arms),
                sum(s.labelled for s in arms), sum(s.correct for s in arms),
                sum(s.abs_error_sum for s in arms),
                sum(s.p95_ms * s.requests for s in arms) / requests if requests else 0.0,
                len(arms)))
    return points
