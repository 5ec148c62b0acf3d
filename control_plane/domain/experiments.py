"""Experiments, pure parts: the state table, and the statistics that decide champion vs
challenger from feedback: accuracy for a classifier, absolute error for a regression model.

State table (an illegal move raises and changes nothing)::

    running --promote--> promoted (the challenger is rolled out to the experiment's devices)
    running --stop--> stopped (by the decision or an operator: the champion stays)

Test: a one-sided two-proportion z-test (H0: the challenger is not more accurate; H1: it is),
made exactly once, at the first evaluation where both arms have at least ``min_samples``
labelled requests (a fixed-horizon design: no repeated peeking, so the false-positive rate is
at most ``alpha``). Significant and better → promote the challenger; otherwise → stop the
experiment and keep the champion. Each arm's accuracy is shown with a 95% Wilson interval.

Regression (the models' manifests say ``task = "regression"``): a one-sided Welch's t-test
on the rows' absolute errors (H0: the challenger's mean absolute error is not lower; H1: it
is), at the same fixed horizon and with the same per-device cap. Why this test: an arm's
evidence is what devices can report in constant space, (n, sum |e|, sum e^2) per arm, which
is exactly what a two-sample t-test needs (mean and variance of |e| per arm); Welch's form
does not assume the arms' variances are equal (a worse model usually has more spread), and
with at least ``min_samples`` rows per arm the mean of |e| is close to normal even though |e|
itself is skewed (the seeded simulation in tests/test_regression_stats.py measures the
false-positive rate on skewed errors). A paired test would be stronger but needs both arms'
answers on the same rows, which A/B traffic does not give. Each arm's MAE is shown with a 95%
t interval.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats as scipy_stats

from control_plane.domain.records import ArmStatsRecord, ExperimentRecord, ExperimentState
from fleetcore.errors import InvalidInputError

__all__ = [
    "ERROR_CLIP",
    "TEST_NAME",
    "WELCH_TEST_NAME",
    "ArmEvidence",
    "ArmResult",
    "Decision",
    "ExperimentEvent",
    "IllegalExperimentMoveError",
    "arm_counts",
    "arm_results",
    "capped_errors",
    "capped_sum",
    "decide",
    "decide_errors",
    "experiment_test_name",
    "mae_interval",
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
WELCH_TEST_NAME = "one-sided Welch's t-test on absolute errors, fixed horizon"


def experiment_test_name(task: str) -> str:
    return WELCH_TEST_NAME if task == "regression" else TEST_NAME


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
    abs_error_sum: float = 0.0  # regression: sum |e| over the (capped) labelled rows
    sq_error_sum: float = 0.0  # regression: sum e^2 over them


def _cap(labelled: Sequence[int]) -> int:
    return sorted(labelled)[(len(labelled) - 1) // 2]  # the lower median


def capped_sum(per_device: Sequence[tuple[int, int]]) -> ArmEvidence:
    """Sum devices' (correct, labelled), each device weighing at most as much as the arm's
    median device: its counts are scaled down to the median's labelled count, keeping its
    accuracy. A device that claims a million perfect answers counts like a typical one, so
    one device among k moves an arm's accuracy by at most about 1/k."""
    rows = [(c, n) for c, n in per_device if n > 0]
    if not rows:
        return ArmEvidence(0, 0, 0)
    cap = _cap([n for _, n in rows])
    correct = labelled = 0
    for c, n in rows:
        kept = min(n, cap)
        correct, labelled = correct + round(c * kept / n), labelled + kept
    return ArmEvidence(correct, labelled, len(rows))


# A device's mean absolute error counts as at most this many times the arm's median device's.
ERROR_CLIP = 2.0


