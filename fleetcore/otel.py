"""OpenTelemetry for every component, off by default (docs/observability.md).

Turned on the standard way (``OTEL_EXPORTER_OTLP_ENDPOINT`` or a per-signal endpoint set, and
``OTEL_SDK_DISABLED`` not ``true``) or by an ``[otel]`` section with ``enabled = true``; every
other standard variable (``OTEL_EXPORTER_OTLP_PROTOCOL``, ``OTEL_EXPORTER_OTLP_HEADERS``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_SERVICE_NAME``, ``OTEL_METRIC_EXPORT_INTERVAL``,
``OTEL_BSP_*``, ...) is read by the SDK itself.

Nothing here imports ``opentelemetry`` until ``start`` finds it enabled: the agent's footprint
does not grow when it is off. Each component builds its own providers (never the global ones),
so a control plane and an agent in one process (the tests) keep their own resources.

W3C trace context (``traceparent``, ``tracestate``) is what crosses processes: in gRPC metadata,
in MQTT 5 user properties, and beside (never inside) the signed release document.
``check_carrier`` bounds what a peer sends before anything parses it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from fleetcore.errors import InvalidInputError

__all__ = ["TRACE_KEYS", "Otel", "OtelSettings", "check_carrier", "new_traceparent",
           "start", "trace_id_of"]

TRACE_KEYS = ("traceparent", "tracestate")
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
MAX_TRACESTATE = 512  # the W3C limit is 32 members; 512 characters is plenty for them
_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                  "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT")
PROTOCOLS = ("grpc", "http/protobuf")


def check_carrier(carrier: Mapping[str, str]) -> dict[str, str]:
    """The W3C keys of an untrusted carrier, well-formed and bounded; anything else dropped."""
    out: dict[str, str] = {}
    parent = carrier.get("traceparent", "")
    if isinstance(parent, str) and _TRACEPARENT.fullmatch(parent) and (
            parent[3:35] != "0" * 32 and parent[36:52] != "0" * 16):
        out["traceparent"] = parent
        state = carrier.get("tracestate", "")
        if isinstance(state, str) and state and len(state) <= MAX_TRACESTATE and (
                state.isascii() and state.isprintable()):
            out["tracestate"] = state
    return out


def new_traceparent() -> str:
    """A fresh sampled W3C traceparent (what a client without the SDK starts a trace with)."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def trace_id_of(traceparent: str) -> str:
    m = _TRACEPARENT.fullmatch(traceparent)
    return m.group(1) if m else ""


