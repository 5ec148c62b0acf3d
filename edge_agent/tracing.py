"""The agent's OpenTelemetry hooks: thin, and a no-op unless OpenTelemetry is on
(``[otel]`` in agent.toml or the standard OTEL_* variables). ``opentelemetry`` is imported only
then (through ``fleetcore.otel.start``), so the agent's footprint is unchanged when it is off.

An install continues the trace of the release that asked for it: the carrier beside the signed
document (gRPC ``SyncEvent.trace_context`` or MQTT 5 user properties) is the parent of an
``install`` span per model version, with one child span per install state (download, verify,
stage, smoke test, activate and probation) and a last one for the outcome (commit, fail, roll
back). The download's bundle requests carry the download span's context in their metadata, so
the control plane's ``FetchBundle`` spans join the same trace.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from fleetcore import otel as otel_setup
from fleetcore.otel import Otel
from fleetcore.release_doc import ReleaseDocument

__all__ = ["AgentTracing"]

log = logging.getLogger(__name__)

# Install states (edge_agent.install.lifecycle.InstallState values) and their span names.
_STEPS = {"downloading": "download", "verifying": "verify", "staged": "stage",
          "smoke-testing": "smoke test", "active": "activate and probation"}
_ENDS = {"committed": "commit", "failed": "fail", "rolled-back": "roll back"}
MAX_TRACED_INSTALLS = 64  # installs waiting for their outcome; the oldest is ended past this


class AgentTracing:
    def __init__(self, otel: Otel | None) -> None:
        self.otel = otel
        self._lock = threading.Lock()
        self._parents: dict[tuple[str, int], dict[str, str]] = {}
        # (name, version) -> (install span, its current step span or None)
        self._installs: dict[tuple[str, int], tuple[Any, Any]] = {}

    @classmethod
    def start(cls, section: Mapping[str, Any], device_id: str,
              labels: Mapping[str, str]) -> AgentTracing:
        settings = otel_setup.OtelSettings.load(section, os.environ)
        attributes = {"service.instance.id": device_id,
                      **{f"edgefleet.label.{k}": v for k, v in labels.items()}}
        return cls(otel_setup.start(settings, "edgefleet-agent", attributes))

    @property
    def enabled(self) -> bool:
        return self.otel is not None

    def inference_spans(self) -> Any:
        """The serving front ends' span maker (edge_agent/serving/spans.py), or None: off, or
        ``[otel] inference_sample_ratio`` 0 (then a request costs one attribute check)."""
        if self.otel is None or not self.otel.settings.inference_sample_ratio:
            return None
        from edge_agent.serving.spans import InferenceSpans  # noqa: PLC0415

        return InferenceSpans(self.otel.sampled_tracer(self.otel.settings.inference_sample_ratio),
                              self.otel.extract)

    def release(self, doc: ReleaseDocument, carrier: Mapping[str, str]) -> None:
        """A release arrived with this trace context: its versions' installs continue it."""
        if self.otel is None or not carrier:
            return
        with self._lock:
            for model in doc.models:
                for arm in model.arms:
                    self._parents[(model.name, arm.version)] = dict(carrier)
            while len(self._parents) > MAX_TRACED_INSTALLS:
                self._parents.pop(next(iter(self._parents)))

    def transition(self, name: str, version: int, state: str, reason: str) -> None:
        """An install state change (any thread): end the last step's span, begin the next."""
        if self.otel is None:
            return
        from opentelemetry.trace import Status, StatusCode, set_span_in_context  # noqa: PLC0415

        key = (name, version)
        with self._lock:
            install, step = self._installs.get(key, (None, None))
            if install is None:
                parent = self._parents.get(key)
                if parent is None or state not in _STEPS:
                    return  # an install no traced release asked for
                install = self.otel.tracer.start_span(
                    f"install {name}", context=self.otel.extract(parent),
                    attributes={"edgefleet.model": name, "edgefleet.version": version})
            if step is not None:
                step.end()
            context = set_span_in_context(install)
            if state in _ENDS:
                outcome = self.otel.tracer.start_span(
                    _ENDS[state], context=context, attributes={"edgefleet.reason": reason})
                outcome.end()
                if state != "committed":
                    install.set_status(Status(StatusCode.ERROR, reason[:200]))
                install.end()
                self._installs.pop(key, None)
                self._parents.pop(key, None)
                return
            step = self.otel.tracer.start_span(_STEPS.get(state, state), context=context)
            self._installs[key] = (install, step)
            while len(self._installs) > MAX_TRACED_INSTALLS:
                old, (span, current) = next(iter(self._installs.items()))
                for s in (current, span):
                    if s is not None:
                        s.end()
                self._installs.pop(old)

    @contextlib.contextmanager
    def current_step(self, name: str, version: int) -> Iterator[None]:
        """Make the install's current step span current (the download: its bundle requests
        carry it to the control plane)."""
        if self.otel is None:
            yield
            return
        from opentelemetry import context as otel_context  # noqa: PLC0415
        from opentelemetry.trace import set_span_in_context  # noqa: PLC0415

        with self._lock:
            _, step = self._installs.get((name, version), (None, None))
        if step is None:
            yield
            return
        token = otel_context.attach(set_span_in_context(step))
        try:
            yield
        finally:
            otel_context.detach(token)

    def export_metrics(self, registry: Any, max_age_seconds: float = 1.0) -> None:
        """The agent's own Prometheus registry (serving counters, outbox, drift, versions)
        through OpenTelemetry too, each sample's labels as attributes, under the agent's
        resource (``service.instance.id`` = the device id). The durable path for fleet numbers
        stays the outbox; this is a Collector's live view of the device."""
        if self.otel is None:
            return
        import time  # noqa: PLC0415

        from opentelemetry.metrics import CallbackOptions, Observation  # noqa: PLC0415

        cache: dict[str, Any] = {"at": -1.0, "samples": {}}
        lock = threading.Lock()

        def samples() -> dict[str, list[tuple[dict[str, str], float]]]:
            with lock:
                if time.monotonic() - cache["at"] > max_age_seconds:
                    out: dict[str, list[tuple[dict[str, str], float]]] = {}
                    for family in registry.collect():
                        for sample in family.samples:
                            out.setdefault(sample.name, []).append(
                                (dict(sample.labels), float(sample.value)))
                    cache["samples"], cache["at"] = out, time.monotonic()
                return dict(cache["samples"])

        def callback(name: str) -> Any:
            def observe(options: CallbackOptions) -> list[Observation]:
                return [Observation(value, labels) for labels, value in samples().get(name, [])]
            return observe

        for family in registry.collect():
            if family.type == "counter":
                names = [(family.name + "_total", True)]
            elif family.type == "histogram":  # buckets stay on /metrics
                names = [(family.name + "_count", True), (family.name + "_sum", True)]
            else:
                names = [(family.name, False)]
            for name, monotonic in names:
                if monotonic:
                    self.otel.meter.create_observable_counter(
                        name, [callback(name)], description=family.documentation)
                else:
                    self.otel.meter.create_observable_gauge(
                        name, [callback(name)], description=family.documentation)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The current span's W3C context as gRPC metadata (empty when none or off)."""
        if self.otel is None:
            return ()
        return tuple(sorted(self.otel.inject().items()))

    def shutdown(self) -> None:
        if self.otel is not None:
            with self._lock:
                for install, step in self._installs.values():
                    for s in (step, install):
                        if s is not None:
                            s.end()
                self._installs.clear()
            self.otel.shutdown()
            self.otel = None
