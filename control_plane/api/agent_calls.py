"""The AgentService's calls on protobuf messages, shared by both front ends.

The gRPC servicer and the MQTT bridge differ only in how a message arrives and how the caller
is known (a TLS peer certificate; a topic the broker's ACL ties to the certificate). Both turn
the caller into an identity, authenticate it through the identity service, and call these,
which convert and delegate the same way: one heartbeat path, one telemetry path, one bundle
chunking.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from edgefleet.v1 import agent_pb2, common_pb2

from control_plane.api.convert import (
    delivery_problems_from_proto,
    host_from_proto,
    models_from_proto,
    telemetry_ack_to_proto,
    telemetry_from_proto,
)
from control_plane.services import Services
from fleetcore import pki

__all__ = ["BUNDLE_CHUNK_BYTES", "AgentCalls"]

BUNDLE_CHUNK_BYTES = 256 * 1024


class AgentCalls:
    def __init__(self, services: Services) -> None:
        self.s = services

    def device(self, identity: pki.Identity) -> pki.Identity:
        return self.s.identity.authenticate(identity, pki.IdentityKind.DEVICE)

    def device_by_id(self, device_id: str) -> pki.Identity:
        return self.s.identity.device_by_id(device_id)

    async def heartbeat(self, caller: pki.Identity, request: agent_pb2.HeartbeatRequest,
                        transport: str, peer: str = "") -> agent_pb2.HeartbeatResponse:
        """``peer``: where it came from (a gRPC peer address; "mqtt"), for clone detection."""
        detection = self.s.detection
        detection.heartbeat(caller.name, request.session_id, peer or transport)
        detection.delivery_problems(caller.name,
                                    delivery_problems_from_proto(request.delivery_problems))
        now, interval, serial = await self.s.delivery.heartbeat(
            caller, request.agent_version[:256], host_from_proto(request.host, transport),
            models_from_proto(request.models), (request.release_serial, request.release_digest),
            request.root_version if request.root_version else None,
        )
        return agent_pb2.HeartbeatResponse(server_time=now, heartbeat_interval_seconds=interval,
                                           release_serial=serial)

    async def telemetry(self, caller: pki.Identity, batch: agent_pb2.TelemetryBatch
                        ) -> agent_pb2.TelemetryAck:
        acked = await self.s.telemetry.ingest(caller, telemetry_from_proto(batch),
                                              batch.dropped, batch.depth)
        return telemetry_ack_to_proto(acked, batch.ack_runs)

    async def telemetry_many(
            self, batches: Sequence[tuple[pki.Identity, agent_pb2.TelemetryBatch]]
    ) -> list[agent_pb2.TelemetryAck | Exception]:
        """``telemetry`` for several batches, stored in one transaction (group commit); per
        batch its acknowledgement, or why it was refused."""
        results = await self.s.telemetry.ingest_many(
            [(caller, telemetry_from_proto(b), b.dropped, b.depth) for caller, b in batches])
        return [r if isinstance(r, Exception) else telemetry_ack_to_proto(r, b.ack_runs)
                for r, (_, b) in zip(results, batches, strict=True)]

    def renew(self, caller: pki.Identity, request: agent_pb2.RenewCertificateRequest
              ) -> agent_pb2.RenewCertificateResponse:
        pem, ca_pem = self.s.identity.renew_certificate(caller, request.csr_pem)
        return agent_pb2.RenewCertificateResponse(certificate_pem=pem, ca_pem=ca_pem)

    def roots_after(self, version: int) -> list[bytes]:
        return self.s.delivery.roots_after(version)

    def release(self, caller: pki.Identity, have_serial: int = 0,
                have_root: int = 0) -> tuple[int, common_pb2.SignedRelease] | None:
        """The device's current signed release and its serial (None: it has none)."""
        record = self.s.delivery.current_release(caller, have_serial, have_root or None)
        if record is None:
            return None
        return record.serial, common_pb2.SignedRelease(document=record.document,
                                                       signature=record.signature)

    def bundle_chunks(self, caller: pki.Identity, request: agent_pb2.FetchBundleRequest,
                      max_length: int = 0) -> Iterator[agent_pb2.BundleChunk]:
        """The requested range of a bundle in its release, in chunks of BUNDLE_CHUNK_BYTES
        (``max_length``: a cap on the range, 0 for none)."""
        length = request.length
        if max_length:
            length = min(length or max_length, max_length)
        offset = request.offset
        for piece in self.s.delivery.bundle(caller, request.digest, offset, length):
            for i in range(0, len(piece), BUNDLE_CHUNK_BYTES):
                data = piece[i : i + BUNDLE_CHUNK_BYTES]
                yield agent_pb2.BundleChunk(offset=offset, data=data)
                offset += len(data)
