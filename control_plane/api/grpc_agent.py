"""The AgentService over gRPC: protobuf in, protobuf out; the calls themselves are
``agent_calls.AgentCalls``, shared with the MQTT bridge."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import grpc
from edgefleet.v1 import agent_pb2, agent_pb2_grpc

from control_plane.api.agent_calls import AgentCalls
from control_plane.api.convert import host_from_proto, text
from control_plane.api.grpc_common import abort_with, peer_address, peer_identity, rpc
from control_plane.api.notify import DeviceNotifier
from control_plane.api.tracing import Tracing
from control_plane.services import Services
from control_plane.services.detection import STREAM_GRACE_SECONDS
from fleetcore import pki
from fleetcore.errors import EdgefleetError

__all__ = ["SYNC_RECHECK_SECONDS", "AgentServicer"]

# A Sync stream re-checks the device now and then even without a wake-up: that renews its
# release before expiry and notices a revocation made by another control-plane replica.
SYNC_RECHECK_SECONDS = 30.0


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, services: Services, notifier: DeviceNotifier,
                 tracing: Tracing | None = None) -> None:
        self.s = services
        self.calls = AgentCalls(services)
        self.notifier = notifier
        self.tracing = tracing or Tracing(None)

    def _device(self, context: grpc.aio.ServicerContext) -> pki.Identity:
        return self.calls.device(peer_identity(context))

    @rpc
    async def Enroll(
        self, request: agent_pb2.EnrollRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.EnrollResponse:
        r = self.s.identity.enroll(request.token, request.csr_pem, dict(request.labels),
                                   host_from_proto(request.host), text(request.agent_version),
                                   peer_address(context.peer()))
        return agent_pb2.EnrollResponse(
            device_id=r.device.id,
            certificate_pem=r.certificate_pem,
            ca_pem=r.ca_pem,
            release_public_key_pem=r.release_public_pem,
            publisher_public_keys_pem=list(r.publisher_public_pems),
            api_address=r.api_address,
            mqtt_url=r.mqtt_url,
            labels=r.device.labels,
            heartbeat_interval_seconds=r.heartbeat_interval_seconds,
            root=r.root,
            api_addresses=list(r.api_addresses),
        )

    @rpc
    async def RenewCertificate(
        self, request: agent_pb2.RenewCertificateRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.RenewCertificateResponse:
        return self.calls.renew(self._device(context), request)

    @rpc
    async def Heartbeat(
        self, request: agent_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.HeartbeatResponse:
        return await self.calls.heartbeat(self._device(context), request, "grpc",
                                          context.peer())

    async def Sync(
        self, request: agent_pb2.SyncRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.SyncEvent]:
        try:
            caller = self._device(context)
            sent = request.have_serial
            root_sent = request.have_root_version
            with self.notifier.subscribe(caller.name) as wake, self._stream(
                    caller.name, request.session_id[:64], context.peer()[:128]):
                # Tells the client the stream is live (and subscribed) before any release.
                await context.send_initial_metadata(())
                while True:
                    # Clear before looking: a change notified from here on is not lost.
                    wake.clear()
                    self._device(context)  # a revoked device's stream ends here
                    # Roots first: a release signed by a new key follows the root listing it.
                    roots = self.calls.roots_after(root_sent)
                    current = self.calls.release(caller, request.have_serial,
                                                 request.have_root_version)
                    if roots:
                        root_sent += len(roots)
                    if current is not None and current[0] > sent:
                        sent = current[0]
                        yield agent_pb2.SyncEvent(release=current[1], roots=roots,
                                                  trace_context=self.tracing.take(caller.name))
                    elif roots:
                        yield agent_pb2.SyncEvent(roots=roots)
                    with contextlib.suppress(TimeoutError):
                        # Wake on a change, or now and then to renew the document before expiry.
                        await asyncio.wait_for(wake.wait(), timeout=SYNC_RECHECK_SECONDS)
        except EdgefleetError as exc:
            await abort_with(context, exc)

    @contextlib.contextmanager
    def _stream(self, device_id: str, session: str, peer: str) -> Iterator[None]:
        """Register a Sync stream for clone detection; two of different sessions that both
        stay open past the grace flag the device (``services/detection.py``)."""
        clones = self.s.detection.clones
        token, other = clones.stream_opened(device_id, session, peer, self.s.ctx.clock())
        check = None
        if other is not None:
            check = asyncio.get_running_loop().call_later(
                STREAM_GRACE_SECONDS, self._streams_concurrent, device_id, token)
        try:
            yield
        finally:
            if check is not None:
                check.cancel()
            clones.stream_closed(device_id, token)

    def _streams_concurrent(self, device_id: str, token: int) -> None:
        suspicion = self.s.detection.clones.still_concurrent(device_id, token,
                                                              self.s.ctx.clock())
        if suspicion is not None:
            with contextlib.suppress(EdgefleetError):  # revoked: the streams end on the wake
                self.s.detection.clone_suspected(suspicion)

    @rpc
    async def SendTelemetry(
        self, request: agent_pb2.TelemetryBatch, context: grpc.aio.ServicerContext
    ) -> agent_pb2.TelemetryAck:
        return await self.calls.telemetry(self._device(context), request)

    async def FetchBundle(
        self, request: agent_pb2.FetchBundleRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.BundleChunk]:
        try:
            for chunk in self.calls.bundle_chunks(self._device(context), request):
                yield chunk
        except EdgefleetError as exc:
            await abort_with(context, exc)
