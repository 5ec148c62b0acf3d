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

import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc

from fleetcore.otel import TRACE_KEYS, Otel, check_carrier

__all__ = ["MAX_TRACED_DEVICES", "Tracing", "TracingInterceptor"]

# Devices whose pending release carries a trace, and models whose rollout does; past these,
# the oldest is forgotten.
MAX_TRACED_DEVICES = 100_000
MAX_TRACED_MODELS = 1_000
# The calls whose trace later steps of the model's rollout continue (the scheduler pushes them
# outside any call).
_ROLLOUT_METHODS = ("/edgefleet.v1.AdminService/StartRollout",
                    "/edgefleet.v1.AdminService/ActOnRollout")


class Tracing:
    """The control plane's side of trace propagation; a no-op without OpenTelemetry."""

    def __init__(self, otel: Otel | None,
                 models_of: Callable[[str], set[str]] = lambda device_id: set()) -> None:
        self.otel = otel
        self.models_of = models_of  # the models a device is assigned (storage)
        self._devices: dict[str, dict[str, str]] = {}
        self._rollouts: dict[str, dict[str, str]] = {}

    def rollout_call(self, model: str) -> None:
        """Inside a traced StartRollout or ActOnRollout: later steps continue this trace."""
        if self.otel is None:
            return
        carrier = self.otel.inject()
        if carrier:
            self._rollouts.pop(model, None)
            self._rollouts[model] = carrier
            while len(self._rollouts) > MAX_TRACED_MODELS:
                self._rollouts.pop(next(iter(self._rollouts)))

    @contextlib.contextmanager
    def root(self, name: str, model: str, rollout: bool) -> Iterator[None]:
        """A new trace for a change the control plane starts itself (a retrained version's
        canary, a promotion): devices whose release changes inside it keep its context, and,
        for a ``rollout``, the rollout's later steps continue it."""
        if self.otel is None:
            yield
            return
        from opentelemetry import context as otel_context  # noqa: PLC0415

        with self.otel.tracer.start_as_current_span(
                name, context=otel_context.Context(),  # a root, whatever is current
                attributes={"edgefleet.model": model}):
            if rollout:
                self.rollout_call(model)
            yield

    def capture(self, device_id: str) -> None:
        """Why this device's release changed: the current span, or else (a step the scheduler
        started) the traced call of its model's rollout. Keep that carrier for the push."""
        if self.otel is None:
            return
        carrier = self.otel.inject()
        if not carrier and self._rollouts:
            carrier = next((self._rollouts[m] for m in sorted(self.models_of(device_id))
                            if m in self._rollouts), {})
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

    def __init__(self, otel: Otel, tracing: Tracing | None = None) -> None:
        self.otel = otel
        self.tracing = tracing

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
        otel, tracing = self.otel, self.tracing
        rollout = str(details.method) in _ROLLOUT_METHODS
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with otel.span(name, carrier, {"rpc.system": "grpc"}, kind="server"):
                    if rollout and tracing is not None:
                        tracing.rollout_call(str(getattr(request, "model", ""))[:128])
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
