"""Experiments, pure parts: the state table, and the statistics that decide champion vs
challenger accuracy from feedback.

State table (an illegal move raises and changes nothing)::

    running --promote--> promoted (the challenger is rolled out to the experiment's devices)
    running --stop--> stopped (by the decision or an operator: the champion stays)

Test: a one-sided two-proportion z-test (H0: the challenger is not more accurate; H1: it is),
made exactly once, at the first evaluation where both arms have at least ``min_samples``
labelled requests (a fixed-horizon design: no repeated peeking, so the false-positive rate is
at most ``alpha``). Significant and better → promote the challenger; otherwise → stop the
experiment and keep the champion. Each arm's accuracy is shown with a 95% Wilson interval.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

from control_plane.domain.records import ArmStatsRecord, ExperimentRecord, ExperimentState
from fleetcore.errors import InvalidInputError

__all__ = [
    "TEST_NAME",
    "ArmEvidence",
    "ArmResult",
    "Decision",
    "ExperimentEvent",
    "IllegalExperimentMoveError",
    "arm_counts",
    "arm_results",
    "capped_sum",
    "decide",
    "next_state",
    "wilson_interval",
]


class ExperimentEvent(enum.StrEnum):
    PROMOTE = "promote"
    STOP = "stop"


TRANSITIONS: dict[tuple[ExperimentState, ExperimentEvent], ExperimentState] = {
    (ExperimentState.RUNNING, ExperimentEvent.PROMOTE): ExperimentState.PROMOTED,
    (ExperimentState.RUNNING, ExperimentEvent.STOP): ExperimentState.STOPPED,
}


class IllegalExperimentMoveError(InvalidInputError):
    """The experiment's state does not allow that move."""


def next_state(state: ExperimentState, event: ExperimentEvent) -> ExperimentState:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalExperimentMoveError(f"a {state} experiment cannot {event}") from None

TEST_NAME = "one-sided two-proportion z-test, fixed horizon"


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (good for small n and extreme rates)."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2))


@dataclass(frozen=True)
class Decision:
    verdict: str  # wait | promote | stop
    p_value: float | None
    z: float | None
    reason: str


def decide(champion: tuple[int, int], challenger: tuple[int, int], *, min_samples: int = 200,
           alpha: float = 0.05, devices: tuple[int, int] = (1, 1),
           min_devices: int = 1) -> Decision:
    """``champion`` and ``challenger`` are (correct, labelled) counts (capped per device by
    ``arm_counts``); ``devices``: how many devices gave each arm's evidence."""
    (c1, n1), (c2, n2) = champion, challenger
    if min(devices) < min_devices:
        return Decision("wait", None, None,
                        f"needs feedback from {min_devices} devices per arm; has "
                        f"{devices[0]} and {devices[1]}")
    if min(n1, n2) < min_samples:
        return Decision("wait", None, None,
                        f"needs {min_samples} labelled requests per arm; has {n1} and {n2}")
    pooled = (c1 + c2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    diff = c2 / n2 - c1 / n1
    z = diff / se if se > 0 else 0.0  # se is 0 only when both arms are all right (or wrong)
    p = _normal_sf(z)
    if p < alpha and diff > 0:
        return Decision("promote", p, z, f"challenger more accurate by {diff:+.4f} "
                        f"(z={z:.2f}, p={p:.4f} < {alpha})")
    return Decision("stop", p, z, f"no significant gain ({diff:+.4f}, z={z:.2f}, p={p:.4f})")


@dataclass(frozen=True)
class ArmEvidence:
    correct: int
    labelled: int
    devices: int  # devices with labelled feedback for this arm


def capped_sum(per_device: Sequence[tuple[int, int]]) -> ArmEvidence:
    """Sum devices' (correct, labelled), each device weighing at most as much as the arm's
    median device: its counts are scaled down to the median's labelled count, keeping its
    accuracy. A device that claims a million perfect answers counts like a typical one, so
    one device among k moves an arm's accuracy by at most about 1/k."""
    rows = [(c, n) for c, n in per_device if n > 0]
    if not rows:
        return ArmEvidence(0, 0, 0)
    cap = sorted(n for _, n in rows)[(len(rows) - 1) // 2]  # the lower median
    correct = labelled = 0
    for c, n in rows:
        kept = min(n, cap)
        correct, labelled = correct + round(c * kept / n), labelled + kept
    return ArmEvidence(correct, labelled, len(rows))


def arm_counts(record: ExperimentRecord,
               stats: Sequence[ArmStatsRecord]) -> dict[int, ArmEvidence]:
    """Each arm's evidence, from the experiment's own devices only, capped per device."""
    devices = set(record.device_ids)
    per_arm: dict[int, list[tuple[int, int]]] = {record.champion: [], record.challenger: []}
    for s in stats:
        if s.device_id in devices and s.version in per_arm:
            per_arm[s.version].append((s.correct, s.labelled))
    return {version: capped_sum(rows) for version, rows in per_arm.items()}


@dataclass(frozen=True)
class ArmResult:
    version: int
    role: str  # champion | challenger
    weight: float
    requests: int
    errors: int
    p50_ms: float
    p95_ms: float
    labelled: int
    correct: int
    devices: int
    accuracy_low: float
    accuracy_high: float


def _weighted(values: list[tuple[float, int]], total: int) -> float:
    # Devices' percentiles averaged by their request counts: an approximation that is good
    # when devices see similar traffic (exact fleet percentiles need the histograms).
    return sum(v * n for v, n in values) / total if total else 0.0


def arm_results(record: ExperimentRecord, stats: Sequence[ArmStatsRecord]) -> list[ArmResult]:
    """Both arms' fleet figures: sums, request-weighted percentiles, and the labelled evidence
    as the decision weighs it (capped per device) with a Wilson interval."""
    out = []
    for version, role, weight in ((record.champion, "champion", 1 - record.weight),
                                  (record.challenger, "challenger", record.weight)):
        rows = [s for s in stats if s.version == version]
        requests = sum(s.requests for s in rows)
        evidence = capped_sum([(s.correct, s.labelled) for s in rows])
        labelled, correct = evidence.labelled, evidence.correct
        low, high = wilson_interval(correct, labelled)
        out.append(ArmResult(
            version=version, role=role, weight=weight, requests=requests,
            errors=sum(s.errors for s in rows),
            p50_ms=_weighted([(s.p50_ms, s.requests) for s in rows], requests),
            p95_ms=_weighted([(s.p95_ms, s.requests) for s in rows], requests),
            labelled=labelled, correct=correct, devices=len(rows),
            accuracy_low=low, accuracy_high=high,
        ))
    return out
