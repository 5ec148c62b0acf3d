"""The experiment's decision rule: it promotes a clearly better challenger and keeps the
false-positive rate of an equal one within its alpha, over many seeded runs."""

from __future__ import annotations

import numpy as np
import pytest

from control_plane.domain.experiments import decide, wilson_interval

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
