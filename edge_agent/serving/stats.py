"""Per-arm serving numbers, in bounded memory, and the request log that feedback scores against.

Rules:

* ``ArmStats`` counts requests, errors, a latency histogram and feedback (correct / scored
  rows; for a regression model the sums of absolute and squared errors of the scored rows
  instead of correct ones) for one (model, version). Shadow arms count the mirrored requests
  they answered.
* ``LatencyHistogram`` has fixed buckets: bounds 10**(k/20) s for k in -120..40, i.e. 1 µs to
  100 s at 12% steps (161 bounds and an overflow bucket), so memory does not grow with traffic.
  Quantiles interpolate geometrically inside the bucket that holds them.
* ``PredictionLog`` maps request id -> (model, version, predicted classes or values) for
  requests that
  carried an id, least recently used first out past ``capacity`` entries or ``max_bytes``
  accounted bytes (so the ids the agent can score are the most recent ones). An entry's bytes
  (``entry_bytes``) count its id, classes, sampled rows and parameters and each shadow answer,
  on top of a measured fixed overhead. Shadow answers join the entry when they arrive.
  Feedback takes the entry out: a request is scored once.
* Everything here is thread-safe (one lock per object, held for a few attribute updates).
"""

from __future__ import annotations

import bisect
import math
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "LATENCY_BOUNDS_S",
    "ArmStats",
    "LatencyHistogram",
    "Pending",
    "Predicted",
    "PredictionLog",
    "as_classes",
    "entry_bytes",
]

LATENCY_BOUNDS_S: tuple[float, ...] = tuple(10 ** (k / 20) for k in range(-120, 41))
# What a request was answered with, one entry per row: class ids, or values (regression).
Predicted = int | float | tuple[int, ...] | tuple[float, ...]


class LatencyHistogram:
    """Fixed-bucket latency histogram (not locked: its owner holds the lock)."""

    __slots__ = ("count", "counts", "sum_s")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BOUNDS_S) + 1)  # the last one is the overflow
        self.count = 0
        self.sum_s = 0.0

    def record(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BOUNDS_S, seconds)] += 1
        self.count += 1
        self.sum_s += seconds

    def quantile(self, q: float) -> float | None:
        """The q-quantile in seconds (None when empty); the last bound if it overflowed."""
        if self.count == 0:
            return None
        target = q * self.count
        seen = 0
        for i, n in enumerate(self.counts):
            if n and seen + n >= target:
                if i == len(LATENCY_BOUNDS_S):
                    return LATENCY_BOUNDS_S[-1]
                upper = LATENCY_BOUNDS_S[i]
                lower = LATENCY_BOUNDS_S[i - 1] if i else upper / 10 ** (1 / 20)
                frac = min(1.0, max(0.0, (target - seen) / n))
                return lower * (upper / lower) ** frac
            seen += n
        return LATENCY_BOUNDS_S[-1]

    def cumulative(self, bounds: tuple[float, ...]) -> list[tuple[float, int]]:
        """(upper bound, count of samples <= it) for ``bounds`` (a subset of ours), then +Inf."""
        out: list[tuple[float, int]] = []
        running, j = 0, 0
        for bound in bounds:
            while j < len(LATENCY_BOUNDS_S) and LATENCY_BOUNDS_S[j] <= bound * (1 + 1e-9):
                running += self.counts[j]
                j += 1
            out.append((bound, running))
        out.append((math.inf, self.count))
        return out


