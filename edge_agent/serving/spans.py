"""Inference spans (OpenTelemetry), only where sampled on (docs/observability.md).

The front ends check one attribute, ``ServingCore.spans``: None (OpenTelemetry off, or
``[otel] inference_sample_ratio`` 0, the default) and a request costs nothing more. Otherwise
each request goes through ``InferenceSpans.request``: a caller's ``traceparent`` (HTTP header or
gRPC metadata, bounded by ``fleetcore.otel.check_carrier``) is continued when it is sampled and
not when it is not; a request without one is sampled at the ratio. A sampled request's server
span ``infer MODEL`` holds the model, the version that served it (the A/B arm), the protocol,
the batch size (rows) and the outcome (``ok`` or the error's kind).

Nothing of ``opentelemetry`` is imported here: the tracer comes from ``fleetcore.otel``, which
imports it only when on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from fleetcore.otel import check_carrier

__all__ = ["InferenceSpans", "Served"]

MAX_MODEL_CHARS = 128  # a name is checked after the span starts: bound what goes into it


class Served:
    """What a request's handler fills in for its span: the version served and the rows."""

    __slots__ = ("rows", "version")

    def __init__(self) -> None:
        self.version: int | None = None
        self.rows = 0


class InferenceSpans:
    def __init__(self, tracer: Any, extract: Any) -> None:
        self.tracer = tracer  # fleetcore.otel.Otel.sampled_tracer(ratio)
        self.extract = extract  # carrier -> OpenTelemetry context (Otel.extract)
        from opentelemetry.trace import SpanKind, Status, StatusCode  # noqa: PLC0415

        self._server, self._error = SpanKind.SERVER, (Status, StatusCode.ERROR)

    @contextlib.contextmanager
    def request(self, model: str, protocol: str,
                carrier: Mapping[str, str] | None) -> Iterator[Served]:
        served = Served()
        model = model[:MAX_MODEL_CHARS]
        parent = check_carrier(carrier) if carrier else {}
        span = self.tracer.start_span(
            f"infer {model}", context=self.extract(parent) if parent else None,
            kind=self._server,
            attributes={"edgefleet.model": model, "edgefleet.protocol": protocol})
        if not span.is_recording():  # not sampled: nothing more to do
            yield served
            return
        outcome = "ok"
        try:
            yield served
        except BaseException as exc:
            outcome = _kind(exc)
            status, error = self._error
            span.set_status(status(error, str(exc)[:200]))
            raise
        finally:
            if served.version is not None:
                span.set_attribute("edgefleet.version", served.version)
            span.set_attribute("edgefleet.batch_size", served.rows)
            span.set_attribute("edgefleet.outcome", outcome)
            span.end()


def _kind(exc: BaseException) -> str:
    """A short outcome: ``bad request``, ``not found``, ``too large``, ``failed``, ..."""
    from edge_agent.serving.errors import (  # noqa: PLC0415
        BadRequestError,
        ModelNotFoundError,
        PayloadTooLargeError,
    )

    for cls, kind in ((BadRequestError, "bad request"), (ModelNotFoundError, "not found"),
                      (PayloadTooLargeError, "too large")):
        if isinstance(exc, cls):
            return kind
    return "failed"
