"""The statistics that decide an experiment: champion vs challenger accuracy from feedback.

Test: a one-sided two-proportion z-test (H0: the challenger is not more accurate; H1: it is),
made exactly once, at the first evaluation where both arms have at least ``min_samples``
labelled requests (a fixed-horizon design: no repeated peeking, so the false-positive rate is
at most ``alpha``). Significant and better → promote the challenger; otherwise → stop the
experiment and keep the champion. Each arm's accuracy is shown with a 95% Wilson interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["TEST_NAME", "Decision", "decide", "wilson_interval"]

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
           alpha: float = 0.05) -> Decision:
    """``champion`` and ``challenger`` are (correct, labelled) counts."""
    (c1, n1), (c2, n2) = champion, challenger
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
