"""Traces through the control plane (OpenTelemetry, when on; docs/observability.md).

* A call whose gRPC metadata carries W3C trace context (``fleet rollouts start``, an agent's
  ``FetchBundle``) runs inside a server span that continues that trace.
* When a device's release changes inside a traced call (a rollout started, paused, rolled
  back), the device's carrier is kept (in memory: a restart forgets it) and goes, once, with
  the next release pushed to it: beside the signed document in the ``SyncEvent``
  (``trace_context``), or as MQTT 5 user properties on the release message. Never inside the
  signed document.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from fleetcore.otel import TRACE_KEYS, Otel, check_carrier

__all__ = ["MAX_TRACED_DEVICES", "Tracing", "TracingInterceptor"]

# Devices whose pending release carries a trace; past this, the oldest is forgotten.
MAX_TRACED_DEVICES = 100_000


class Tracing:
    """The control plane's side of trace propagation; a no-op without OpenTelemetry."""

    def __init__(self, otel: Otel | None) -> None:
        self.otel = otel
        self._devices: dict[str, dict[str, str]] = {}

    def capture(self, device_id: str) -> None:
        """The current span (if any) is why this device's release changed: keep its carrier."""
        if self.otel is None:
            return
        carrier = self.otel.inject()
        if carrier:
            self._devices.pop(device_id, None)
            self._devices[device_id] = carrier
            while len(self._devices) > MAX_TRACED_DEVICES:
                self._devices.pop(next(iter(self._devices)))

    def take(self, device_id: str) -> dict[str, str]:
        """The carrier for the release about to be sent to this device, once: a later push
        for another reason (a renewal, a scheduler step) does not reuse an old trace."""
        return self._devices.pop(device_id, {})


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """Continues a caller's trace: a server span around each call that brings a traceparent."""

    def __init__(self, otel: Otel) -> None:
        self.otel = otel

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        carrier = check_carrier({str(k): str(v) for k, v in (details.invocation_metadata or ())
                                 if k in TRACE_KEYS})
        if not carrier:
            return handler
        name = str(details.method).lstrip("/")
        otel = self.otel
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with otel.span(name, carrier, {"rpc.system": "grpc"}, kind="server"):
                    return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            stream = handler.unary_stream

            async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with otel.span(name, carrier, {"rpc.system": "grpc"}, kind="server"):
                    async for reply in stream(request, context):
                        yield reply

            return grpc.unary_stream_rpc_method_handler(
                streaming, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler
