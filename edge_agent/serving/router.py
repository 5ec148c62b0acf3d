"""The A/B router: which version answers a request, and which shadow versions get a copy.

Pure: no I/O, no clock; the only state is the seedable RNG.

Rules:

* Arms come from a release: ``(version, weight, shadow)``. Versions are unique and > 0; weights
  are finite and >= 0. Non-shadow arms share the traffic in proportion to their weights (the
  release makes them sum to 1; here they are normalized, so any positive total works). At least
  one non-shadow arm must have a positive weight. A shadow arm's weight is ignored: it never
  answers a routed request, it gets a mirrored copy of every one.
* ``choose(routing_key)`` draws u in [0, 1) and returns the first arm whose cumulative share
  exceeds u. With a routing key, u is the key's BLAKE2b-64 hash / 2**64, so the same key lands on
  the same arm for as long as the weights do not change (and, since arms keep their order,
  a small weight change moves only the keys near a boundary). Without one, u comes from the RNG.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

from fleetcore.errors import InvalidInputError

__all__ = ["Router", "RouterArm", "key_point"]

_TWO_64 = float(2**64)


@dataclass(frozen=True)
class RouterArm:
    version: int
    weight: float
    shadow: bool = False


def key_point(routing_key: str) -> float:
    """A stable point in [0, 1) for a routing key (the same on every host and run)."""
    digest = hashlib.blake2b(routing_key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _TWO_64


class Router:
    """Weighted, key-sticky choice among a model's arms (see the module rules)."""

    def __init__(self, arms: Iterable[RouterArm | tuple[int, float, bool]], *,
                 rng: random.Random | None = None) -> None:
        self.arms: tuple[RouterArm, ...] = tuple(
            a if isinstance(a, RouterArm) else RouterArm(int(a[0]), float(a[1]), bool(a[2]))
            for a in arms
        )
        _check(self.arms)
        self._rng = rng or random.Random()  # noqa: S311 (traffic split, not security)
        primaries = [a for a in self.arms if not a.shadow and a.weight > 0]
        total = math.fsum(a.weight for a in primaries)
        self._versions = tuple(a.version for a in primaries)
        cumulative, acc = [], 0.0
        for arm in primaries:
            acc += arm.weight / total
            cumulative.append(acc)
        cumulative[-1] = 1.0  # no gap at the top from rounding
        self._cumulative = cumulative
        self.shadows: tuple[int, ...] = tuple(a.version for a in self.arms if a.shadow)
        self._single = self._versions[0] if len(self._versions) == 1 else None

    @property
    def versions(self) -> tuple[int, ...]:
        """Every arm's version, primaries and shadows, in release order."""
        return tuple(a.version for a in self.arms)

    def share(self, version: int) -> float:
        """The fraction of routed traffic ``version`` answers (0.0 for shadows and unknowns)."""
        if version not in self._versions:
            return 0.0
        i = self._versions.index(version)
        return self._cumulative[i] - (self._cumulative[i - 1] if i else 0.0)

    def choose(self, routing_key: str | None = None) -> tuple[int, tuple[int, ...]]:
        """(the version that answers, the shadow versions that get a mirrored copy)."""
        if self._single is not None:
            return self._single, self.shadows
        u = self._rng.random() if routing_key is None else key_point(routing_key)
        i = bisect.bisect_right(self._cumulative, u)
        return self._versions[min(i, len(self._versions) - 1)], self.shadows


def _check(arms: tuple[RouterArm, ...]) -> None:
    if not arms:
        raise InvalidInputError("a model needs at least one arm")
    versions = [a.version for a in arms]
    if len(set(versions)) != len(versions):
        raise InvalidInputError(f"arm versions must be unique; got {versions}")
    for arm in arms:
        if arm.version <= 0:
            raise InvalidInputError(f"arm versions must be > 0; got {arm.version}")
        if not math.isfinite(arm.weight) or arm.weight < 0:
            raise InvalidInputError(f"arm weights must be finite and >= 0; v{arm.version} has "
                             f"{arm.weight}")
    if not any(a.weight > 0 and not a.shadow for a in arms):
        raise InvalidInputError("at least one non-shadow arm needs a positive weight; got "
                         f"{[(a.version, a.weight, a.shadow) for a in arms]}")
