"""The agent's transport over gRPC with mutual TLS (the AgentService of agent.proto)."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Callable, Sequence

import grpc
from edgefleet.v1 import agent_pb2, agent_pb2_grpc, common_pb2

from edge_agent.credentials import Credentials
from edge_agent.failover import AddressRing
from edge_agent.transport.base import RefusedError, Transport
from fleetcore.errors import EdgefleetError, TransportError

__all__ = ["GrpcTransport"]

_REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
# One DNS name for several replicas: gRPC's dns resolver returns every address and pick_first
# (gRPC's default policy) connects to the first that answers and reconnects through the list
# when it drops; shuffled per channel, so the agents of a fleet do not all pick the same one.
_CHANNEL_OPTIONS = (("grpc.service_config", json.dumps(
    {"loadBalancingConfig": [{"pick_first": {"shuffleAddressList": True}}]})),)


class GrpcTransport(Transport):
    name = "grpc"

    def __init__(self, addresses: str | Sequence[str], credentials: Callable[[], Credentials],
                 *, rpc_timeout_seconds: float = 10.0) -> None:
        super().__init__(rpc_timeout_seconds=rpc_timeout_seconds)
        self.ring = AddressRing([addresses] if isinstance(addresses, str) else addresses)
        self._credentials = credentials
        self._channel: grpc.aio.Channel | None = None

    @property
    def address(self) -> str:
        return self.ring.current

    async def fail_over(self, failed: str) -> bool:
        if not self.ring.advance(failed):
            return False
        await self.reset()
        return True

    def _stub(self) -> agent_pb2_grpc.AgentServiceStub:
        if self._channel is None:
            creds = self._credentials()
            self._channel = grpc.aio.secure_channel(self.address, grpc.ssl_channel_credentials(
                root_certificates=creds.ca_pem, private_key=creds.key_pem,
                certificate_chain=creds.cert_pem), options=_CHANNEL_OPTIONS)
        return agent_pb2_grpc.AgentServiceStub(self._channel)

    async def _heartbeat(
        self, request: agent_pb2.HeartbeatRequest
    ) -> agent_pb2.HeartbeatResponse:
        reply: agent_pb2.HeartbeatResponse = await self._stub().Heartbeat(request)
        return reply

    async def _send_telemetry(self, batch: agent_pb2.TelemetryBatch) -> list[int]:
        reply = await self._stub().SendTelemetry(batch)
        return list(reply.acked)

    async def _renew_certificate(self, csr_pem: bytes) -> tuple[bytes, bytes]:
        reply = await self._stub().RenewCertificate(
            agent_pb2.RenewCertificateRequest(csr_pem=csr_pem))
        return bytes(reply.certificate_pem), bytes(reply.ca_pem)

    async def _releases(self, have_serial: int) -> AsyncGenerator[common_pb2.SignedRelease, None]:
        call = self._stub().Sync(agent_pb2.SyncRequest(
            have_serial=have_serial, have_root_version=self.have_root_version,
            session_id=self.session_id))
        try:
            async for event in call:
                self.last_trace_context = dict(event.trace_context)
                self.last_roots = [bytes(r) for r in event.roots]
                yield event.release
        finally:
            call.cancel()

    async def _fetch_bundle(
        self, digest: str, offset: int, length: int
    ) -> AsyncGenerator[agent_pb2.BundleChunk, None]:
        call = self._stub().FetchBundle(
            agent_pb2.FetchBundleRequest(digest=digest, offset=offset, length=length),
            metadata=self.trace_metadata() or None)
        try:
            async for chunk in call:
                yield chunk
        finally:
            call.cancel()

    async def _reset(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()

    async def _close(self) -> None:
        await self._reset()

    def _wrap(self, what: str, exc: Exception) -> EdgefleetError | None:
        if isinstance(exc, grpc.aio.AioRpcError):
            code = exc.code()
            message = f"{code.name}: {exc.details() or ''}"
            return RefusedError(message) if code in _REFUSED else TransportError(message)
        return None
