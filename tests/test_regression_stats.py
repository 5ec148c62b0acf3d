"""The control plane's rules for regression models, pure: arm statistics with error sums are
consistent or refused, samples carry finite targets, the mae_delta gate, and the experiment's
Welch test (its false-positive rate over seeded runs, one hostile device among honest ones)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from control_plane.domain.experiments import (
    ArmEvidence,
    arm_counts,
    arm_results,
    capped_errors,
    decide_errors,
    mae_interval,
)
from control_plane.domain.records import (
    ArmStatsRecord,
    ExperimentRecord,
    ExperimentState,
    RolloutRecord,
    RolloutState,
    SampleRecord,
    TelemetryRecord,
)
from control_plane.domain.retraining import DriftPolicy, check_policy
from control_plane.domain.rollout_plan import (
    check_gates_for_task,
    gate_metrics,
    judge_gates,
    parse_gate,
)
from control_plane.domain.samples import against_manifest
from control_plane.domain.telemetry import derive
from control_plane.services.retraining import acceptance_text
from fleetcore.errors import InvalidInputError

RUNS = 2000


# ---------------------------------------------------------------- arm statistics


def _arm(**changes: object) -> TelemetryRecord:
    doc = {"model": "m", "version": 1, "shadow": False, "requests": 100, "errors": 0,
           "p50_ms": 1.0, "p95_ms": 2.0, "labelled": 10, "correct": 0,
           "abs_error_sum": 30.0, "sq_error_sum": 120.0, **changes}
    return TelemetryRecord(1, "arm_stats", 0.0, json.dumps(doc).encode())


def test_consistent_error_sums_are_kept() -> None:
    rows, problems = derive("d", [_arm()])
    assert not problems
    row = rows[1]
    assert isinstance(row, ArmStatsRecord)
    assert (row.abs_error_sum, row.sq_error_sum, row.correct) == (30.0, 120.0, 0)
    # equal errors: sum e^2 == sum|e|^2 / n exactly in reals, by ulps in floats
    rows, problems = derive("d", [_arm(labelled=3, abs_error_sum=0.3, sq_error_sum=0.03)])
    assert not problems
    rows, problems = derive("d", [_arm(labelled=0, abs_error_sum=0.0, sq_error_sum=0.0)])
    assert not problems
    classifier = {"model": "m", "version": 1, "requests": 5, "errors": 0, "p50_ms": 1.0,
                  "p95_ms": 1.0, "labelled": 2, "correct": 1}
    rows, _ = derive("d", [TelemetryRecord(1, "arm_stats", 0.0,
                                           json.dumps(classifier).encode())])
    assert rows[1].abs_error_sum == 0.0  # type: ignore[union-attr]  # a classifier's arm


@pytest.mark.parametrize("changes", [
    {"abs_error_sum": -1.0},
    {"sq_error_sum": -1.0},
    {"abs_error_sum": "30"},
    {"abs_error_sum": True},
    {"sq_error_sum": None},
    {"correct": 3},  # a regression arm counts no correct answers
    {"labelled": 0},  # errors without labels
    {"sq_error_sum": 10.0},  # below sum|e|^2 / n = 90
    {"sq_error_sum": 1000.0},  # above sum|e|^2 = 900
    {"abs_error_sum": 1e160, "sq_error_sum": 1e319},  # beyond any label
    {"labelled": 200},  # more labels than requests
])
def test_inconsistent_error_sums_are_refused(changes: dict[str, object]) -> None:
    rows, problems = derive("d", [_arm(**changes)])
    assert not rows and len(problems) == 1 and "\n" not in problems[1]


def test_non_finite_sums_do_not_parse() -> None:
    payload = (b'{"model":"m","version":1,"requests":10,"errors":0,"p50_ms":1,"p95_ms":1,'
               b'"labelled":1,"correct":0,"abs_error_sum":1e999,"sq_error_sum":1e999}')
    rows, problems = derive("d", [TelemetryRecord(1, "arm_stats", 0.0, payload)])
    assert not rows and problems


# ---------------------------------------------------------------- samples

REGRESSION = {"task": "regression", "input": {"features": [{"name": "a"}, {"name": "b"}]},
              "output": {"name": "prediction", "kind": "value"}}
CLASSIFIER = {"input": {"features": [{"name": "a"}, {"name": "b"}]},
              "output": {"labels": ["x", "y"]}}


def _sample(labels: list[object]) -> TelemetryRecord:
    doc = {"model": "m", "version": 1, "features": [[0.0, 1.0]] * len(labels), "labels": labels}
    return TelemetryRecord(1, "sample", 0.0, json.dumps(doc).encode())


def test_samples_carry_finite_targets_for_regression_and_class_ids_otherwise() -> None:
    rows, _ = derive("d", [_sample([151.5, 75, -3.25])])
    row = rows[1]
    assert isinstance(row, SampleRecord) and row.labels == [151.5, 75, -3.25]
    assert against_manifest(row, REGRESSION) == ""
    assert "class ids" in against_manifest(row, CLASSIFIER)
    rows, _ = derive("d", [_sample([1, 0])])
    assert against_manifest(rows[1], CLASSIFIER) == ""  # type: ignore[arg-type]
    assert against_manifest(rows[1], REGRESSION) == ""  # type: ignore[arg-type]
    rows, _ = derive("d", [_sample([1.0])])  # a float is no class id
    assert "class ids" in against_manifest(rows[1], CLASSIFIER)  # type: ignore[arg-type]


@pytest.mark.parametrize("labels", [[True], ["1.5"], [None], [1e200], [[1.0]]])
def test_hostile_sample_labels_are_refused(labels: list[object]) -> None:
    rows, problems = derive("d", [_sample(labels)])
    assert not rows and problems


def test_non_finite_sample_labels_are_refused() -> None:
    payload = b'{"model":"m","version":1,"features":[[0.0,1.0]],"labels":[1e999]}'
    rows, problems = derive("d", [TelemetryRecord(1, "sample", 0.0, payload)])
    assert not rows and problems


# ---------------------------------------------------------------- the mae_delta gate


def _stats(device: str, version: int, labelled: int, mae: float) -> ArmStatsRecord:
    return ArmStatsRecord(device, "m", version, 2 * labelled, 0, 1.0, 2.0, labelled, 0, 0.0,
                          mae * labelled, 2 * (mae * labelled) ** 2 / labelled)


def _rollout() -> RolloutRecord:
    return RolloutRecord(1, "m", 2, {}, RolloutState.RUNNING, 0.0, "op", ("d1", "d2"),
                         previous_version=1)


def test_mae_delta_is_new_minus_previous_mae_with_a_minimum_sample_count() -> None:
    stats = [_stats("d1", 1, 60, 50.0), _stats("d2", 1, 60, 40.0),
             _stats("d1", 2, 60, 40.0), _stats("d2", 2, 60, 38.0)]
    metrics = gate_metrics(_rollout(), ["d1", "d2"], 0, stats, [])
    value, samples = metrics["mae_delta"]
    assert value == pytest.approx(39.0 - 45.0) and samples == 120
    (_, gate), = [(r.gate, r) for r in judge_gates(["mae_delta<=0"], metrics)
                  if r.gate.startswith("mae")]
    assert gate.ok
    worse = [_stats("d1", 1, 60, 40.0), _stats("d1", 2, 60, 55.0)]
    metrics = gate_metrics(_rollout(), ["d1"], 0, worse, [])
    assert not judge_gates(["mae_delta<=0"], metrics)[1].ok
    few = [_stats("d1", 1, 60, 40.0), _stats("d1", 2, 10, 1.0)]
    result = judge_gates(["mae_delta<=0"], gate_metrics(_rollout(), ["d1"], 0, few, []))[1]
    assert not result.ok and "not enough data" in result.reason


def test_gates_must_fit_the_model_s_task() -> None:
    check_gates_for_task([parse_gate("mae_delta<=0.5")], "regression")
    check_gates_for_task([parse_gate("accuracy_delta>=0")], "classification")
    with pytest.raises(InvalidInputError, match="use mae_delta"):
        check_gates_for_task([parse_gate("accuracy_delta>=0")], "regression")
    with pytest.raises(InvalidInputError, match="use accuracy_delta"):
        check_gates_for_task([parse_gate("mae_delta<=0")], "classification")


# ---------------------------------------------------------------- the experiment's test


def _evidence(errors: np.ndarray) -> ArmEvidence:
    a = np.abs(errors)
    return ArmEvidence(0, len(a), 1, float(a.sum()), float((a * a).sum()))


def _rate(scale_champion: float, scale_challenger: float, n: int, seed: int) -> float:
    """Promote rate over RUNS experiments; errors are skewed (|e| of a Laplace-tailed t)."""
    rng = np.random.default_rng(seed)
    promoted = 0
    for _ in range(RUNS):
        one = _evidence(scale_champion * rng.standard_t(5, n))
        two = _evidence(scale_challenger * rng.standard_t(5, n))
        promoted += decide_errors(one, two, min_samples=n).verdict == "promote"
    return promoted / RUNS


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_equal_regression_arms_are_promoted_no_more_than_alpha(seed: int) -> None:
    # alpha = 0.05; allow 3 binomial standard errors of the estimate over RUNS runs.
    assert _rate(40.0, 40.0, 300, seed) <= 0.05 + 3 * (0.05 * 0.95 / RUNS) ** 0.5


def test_clearly_lower_errors_are_promoted_and_higher_never() -> None:
    assert _rate(40.0, 28.0, 300, 4) >= 0.99
    assert _rate(30.0, 40.0, 300, 5) == 0.0


def test_regression_decision_waits_for_samples_and_devices() -> None:
    one = ArmEvidence(0, 150, 3, 150 * 40.0, 150 * 2000.0)
    d = decide_errors(one, one, min_samples=200)
    assert d.verdict == "wait" and "200" in d.reason
    d = decide_errors(ArmEvidence(0, 300, 1, 1.0, 1.0), ArmEvidence(0, 300, 3, 1.0, 1.0),
                      min_samples=200, min_devices=3)
    assert d.verdict == "wait" and "3 devices" in d.reason


def test_mae_interval_covers_the_mean() -> None:
    rng = np.random.default_rng(0)
    evidence = _evidence(rng.normal(0, 50, 400))
    low, high = mae_interval(evidence)
    mae = evidence.abs_error_sum / evidence.labelled
    assert low < mae < high and high - low < 0.3 * mae
    assert mae_interval(ArmEvidence(0, 1, 1, 5.0, 25.0)) == (0.0, math.inf)


def test_capping_scales_a_device_s_error_sums_to_its_kept_share() -> None:
    evidence = capped_errors([(100, 4000.0, 200000.0), (1000, 30000.0, 1200000.0), (0, 0, 0)])
    # (mean |e| 40 and 30: neither is over twice the lower median's 30)
    assert (evidence.labelled, evidence.devices) == (200, 2)
    assert evidence.abs_error_sum == pytest.approx(4000.0 + 3000.0)
    assert evidence.sq_error_sum == pytest.approx(200000.0 + 120000.0)
    assert capped_errors([]) == ArmEvidence(0, 0, 0)
    clipped = capped_errors([(100, 3000.0, 90000.0), (100, 3000.0, 90000.0),
                             (100, 1e8, 1e14)])  # mean |e| 1e6: counted as 60 (f = 6e-5)
    assert clipped.abs_error_sum == pytest.approx(3000.0 * 2 + 6000.0)
    assert clipped.sq_error_sum == pytest.approx(90000.0 * 2 + 1e14 * 6e-5**2)


def test_one_hostile_regression_device_among_honest_ones_does_not_move_the_decision() -> None:
    """Honestly the champion is far better (MAE 30 against 60); one device claims the
    challenger never errs and the champion always errs by a lot, over a billion requests:
    its rows count like a median device's and its errors at most twice the median's."""
    record = ExperimentRecord("m", 1, 2, 0.5, ExperimentState.RUNNING, {},
                              ("d1", "d2", "d3", "evil"), 0.0, "op")
    stats = [_stats(d, v, 300, mae) for d in ("d1", "d2", "d3")
             for v, mae in ((1, 30.0), (2, 60.0))]
    stats += [ArmStatsRecord("evil", "m", 1, 10**9, 0, 1.0, 2.0, 10**9, 0, 0.0,
                             10**9 * 1e6, 10**9 * 1e12),
              ArmStatsRecord("evil", "m", 2, 10**9, 0, 1.0, 2.0, 10**9, 0, 0.0, 0.0, 0.0)]
    honest = arm_counts(record, [s for s in stats if s.device_id != "evil"], "regression")
    counts = arm_counts(record, stats, "regression")
    assert counts[1].labelled == 1200 and counts[2].labelled == 1200  # the liar: one median
    d = decide_errors(counts[1], counts[2], min_samples=200, min_devices=3)
    assert d.verdict == decide_errors(honest[1], honest[2], min_samples=200).verdict == "stop"
    results = arm_results(record, stats, "regression")
    assert results[0].task == "regression" and results[0].mae is not None
    assert results[0].mae_low <= results[0].mae <= results[0].mae_high


# ---------------------------------------------------------------- retraining


def test_margin_is_task_aware() -> None:
    policy = DriftPolicy(model="m", pipeline="p.toml", margin=2.5)
    assert check_policy(policy, "regression") is policy
    with pytest.raises(InvalidInputError, match=r"\[0, 1\)"):
        check_policy(policy)
    with pytest.raises(InvalidInputError, match="target units"):
        check_policy(DriftPolicy(model="m", pipeline="p.toml", margin=-1.0), "regression")


def test_acceptance_shows_the_trainer_s_summary_or_describes_old_files() -> None:
    assert acceptance_text({"accepted": True, "summary": "Wilcoxon p=0.001: accepted"}, 2) == (
        True, "Wilcoxon p=0.001: accepted")
    old = {"accepted": False, "rows": 9, "data": "held-out device samples", "margin": 0.01,
           "candidate_accuracy": 0.5, "baseline_accuracy": 0.9}
    assert acceptance_text(old, 3) == (
        False, "on 9 rows of held-out device samples: v3 0.500 vs current 0.900 (margin 0.01)")
    mae = {**old, "candidate_mae": 31.5, "baseline_mae": 40.0}
    assert "MAE 31.5 vs current 40" in acceptance_text(mae, 3)[1]
    assert acceptance_text({"rows": 1}, 3)[0] is False
    assert acceptance_text({"accepted": True}, 3) == (
        True, "acceptance.json lacks the figures to describe it")
