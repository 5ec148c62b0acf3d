"""Probation of a newly activated model version: commit it or roll it back locally.

Rules (``Probation.decide``; time is passed in, nothing here reads a clock):

* once ``min_requests`` requests are in: rollback if the error rate exceeds ``max_error_rate`` or,
  when a baseline is known, p95 latency exceeds ``baseline_p95_s * max_latency_ratio``; else
  commit.
* before that, rollback as soon as the errors seen exceed what ``min_requests`` requests could
  absorb (``errors > max_error_rate * min_requests``): the rate at ``min_requests`` is decided.
* once ``max_seconds`` have passed since the start with no regression found, commit: a quiet
  device must not keep a version in probation forever (its latency sample is then too small to
  judge, so only the error rule above applies).
* otherwise wait.

Memory is bounded: counters plus a uniform reservoir sample of at most ``max_samples``
latencies (Vitter's algorithm R, seeded, so the same inputs give the same decision).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

__all__ = ["Decision", "Probation", "ProbationPolicy"]

Decision = Literal["wait", "commit", "rollback"]


@dataclass(frozen=True)
class ProbationPolicy:
    min_requests: int = 50
    max_error_rate: float = 0.05  # fraction of requests
    max_latency_ratio: float = 2.0  # new p95 / baseline p95
    max_seconds: float = 600.0  # from activation to a forced decision
    max_samples: int = 2048  # latencies kept for the p95 estimate


class Probation:
    """Health of one version in probation: counts and a bounded latency sample."""

    def __init__(self, policy: ProbationPolicy, started_at: float, *, seed: int = 0) -> None:
        if policy.min_requests < 1 or policy.max_samples < 1:
            raise ValueError("min_requests and max_samples must be >= 1")
        self.policy = policy
        self.started_at = started_at
        self.requests = 0
        self.errors = 0
        self.reason = "no decision yet"
        self._samples: list[float] = []
        self._rng = random.Random(seed)  # noqa: S311 (sampling, not security)

    @property
    def sample_size(self) -> int:
        return len(self._samples)

    def record(self, ok: bool, latency_s: float) -> None:
        self.requests += 1
        if not ok:
            self.errors += 1
        if len(self._samples) < self.policy.max_samples:
            self._samples.append(latency_s)
        else:
            slot = self._rng.randrange(self.requests)
            if slot < self.policy.max_samples:
                self._samples[slot] = latency_s

    def p95_s(self) -> float | None:
        """Nearest-rank 95th percentile of the sampled latencies; None before any request."""
        if not self._samples:
            return None
        ordered = sorted(self._samples)
        return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]

    def decide(self, now: float, baseline_p95_s: float | None) -> Decision:
        """Wait, commit or rollback; ``self.reason`` says why."""
        p = self.policy
        if self.requests >= p.min_requests:
            rate = self.errors / self.requests
            if rate > p.max_error_rate:
                return self._say("rollback", f"error rate {rate:.3f} ({self.errors} of "
                                             f"{self.requests}) exceeds {p.max_error_rate}")
            p95 = self.p95_s()
            if baseline_p95_s is not None and p95 is not None and (
                p95 > baseline_p95_s * p.max_latency_ratio
            ):
                return self._say("rollback", f"p95 latency {p95 * 1e3:.3f} ms exceeds "
                                             f"{p.max_latency_ratio} x baseline "
                                             f"{baseline_p95_s * 1e3:.3f} ms")
            return self._say("commit", f"{self.requests} requests, {self.errors} errors, "
                                       f"no regression")
        if self.errors > p.max_error_rate * p.min_requests:
            return self._say("rollback", f"{self.errors} errors in {self.requests} requests: "
                                         f"the rate at {p.min_requests} requests would exceed "
                                         f"{p.max_error_rate} whatever follows")
        if now - self.started_at >= p.max_seconds:
            return self._say("commit", f"{now - self.started_at:.0f} s in probation with "
                                       f"{self.requests} requests and no regression")
        return self._say("wait", f"{self.requests} of {p.min_requests} requests seen")

    def _say(self, decision: Decision, reason: str) -> Decision:
        self.reason = reason
        return decision
