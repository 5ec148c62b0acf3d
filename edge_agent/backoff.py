"""Exponential backoff with full jitter.

After the n-th consecutive failure the delay is drawn uniformly from [floor, c] with
c = min(max, initial * 2^n) ("full jitter": the whole window, not its upper half): a fleet that
lost its replica at the same moment comes back spread over the window instead of in waves, and
the expected delay still doubles per failure, so each agent's retry rate is bounded. The floor
(a tenth of ``initial``) keeps a single agent from retrying in a tight loop.
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
        self.floor = self.initial / 10
        self.failures = 0
        self._rng = rng or random.Random()  # noqa: S311 (jitter, not cryptography)

    def ceiling(self) -> float:
        """The upper end of the next delay's window."""
        return min(self.max, self.initial * (2 ** min(self.failures, 30)))

    def next_delay(self) -> float:
        ceiling = self.ceiling()
        self.failures += 1
        return self._rng.uniform(self.floor, ceiling)

    def reset(self) -> None:
        self.failures = 0