class ArmStats:
    """Counters for one arm of one model (see the module rules)."""

    def __init__(self, model: str, version: int, task: str = "classification") -> None:
        self.model = model
        self.version = version
        self.regression = task == "regression"
        self.requests = 0
        self.errors = 0
        self.rows = 0  # rows answered (the protocol's inference_count)
        self.executions = 0  # runtime calls (fewer than requests when batched)
        self.last_inference_s = 0.0  # wall clock of the last answer (0: none yet)
        self.latency = LatencyHistogram()
        self.scored = 0  # rows that got a ground-truth label
        self.correct = 0
        self.abs_error_sum = 0.0  # regression: sum |predicted - label| over scored rows
        self.sq_error_sum = 0.0  # regression: sum (predicted - label)^2 over scored rows
        self._lock = threading.Lock()

    def record(self, ok: bool, latency_s: float, rows: int = 1, executions: int = 1) -> None:
        """One request of ``rows`` rows; ``executions``: the runtime calls it started (0 for
        a request answered as part of another's batch)."""
        now = time.time()
        with self._lock:
            self.requests += 1
            self.executions += executions
            self.last_inference_s = now
            if ok:
                self.rows += rows
                self.latency.record(latency_s)
            else:
                self.errors += 1

    def score(self, correct: int, scored: int) -> None:
        with self._lock:
            self.correct += correct
            self.scored += scored

    def score_errors(self, predicted: tuple[float, ...], labels: list[float]) -> None:
        """Score a regression answer: one predicted value and one true value per row (labels
        are finite and bounded by the caller, so the sums stay finite)."""
        # A row the model answered with NaN or Inf is not scored (its error has no size).
        errors = [p - y for p, y in zip(predicted, labels, strict=True) if math.isfinite(p)]
        absolute = math.fsum(abs(e) for e in errors)
        squared = math.fsum(e * e for e in errors)
        with self._lock:
            self.abs_error_sum += absolute
            self.sq_error_sum += squared
            self.scored += len(errors)

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready numbers (latencies in seconds; accuracy and MAE None before any
        feedback; a regression arm's accuracy stays None, a classifier's MAE too)."""
        with self._lock:
            regression = self.regression
            return {
                "requests": self.requests,
                "errors": self.errors,
                "rows": self.rows,
                "executions": self.executions,
                "last_inference_s": self.last_inference_s,
                "latency_sum_s": self.latency.sum_s,
                "latency_p50_s": self.latency.quantile(0.50),
                "latency_p95_s": self.latency.quantile(0.95),
                "feedback_rows": self.scored,
                "feedback_correct": self.correct,
                "accuracy": (self.correct / self.scored
                             if self.scored and not regression else None),
                "feedback_abs_error_sum": self.abs_error_sum,
                "feedback_sq_error_sum": self.sq_error_sum,
                "mae": self.abs_error_sum / self.scored if regression and self.scored else None,
            }

    def histogram(self, bounds: tuple[float, ...]) -> tuple[list[tuple[float, int]], float]:
        with self._lock:
            return self.latency.cumulative(bounds), self.latency.sum_s


@dataclass(slots=True)
class Pending:
    """What a request with an id was answered with, waiting for its label.

    Kept small: one int when the request had one row, no shadow dict until a shadow answers.
    An entry with a 36-character id and its LRU links takes ~250 bytes (tracemalloc), so a
    full log of the default 100k entries holds ~25 MB.
    """

    model: str
    version: int
    arm: ArmStats  # the arm to score (even if the version is no longer served)
    classes: Predicted  # predicted class (or value, for regression): one per request row
    shadows: dict[int, tuple[ArmStats, Predicted]] | None = None
    # Only for a request chosen as a training sample: its rows and request parameters.
    sample: tuple[np.ndarray, Mapping[str, str]] | None = None
    cost: int = 0  # accounted bytes, kept by the log that holds it (``entry_bytes``)

    @property
    def rows(self) -> int:
        return 1 if isinstance(self.classes, int | float) else len(self.classes)


# What an entry costs besides its id and variable parts: the ``Pending`` object, the
# OrderedDict slot and links (the ~250 bytes per entry measured with tracemalloc, less the
# 36-character id's 85).
_ENTRY_BYTES = 170
_SHADOW_BYTES = 200  # a dict slot, a tuple, an int (the dict itself is counted once more)


def _classes_bytes(classes: Predicted) -> int:
    return 0 if isinstance(classes, int | float) else sys.getsizeof(classes) + 32 * len(classes)


def entry_bytes(request_id: str, pending: Pending) -> int:
    """The accounted bytes of one ``PredictionLog`` entry (module rules)."""
    size = _ENTRY_BYTES + sys.getsizeof(request_id) + _classes_bytes(pending.classes)
    if pending.sample is not None:
        rows, params = pending.sample
        size += rows.nbytes + 128 + sum(sys.getsizeof(k) + sys.getsizeof(v)
                                        for k, v in params.items())
    if pending.shadows is not None:
        size += _SHADOW_BYTES * (1 + len(pending.shadows)) + sum(
            _classes_bytes(classes) for _, classes in pending.shadows.values())
    return size


def as_classes(predicted: list[int] | list[float]) -> Predicted:
    """The compact form ``Pending`` stores: an int (float) for one row, else a tuple."""
    return predicted[0] if len(predicted) == 1 else tuple(predicted)


class PredictionLog:
    """Bounded LRU of request id -> ``Pending`` (see the module rules)."""

    def __init__(self, capacity: int = 100_000, *, max_bytes: int = 64 * 1024 * 1024) -> None:
        if capacity < 1 or max_bytes < 1:
            raise ValueError(f"capacity and max_bytes must be >= 1; got {capacity}, {max_bytes}")
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.evicted = 0
        self.bytes = 0  # accounted bytes of every entry held (``entry_bytes``)
        self._entries: OrderedDict[str, Pending] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, request_id: str, pending: Pending) -> None:
        cost = entry_bytes(request_id, pending)
        with self._lock:
            entries = self._entries
            old = entries.pop(request_id, None)
            if old is not None:
                self.bytes -= old.cost
            pending.cost = cost
            entries[request_id] = pending
            self.bytes += cost
            self._shrink()

    def add_shadow(self, request_id: str, model: str, arm: ArmStats,
                   classes: Predicted) -> None:
        with self._lock:
            pending = self._entries.get(request_id)
            if pending is not None and pending.model == model:
                if pending.shadows is None:
                    pending.shadows = {}
                    pending.cost += _SHADOW_BYTES
                    self.bytes += _SHADOW_BYTES
                added = _SHADOW_BYTES + _classes_bytes(classes)
                old = pending.shadows.get(arm.version)
                if old is not None:
                    added -= _SHADOW_BYTES + _classes_bytes(old[1])
                pending.shadows[arm.version] = (arm, classes)
                pending.cost += added
                self.bytes += added
                self._shrink()

    def _shrink(self) -> None:
        entries = self._entries
        while entries and (len(entries) > self.capacity or self.bytes > self.max_bytes):
            _, gone = entries.popitem(last=False)
            self.bytes -= gone.cost
            self.evicted += 1

    def peek_rows(self, request_id: str, model: str) -> int | None:
        """How many rows the request had, or None when its id is unknown for ``model``."""
        with self._lock:
            pending = self._entries.get(request_id)
            return None if pending is None or pending.model != model else pending.rows

    def take(self, request_id: str, model: str) -> Pending | None:
        with self._lock:
            pending = self._entries.get(request_id)
            if pending is None or pending.model != model:
                return None
            del self._entries[request_id]
            self.bytes -= pending.cost
            return pending