@dataclass(frozen=True)
class OtelSettings:
    enabled: bool = False
    endpoint: str = ""  # empty: the SDK reads OTEL_EXPORTER_OTLP_*_ENDPOINT itself
    protocol: str = "grpc"
    metric_interval_seconds: float = 0.0  # 0: OTEL_METRIC_EXPORT_INTERVAL or the SDK's 60 s
    logs: bool = True  # the logging bridge (records of INFO and up go out as OTLP logs)
    resource: dict[str, str] = field(default_factory=dict)
    # The agent's inference spans: the share of requests traced (0: none, not even a caller's
    # sampled traceparent; docs/observability.md "Inference spans").
    inference_sample_ratio: float = 0.0

    @classmethod
    def load(cls, section: Mapping[str, Any] | None = None,
             environ: Mapping[str, str] | None = None) -> OtelSettings:
        env = os.environ if environ is None else environ
        section = section or {}
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return cls()
        enabled = section.get("enabled", False)
        if not isinstance(enabled, bool):
            raise InvalidInputError("[otel] enabled must be true or false")
        endpoint = section.get("endpoint", "")
        protocol = section.get("protocol", env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"))
        interval = section.get("metric_interval_seconds", 0.0)
        logs = section.get("logs", True)
        resource = section.get("resource", {})
        ratio = section.get("inference_sample_ratio", 0.0)
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not (
                0 <= ratio <= 1):
            raise InvalidInputError("[otel] inference_sample_ratio must be 0..1")
        if not isinstance(endpoint, str) or (endpoint and not endpoint.startswith(
                ("http://", "https://"))):
            raise InvalidInputError("[otel] endpoint must be an http:// or https:// URL")
        if protocol not in PROTOCOLS:
            raise InvalidInputError(f"OTLP protocol must be one of {', '.join(PROTOCOLS)}; "
                                    f"got {protocol!r}")
        if isinstance(interval, bool) or not isinstance(interval, int | float) or not (
                0 <= interval <= 86400):
            raise InvalidInputError("[otel] metric_interval_seconds must be 0..86400")
        if not isinstance(logs, bool):
            raise InvalidInputError("[otel] logs must be true or false")
        if not isinstance(resource, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in resource.items()):
            raise InvalidInputError("[otel] resource must map names to strings")
        on = enabled or any(env.get(name) for name in _ENDPOINT_VARS)
        return cls(bool(on), endpoint, protocol, float(interval), logs, dict(resource),
                   float(ratio))


def start(settings: OtelSettings, service_name: str,
          attributes: Mapping[str, str] | None = None) -> Otel | None:
    """The component's providers and exporters, or None when OpenTelemetry is off."""
    if not settings.enabled:
        return None
    return Otel(settings, service_name, dict(attributes or {}))


class Otel:
    """One component's tracer, meter and logging bridge, with their exporters."""

    def __init__(self, settings: OtelSettings, service_name: str,
                 attributes: dict[str, str]) -> None:
        from opentelemetry.sdk.metrics import MeterProvider  # noqa: PLC0415 (only when on)
        from opentelemetry.sdk.metrics.export import (  # noqa: PLC0415
            PeriodicExportingMetricReader,
        )
        from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
        from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

        self.settings = settings
        base = {"service.name": os.environ.get("OTEL_SERVICE_NAME") or service_name,
                **attributes, **settings.resource}
        self.resource = Resource.create(base)
        span_exporter, metric_exporter, log_exporter = _exporters(settings)
        self.tracer_provider = TracerProvider(resource=self.resource)
        self.span_processor = BatchSpanProcessor(span_exporter)
        self.tracer_provider.add_span_processor(self.span_processor)
        if settings.metric_interval_seconds:
            self.metric_reader = PeriodicExportingMetricReader(
                metric_exporter, export_interval_millis=settings.metric_interval_seconds * 1000)
        else:
            self.metric_reader = PeriodicExportingMetricReader(metric_exporter)
        self.meter_provider = MeterProvider(resource=self.resource,
                                            metric_readers=[self.metric_reader])
        self.tracer = self.tracer_provider.get_tracer("edgefleet")
        self.meter = self.meter_provider.get_meter("edgefleet")
        self.log_handler: logging.Handler | None = None
        self.logger_provider: Any = None
        if settings.logs and log_exporter is not None:
            from opentelemetry.sdk._logs import (  # noqa: PLC0415
                LoggerProvider,
                LoggingHandler,
            )
            from opentelemetry.sdk._logs.export import BatchLogRecordProcessor  # noqa: PLC0415

            self.logger_provider = LoggerProvider(resource=self.resource)
            self.logger_provider.add_log_record_processor(BatchLogRecordProcessor(log_exporter))
            self.log_handler = LoggingHandler(level=logging.INFO,
                                              logger_provider=self.logger_provider)
            logging.getLogger().addHandler(self.log_handler)

    def sampled_tracer(self, ratio: float) -> Any:
        """A tracer whose spans are sampled: a caller's sampled context is continued, an
        unsampled one is not, and a request without one is sampled at ``ratio`` (by trace id).
        Its spans go out through the component's one span processor and exporter."""
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
        from opentelemetry.sdk.trace.sampling import (  # noqa: PLC0415
            ParentBased,
            TraceIdRatioBased,
        )

        provider = TracerProvider(resource=self.resource,
                                  sampler=ParentBased(TraceIdRatioBased(ratio)),
                                  shutdown_on_exit=False)
        provider.add_span_processor(self.span_processor)  # shut down with the main provider
        return provider.get_tracer("edgefleet.inference")

    # --- context ----------------------------------------------------------------------------
    @staticmethod
    def inject() -> dict[str, str]:
        """The current span's W3C carrier (empty when no span is current)."""
        from opentelemetry.trace.propagation.tracecontext import (  # noqa: PLC0415
            TraceContextTextMapPropagator,
        )

        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier)
        return carrier

    @staticmethod
    def extract(carrier: Mapping[str, str]) -> Any:
        from opentelemetry.trace.propagation.tracecontext import (  # noqa: PLC0415
            TraceContextTextMapPropagator,
        )

        return TraceContextTextMapPropagator().extract(dict(check_carrier(carrier)))

    @contextlib.contextmanager
    def span(self, name: str, carrier: Mapping[str, str] | None = None,
             attributes: Mapping[str, Any] | None = None, *, kind: str = "internal",
             ) -> Iterator[Any]:
        """A span, current inside the block; a child of ``carrier``'s context when given."""
        from opentelemetry.trace import SpanKind  # noqa: PLC0415

        context = self.extract(carrier) if carrier else None
        with self.tracer.start_as_current_span(
                name, context=context, kind=getattr(SpanKind, kind.upper()),
                attributes=dict(attributes or {})) as span:
            yield span

    # --- lifecycle --------------------------------------------------------------------------
    def flush(self, timeout_seconds: float = 10.0) -> None:
        millis = int(timeout_seconds * 1000)
        self.tracer_provider.force_flush(millis)
        self.meter_provider.force_flush(millis)
        if self.logger_provider is not None:
            self.logger_provider.force_flush(millis)

    def shutdown(self) -> None:
        if self.log_handler is not None:
            logging.getLogger().removeHandler(self.log_handler)
            self.log_handler = None
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()
        if self.logger_provider is not None:
            self.logger_provider.shutdown()


def _exporters(settings: OtelSettings) -> tuple[Any, Any, Any]:
    kwargs: dict[str, Any] = {}
    if settings.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import (  # noqa: PLC0415
            OTLPLogExporter,
        )
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (  # noqa: PLC0415
            OTLPMetricExporter,
        )
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter,
        )

        if settings.endpoint:
            kwargs["endpoint"] = settings.endpoint
            kwargs["insecure"] = settings.endpoint.startswith("http://")
        return (OTLPSpanExporter(**kwargs), OTLPMetricExporter(**kwargs),
                OTLPLogExporter(**kwargs))
    try:
        from opentelemetry.exporter.otlp.proto.http._log_exporter import (  # noqa: PLC0415
            OTLPLogExporter as HttpLogExporter,
        )
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # noqa: PLC0415
            OTLPMetricExporter as HttpMetricExporter,
        )
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter as HttpSpanExporter,
        )
    except ImportError:
        raise InvalidInputError(
            "OTLP over http/protobuf needs opentelemetry-exporter-otlp-proto-http (pip install "
            "it, or use OTEL_EXPORTER_OTLP_PROTOCOL=grpc)") from None
    base = settings.endpoint.rstrip("/")

    def url(signal: str) -> str | None:
        return f"{base}/v1/{signal}" if base else None  # None: the OTEL_* variables

    return (HttpSpanExporter(endpoint=url("traces")),
            HttpMetricExporter(endpoint=url("metrics")), HttpLogExporter(endpoint=url("logs")))
