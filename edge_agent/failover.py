"""Which control-plane replica an agent talks to, and where it goes when that one dies.

Pure rules (no I/O): the agent holds every replica's API address (from enrollment), walks them
in an order of its own, drawn at random when it starts, so that the agents of a fleet spread
over the replicas and the agents of a dead replica do not all land on the same next one. A
failure moves it to the next address only if the failed address is still the current one: two
loops (heartbeat and release stream) that see the same replica die move the agent once.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

__all__ = ["AddressRing"]


class AddressRing:
    def __init__(self, addresses: Sequence[str], rng: random.Random | None = None) -> None:
        unique = list(dict.fromkeys(a for a in addresses if a))
        if not unique:
            raise ValueError("no API address to connect to")
        (rng or random.Random()).shuffle(unique)  # noqa: S311 (spread, not cryptography)
        self.order: tuple[str, ...] = tuple(unique)
        self._index = 0

    @property
    def current(self) -> str:
        return self.order[self._index]

    def __len__(self) -> int:
        return len(self.order)

    def advance(self, failed: str) -> bool:
        """``failed`` stopped answering: move past it. True when the current address changed
        (False: another caller already moved on, or there is nowhere else to go)."""
        if failed != self.current or len(self.order) == 1:
            return False
        self._index = (self._index + 1) % len(self.order)
        return True
