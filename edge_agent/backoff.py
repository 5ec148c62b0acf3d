"""Exponential backoff with jitter.

After the n-th consecutive failure the delay is drawn uniformly from [c/2, c] with
c = min(max, initial * 2^n): the jitter spreads a fleet that lost its control plane at the same
moment, and the floor of c/2 keeps a single agent from retrying in a tight loop.
"""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    def __init__(
        self, initial_seconds: float, max_seconds: float, rng: random.Random | None = None
    ) -> None:
        self.initial = max(initial_seconds, 0.001)
        self.max = max(max_seconds, self.initial)
        self.failures = 0
        self._rng = rng or random.Random()  # noqa: S311 (jitter, not cryptography)

    def next_delay(self) -> float:
        ceiling = min(self.max, self.initial * (2 ** min(self.failures, 30)))
        self.failures += 1
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0
