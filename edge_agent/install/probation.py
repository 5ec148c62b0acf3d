"""Probation of a newly activated model version: commit it or roll it back locally.

Rules (``Probation.decide``; time is passed in, nothing here reads a clock), in this order:

* rollback once the agent has started ``max_restarts`` times while this version was on
  probation (a crash loop: the version may be what kills the agent, and the counter is
  persisted before the model is loaded again; the boot-counter idea of Mender and RAUC).
* once ``min_requests`` requests are in: rollback if the error rate exceeds ``max_error_rate`` or,
  when a baseline is known, p95 latency exceeds ``baseline_p95_s * max_latency_ratio``. The
  baseline is the p95 the previous version SERVED on this device (``LatencySample`` of its
  requests, measured the same way, around the runtime call): like is compared with like.
* before that, rollback as soon as the errors seen exceed what ``min_requests`` requests could
  absorb (``errors > max_error_rate * min_requests``): the rate at ``min_requests`` is decided.
* once ``max_seconds`` have passed since the start with no regression found, the version is
  healthy: a quiet device must not keep a version in probation forever (its latency sample is
  then too small to judge, so only the error rule above applies).
* a healthy version commits only when ``acknowledged``: the control plane (or the MQTT broker)
  has acknowledged a report that this device serves it. Until then it waits, still judged by
  the rules above, so a device that lost contact never commits silently.
* otherwise wait.

Memory is bounded: counters plus a uniform reservoir sample of at most ``max_samples``
latencies (Vitter's algorithm R, seeded, so the same inputs give the same decision). The
whole state round-trips through ``to_doc``/``from_doc`` so that it survives restarts.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Decision", "LatencySample", "Probation", "ProbationPolicy"]

Decision = Literal["wait", "commit", "rollback"]


@dataclass(frozen=True)
class ProbationPolicy:
    min_requests: int = 50
    max_error_rate: float = 0.05  # fraction of requests
    max_latency_ratio: float = 2.0  # new p95 / baseline p95
    max_seconds: float = 600.0  # from activation to a forced decision
    max_samples: int = 2048  # latencies kept for the p95 estimate
    max_restarts: int = 3  # agent starts while on probation before a rollback


class LatencySample:
    """A bounded uniform sample of latencies (reservoir) and its p95."""

    def __init__(self, max_samples: int, *, seed: int = 0,
                 samples: list[float] | None = None, seen: int = 0) -> None:
        if max_samples < 1:
            raise ValueError("max_samples must be >= 1")
        self.max_samples = max_samples
        self.seen = seen
        self.samples: list[float] = list(samples or [])[:max_samples]
        self._rng = random.Random(seed + seen)  # noqa: S311 (sampling, not security)

    def add(self, latency_s: float) -> None:
        self.seen += 1
        if len(self.samples) < self.max_samples:
            self.samples.append(latency_s)
        else:
            slot = self._rng.randrange(self.seen)
            if slot < self.max_samples:
                self.samples[slot] = latency_s

    def p95_s(self) -> float | None:
        """Nearest-rank 95th percentile of the sampled latencies; None before any."""
        if not self.samples:
            return None
        ordered = sorted(self.samples)
        return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


class Probation:
    """Health of one version in probation: counts, a bounded latency sample, restarts."""

    def __init__(self, policy: ProbationPolicy, started_at: float, *, seed: int = 0,
                 baseline_p95_s: float | None = None) -> None:
        if policy.min_requests < 1 or policy.max_samples < 1:
            raise ValueError("min_requests and max_samples must be >= 1")
        self.policy = policy
        self.started_at = started_at
        self.baseline_p95_s = baseline_p95_s
        self.requests = 0
        self.errors = 0
        self.restarts = 0
        self.acknowledged = False
        self.reason = "no decision yet"
        self._latency = LatencySample(policy.max_samples, seed=seed)

    @property
    def sample_size(self) -> int:
        return len(self._latency.samples)

    def latency_sample(self) -> LatencySample:
        """A copy of the latency sample (to go on sampling the version once committed)."""
        return LatencySample(self.policy.max_samples, samples=self._latency.samples,
                             seen=self._latency.seen)

    def record(self, ok: bool, latency_s: float) -> None:
        self.requests += 1
        if ok:  # a failure counts as an error; its latency says nothing about the model's
            self._latency.add(latency_s)
        else:
            self.errors += 1

    def p95_s(self) -> float | None:
        """Nearest-rank 95th percentile of the sampled latencies; None before any request."""
        return self._latency.p95_s()

    def decide(self, now: float, baseline_p95_s: float | None, *,
               acknowledged: bool) -> Decision:
        """Wait, commit or rollback; ``self.reason`` says why."""
        regression = self._regression(baseline_p95_s)
        if regression is not None:
            return self._say("rollback", regression)
        p = self.policy
        if self.requests >= p.min_requests:
            healthy = f"{self.requests} requests, {self.errors} errors, no regression"
        elif now - self.started_at >= p.max_seconds:
            healthy = (f"{now - self.started_at:.0f} s in probation with {self.requests} "
                       f"requests and no regression")
        else:
            return self._say("wait", f"{self.requests} of {p.min_requests} requests seen")
        if not acknowledged:
            return self._say("wait", f"healthy ({healthy}); waiting for the control plane to "
                                     f"acknowledge a report of this version")
        return self._say("commit", healthy)

    def _regression(self, baseline_p95_s: float | None) -> str | None:
        """Why the version must be rolled back, or None."""
        p = self.policy
        if self.restarts >= p.max_restarts:
            return (f"the agent restarted {self.restarts} times while this version was on "
                    f"probation (limit {p.max_restarts}): a crash loop")
        if self.requests < p.min_requests:
            if self.errors > p.max_error_rate * p.min_requests:
                return (f"{self.errors} errors in {self.requests} requests: the rate at "
                        f"{p.min_requests} requests would exceed {p.max_error_rate} whatever "
                        f"follows")
            return None
        rate = self.errors / self.requests
        if rate > p.max_error_rate:
            return (f"error rate {rate:.3f} ({self.errors} of {self.requests}) exceeds "
                    f"{p.max_error_rate}")
        p95 = self.p95_s()
        if baseline_p95_s is not None and p95 is not None and (
            p95 > baseline_p95_s * p.max_latency_ratio
        ):
            return (f"served p95 latency {p95 * 1e3:.3f} ms exceeds {p.max_latency_ratio} x "
                    f"the previous version's served p95 {baseline_p95_s * 1e3:.3f} ms")
        return None

    def _say(self, decision: Decision, reason: str) -> Decision:
        self.reason = reason
        return decision

    # ------------------------------------------------------------------ persistence
    def to_doc(self, version: int) -> dict[str, Any]:
        return {"version": version, "started_at": self.started_at,
                "baseline_p95_s": self.baseline_p95_s, "requests": self.requests,
                "errors": self.errors, "restarts": self.restarts,
                "acknowledged": self.acknowledged, "samples": list(self._latency.samples)}

    @classmethod
    def from_doc(cls, policy: ProbationPolicy, doc: dict[str, Any]) -> Probation:
        """The probation a document saved; a malformed one raises ValueError/TypeError/
        KeyError (the caller starts over, counting the restart)."""
        baseline = doc.get("baseline_p95_s")
        p = cls(policy, float(doc["started_at"]),
                baseline_p95_s=None if baseline is None else float(baseline))
        p.requests, p.errors = int(doc["requests"]), int(doc["errors"])
        p.restarts = int(doc["restarts"])
        p.acknowledged = doc["acknowledged"] is True
        samples = [float(x) for x in doc.get("samples", [])]
        ok = p.requests - p.errors
        if not 0 <= p.errors <= p.requests or p.restarts < 0 or len(samples) > ok:
            raise ValueError(f"inconsistent probation document: {doc}")
        p._latency = LatencySample(policy.max_samples, samples=samples, seen=ok)
        return p