def capped_errors(per_device: Sequence[tuple[int, float, float]]) -> ArmEvidence:
    """``capped_sum`` for a regression arm: devices' (labelled, sum |e|, sum e^2), each
    device's rows capped at the median device's labelled count and its sums scaled by the
    share it keeps (its mean |e| and mean e^2 stay what it reported). Errors, unlike right
    answers, are unbounded: a device's errors are also scaled down (sum |e| by f, sum e^2 by
    f^2) so that its mean |e| is at most ``ERROR_CLIP`` times the median device's. One device
    among k then moves an arm's MAE by at most about ``ERROR_CLIP``/k of the median's, whether
    it claims perfect answers or huge errors."""
    rows = [(n, a, s) for n, a, s in per_device if n > 0]
    if not rows:
        return ArmEvidence(0, 0, 0)
    cap = _cap([n for n, _, _ in rows])
    ceiling = ERROR_CLIP * sorted(a / n for n, a, _ in rows)[(len(rows) - 1) // 2]
    labelled, abs_sum, sq_sum = 0, 0.0, 0.0
    for n, a, s in rows:
        kept = min(n, cap)
        f = min(1.0, ceiling / (a / n)) if a > 0 else 1.0
        labelled, abs_sum = labelled + kept, abs_sum + f * a * kept / n
        sq_sum += f * f * s * kept / n
    return ArmEvidence(0, labelled, len(rows), abs_sum, sq_sum)


def arm_counts(record: ExperimentRecord, stats: Sequence[ArmStatsRecord],
               task: str = "classification") -> dict[int, ArmEvidence]:
    """Each arm's evidence, from the experiment's own devices only, capped per device."""
    devices = set(record.device_ids)
    mine = {record.champion: [s for s in stats if s.device_id in devices
                              and s.version == record.champion],
            record.challenger: [s for s in stats if s.device_id in devices
                                and s.version == record.challenger]}
    return {version: _evidence(rows, task) for version, rows in mine.items()}


def _evidence(rows: Sequence[ArmStatsRecord], task: str) -> ArmEvidence:
    if task == "regression":
        return capped_errors([(s.labelled, s.abs_error_sum, s.sq_error_sum) for s in rows])
    return capped_sum([(s.correct, s.labelled) for s in rows])


def _mean_var(evidence: ArmEvidence) -> tuple[float, float]:
    """Mean and sample variance of the absolute errors behind an arm's sums."""
    n = evidence.labelled
    mean = evidence.abs_error_sum / n
    var = (evidence.sq_error_sum - n * mean * mean) / (n - 1) if n > 1 else 0.0
    return mean, max(0.0, var)


def mae_interval(evidence: ArmEvidence, level: float = 0.95) -> tuple[float, float]:
    """The ``level`` t interval of an arm's mean absolute error ((0, inf) under 2 rows)."""
    n = evidence.labelled
    if n < 2:
        return 0.0, math.inf
    mean, var = _mean_var(evidence)
    half = float(scipy_stats.t.ppf(0.5 + level / 2, n - 1)) * math.sqrt(var / n)
    return max(0.0, mean - half), mean + half


def decide_errors(champion: ArmEvidence, challenger: ArmEvidence, *, min_samples: int = 200,
                  alpha: float = 0.05, min_devices: int = 1) -> Decision:
    """Welch's one-sided t-test on absolute errors (module docstring); ``Decision.z`` holds t."""
    n1, n2 = champion.labelled, challenger.labelled
    if min(champion.devices, challenger.devices) < min_devices:
        return Decision("wait", None, None,
                        f"needs feedback from {min_devices} devices per arm; has "
                        f"{champion.devices} and {challenger.devices}")
    if min(n1, n2) < max(min_samples, 2):
        return Decision("wait", None, None,
                        f"needs {min_samples} labelled requests per arm; has {n1} and {n2}")
    (m1, v1), (m2, v2) = _mean_var(champion), _mean_var(challenger)
    diff = m1 - m2  # > 0: the challenger's errors are smaller
    se2 = v1 / n1 + v2 / n2
    if se2 > 0:
        t = diff / math.sqrt(se2)
        df = se2 * se2 / ((v1 / n1) ** 2 / (n1 - 1) + (v2 / n2) ** 2 / (n2 - 1))
        p = float(scipy_stats.t.sf(t, df))
    else:  # every error of both arms alike: no spread to test against
        t, p = 0.0, 0.0 if diff > 0 else 1.0
    if p < alpha and diff > 0:
        return Decision("promote", p, t, f"challenger's MAE lower by {diff:.4g} "
                        f"({m2:.4g} vs {m1:.4g}; t={t:.2f}, p={p:.4f} < {alpha})")
    return Decision("stop", p, t, f"no significant error reduction (MAE {m2:.4g} vs "
                    f"{m1:.4g}; t={t:.2f}, p={p:.4f})")


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
    task: str = "classification"
    mae: float | None = None  # regression: the capped evidence's mean absolute error
    mae_low: float = 0.0  # its 95% t interval
    mae_high: float = math.inf


def _weighted(values: list[tuple[float, int]], total: int) -> float:
    # Devices' percentiles averaged by their request counts: an approximation that is good
    # when devices see similar traffic (exact fleet percentiles need the histograms).
    return sum(v * n for v, n in values) / total if total else 0.0


def arm_results(record: ExperimentRecord, stats: Sequence[ArmStatsRecord],
                task: str = "classification") -> list[ArmResult]:
    """Both arms' fleet figures: sums, request-weighted percentiles, and the labelled evidence
    as the decision weighs it (capped per device) with a Wilson interval (a classifier) or
    the MAE with its t interval (a regression model)."""
    out = []
    for version, role, weight in ((record.champion, "champion", 1 - record.weight),
                                  (record.challenger, "challenger", record.weight)):
        rows = [s for s in stats if s.version == version]
        requests = sum(s.requests for s in rows)
        evidence = _evidence(rows, task)
        labelled, correct = evidence.labelled, evidence.correct
        low, high = wilson_interval(correct, labelled)
        mae_low, mae_high = mae_interval(evidence)
        out.append(ArmResult(
            version=version, role=role, weight=weight, requests=requests,
            errors=sum(s.errors for s in rows),
            p50_ms=_weighted([(s.p50_ms, s.requests) for s in rows], requests),
            p95_ms=_weighted([(s.p95_ms, s.requests) for s in rows], requests),
            labelled=labelled, correct=correct, devices=len(rows),
            accuracy_low=low, accuracy_high=high, task=task,
            mae=evidence.abs_error_sum / labelled if task == "regression" and labelled else None,
            mae_low=mae_low, mae_high=mae_high,
        ))
    return out
