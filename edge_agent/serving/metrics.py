"""Prometheus metrics of the serving path, read from ``ServingCore`` at scrape time.

Rules:

* A private ``CollectorRegistry`` (nothing global, so several cores or tests never clash).
* Nothing is counted twice: the request path updates only ``ArmStats``; a custom collector turns
  them into counters and a histogram when ``/metrics`` is scraped, so serving pays nothing for
  Prometheus.
* Labels: ``model``, ``version``, ``role`` ("primary" or "shadow"; a shadow counts the mirrored
  requests it answered). The latency histogram exports every tenth of the internal bounds
  (1 µs to 100 s, three buckets a decade).
* ``prometheus_client`` (~4 MiB resident with what it imports) is imported at the first scrape
  (or the first use of ``registry``), not when the HTTP listener starts: an agent nobody
  scrapes never loads it (docs/serving.md, "Agent footprint").
* The daemon adds its own numbers (drift score, outbox depth and drops, install state) with
  ``add_gauge`` (a callable read at scrape time) or by registering any collector on
  ``registry``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from edge_agent.serving.core import ServingCore
from edge_agent.serving.stats import LATENCY_BOUNDS_S

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )

__all__ = ["GaugeReader", "ServingMetrics"]

logger = logging.getLogger(__name__)

PROMETHEUS_BOUNDS_S: tuple[float, ...] = LATENCY_BOUNDS_S[::10]
_LABELS = ("model", "version", "role")

# A gauge's value: one number, or one per label-value tuple.
GaugeReader = Callable[[], float | Mapping[tuple[str, ...], float]]


class ServingMetrics:
    """The agent's Prometheus registry, with the serving collector already in it."""

    def __init__(self, core: ServingCore) -> None:
        self._collectors: list[Any] = [_ServingCollector(core)]
        self._registry: CollectorRegistry | None = None

    @property
    def registry(self) -> CollectorRegistry:
        """The registry (created, with everything added so far, on first use)."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry  # noqa: PLC0415

            registry = CollectorRegistry(auto_describe=False)
            for collector in self._collectors:
                registry.register(collector)
            self._registry = registry
        return self._registry

    def add_gauge(self, name: str, documentation: str, read: GaugeReader,
                  labelnames: Sequence[str] = ()) -> None:
        """Export ``read()`` as gauge ``name`` at every scrape (an error skips it, logged)."""
        collector = _GaugeCollector(name, documentation, read, tuple(labelnames))
        if self._registry is None:
            self._collectors.append(collector)
        else:
            self._registry.register(collector)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of everything registered, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest  # noqa: PLC0415

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _ServingCollector:
    def __init__(self, core: ServingCore) -> None:
        self._core = core

    def describe(self) -> list[Metric]:
        return list(_Families.new())

    def collect(self) -> Iterator[Metric]:
        f = _Families.new()
        for arm, shadow in self._core.arm_stats():
            labels = [arm.model, str(arm.version), "shadow" if shadow else "primary"]
            snap = arm.snapshot()
            f.requests.add_metric(labels, snap["requests"])
            f.errors.add_metric(labels, snap["errors"])
            f.feedback_rows.add_metric(labels, snap["feedback_rows"])
            f.feedback_correct.add_metric(labels, snap["feedback_correct"])
            if arm.regression:
                f.abs_error.add_metric(labels, snap["feedback_abs_error_sum"])
                f.sq_error.add_metric(labels, snap["feedback_sq_error_sum"])
            buckets, total = arm.histogram(PROMETHEUS_BOUNDS_S)
            f.latency.add_metric(labels, [(_le(b), float(n)) for b, n in buckets], total)
        stats = self._core.stats()
        for name, model in stats["models"].items():
            f.bad_requests.add_metric([name], model["bad_requests"])
            f.dropped.add_metric([name, "mirror"], model["mirror_dropped"])
            f.dropped.add_metric([name, "hook"], model["hook_dropped"])
        f.log_size.add_metric([], stats["feedback_log"]["size"])
        yield from f


class _Families(NamedTuple):
    requests: CounterMetricFamily
    errors: CounterMetricFamily
    latency: HistogramMetricFamily
    feedback_rows: CounterMetricFamily
    feedback_correct: CounterMetricFamily
    abs_error: CounterMetricFamily
    sq_error: CounterMetricFamily
    bad_requests: CounterMetricFamily
    dropped: CounterMetricFamily
    log_size: GaugeMetricFamily

    @classmethod
    def new(cls) -> _Families:
        from prometheus_client.metrics_core import (  # noqa: PLC0415 (first scrape)
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        return cls(
            CounterMetricFamily("edgefleet_serving_requests", "Requests answered by an arm",
                                labels=_LABELS),
            CounterMetricFamily("edgefleet_serving_errors", "Requests an arm failed on",
                                labels=_LABELS),
            HistogramMetricFamily("edgefleet_serving_latency_seconds",
                                  "Runtime latency of successful requests", labels=_LABELS),
            CounterMetricFamily("edgefleet_serving_feedback_rows",
                                "Answered rows that got a ground-truth label", labels=_LABELS),
            CounterMetricFamily("edgefleet_serving_feedback_correct",
                                "Labelled rows the arm predicted correctly", labels=_LABELS),
            CounterMetricFamily("edgefleet_serving_feedback_abs_error",
                                "Regression: sum of |prediction - label| over labelled rows",
                                labels=_LABELS),
            CounterMetricFamily("edgefleet_serving_feedback_squared_error",
                                "Regression: sum of (prediction - label)^2 over labelled rows",
                                labels=_LABELS),
            CounterMetricFamily("edgefleet_serving_bad_requests",
                                "Malformed requests refused before routing", labels=["model"]),
            CounterMetricFamily("edgefleet_serving_background_dropped",
                                "Shadow copies or hook calls dropped: the queue was full",
                                labels=["model", "kind"]),
            GaugeMetricFamily("edgefleet_serving_feedback_log_entries",
                              "Answered requests waiting for a label"),
        )


class _GaugeCollector:
    def __init__(self, name: str, documentation: str, read: GaugeReader,
                 labelnames: tuple[str, ...]) -> None:
        self._name = name
        self._doc = documentation
        self._read = read
        self._labelnames = labelnames

    def _family(self) -> GaugeMetricFamily:
        from prometheus_client.metrics_core import GaugeMetricFamily  # noqa: PLC0415

        return GaugeMetricFamily(self._name, self._doc, labels=self._labelnames)

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        try:
            value = self._read()
        except Exception:
            logger.exception("gauge %s could not be read", self._name)
            return
        if isinstance(value, Mapping):
            for labels, v in value.items():
                family.add_metric(list(labels), float(v))
        else:
            family.add_metric([], float(value))
        yield family


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else f"{bound:.6g}"
