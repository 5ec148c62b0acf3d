"""The experiment's decision rule: it promotes a clearly better challenger and keeps the
false-positive rate of an equal one within its alpha, over many seeded runs."""

from __future__ import annotations

import numpy as np
import pytest

from control_plane.domain.experiments import (
    ArmEvidence,
    arm_counts,
    capped_sum,
    decide,
    wilson_interval,
)
from control_plane.domain.records import ArmStatsRecord, ExperimentRecord, ExperimentState

RUNS = 2000


def _rate(p_champion: float, p_challenger: float, n: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    promoted = 0
    for _ in range(RUNS):
        c1 = int(rng.binomial(n, p_champion))
        c2 = int(rng.binomial(n, p_challenger))
        promoted += decide((c1, n), (c2, n), min_samples=n).verdict == "promote"
    return promoted / RUNS


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_equal_challenger_is_promoted_no_more_than_alpha(seed: int) -> None:
    rate = _rate(0.9, 0.9, 300, seed)
    # alpha = 0.05; allow 3 binomial standard errors of the estimate over RUNS runs.
    assert rate <= 0.05 + 3 * (0.05 * 0.95 / RUNS) ** 0.5


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_clearly_better_challenger_is_promoted(seed: int) -> None:
    assert _rate(0.85, 0.95, 300, seed) >= 0.99


def test_worse_challenger_is_never_promoted() -> None:
    assert _rate(0.95, 0.85, 300, 4) == 0.0


def test_waits_for_enough_feedback() -> None:
    d = decide((90, 100), (199, 199), min_samples=200)
    assert d.verdict == "wait" and "200" in d.reason


def test_wilson_interval() -> None:
    low, high = wilson_interval(90, 100)
    assert 0.82 < low < 0.84 and 0.94 < high < 0.96
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(10, 10)
    assert high == pytest.approx(1.0) and 0.69 < low < 0.73


# ---------------------------------------------------------------- one device cannot decide


def test_one_device_weighs_at_most_as_much_as_the_median_device() -> None:
    honest = [(97, 100), (96, 100), (98, 100)]
    liar = (1_000_000, 1_000_000)  # claims a million perfect answers
    evidence = capped_sum([*honest, liar])
    assert evidence.devices == 4
    assert evidence.labelled == 400  # the liar counts like one median device
    assert evidence.correct == 97 + 96 + 98 + 100


def test_capping_keeps_a_device_s_accuracy_and_ignores_devices_without_feedback() -> None:
    evidence = capped_sum([(50, 100), (900, 1000), (0, 0)])
    assert (evidence.correct, evidence.labelled, evidence.devices) == (50 + 90, 200, 2)
    assert capped_sum([]) == capped_sum([(0, 0)]) == ArmEvidence(0, 0, 0)


def test_decision_waits_for_enough_devices() -> None:
    d = decide((270, 300), (290, 300), min_samples=200, devices=(3, 1), min_devices=3)
    assert d.verdict == "wait" and "3 devices" in d.reason
    assert decide((270, 300), (290, 300), min_samples=200, devices=(3, 3),
                  min_devices=3).verdict == "promote"


def test_one_hostile_device_among_honest_ones_does_not_move_the_decision() -> None:
    """The attack seen in the field: one device claims the challenger is perfect and the
    champion poor; honestly the champion is far better (97% against 14%)."""
    record = ExperimentRecord("m", 1, 2, 0.5, ExperimentState.RUNNING, {},
                              ("d1", "d2", "d3", "evil"), 0.0, "op")
    stats = [ArmStatsRecord(d, "m", v, 400, 0, 1.0, 2.0, 300, c, 0.0)
             for d in ("d1", "d2", "d3") for v, c in ((1, 291), (2, 42))]
    stats += [ArmStatsRecord("evil", "m", 1, 10**9, 0, 1.0, 2.0, 10**9, 0, 0.0),
              ArmStatsRecord("evil", "m", 2, 10**9, 0, 1.0, 2.0, 10**9, 10**9, 0.0)]
    counts = arm_counts(record, stats)
    champion, challenger = counts[1], counts[2]
    d = decide((champion.correct, champion.labelled), (challenger.correct, challenger.labelled),
               min_samples=200, devices=(champion.devices, challenger.devices), min_devices=3)
    assert d.verdict == "stop", d
    assert challenger.correct / challenger.labelled < champion.correct / champion.labelled
