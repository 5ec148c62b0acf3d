"""Send the outbox to the control plane; delete only what it acknowledged.

Called after each heartbeat: up to ``max_batches`` batches of the oldest records go out with
the outbox's drop count and depth; only the seqs the receiver acknowledged are deleted. Over
gRPC that is the control plane, which stores each (device, seq) once and answers with the seqs
it holds; over MQTT it is the broker's PUBACK for the batch (QoS 1), and the control plane
deduplicates on (device, seq) when the bridge hands the batch on. A failure leaves every
record in place for the next try, so telemetry written during an outage - or before a
``kill -9`` - arrives once the control plane is back, exactly once.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from edgefleet.v1 import agent_pb2

from edge_agent.reporting.outbox import Outbox
from edge_agent.transport.base import Transport

__all__ = ["TelemetrySender", "encode"]

log = logging.getLogger(__name__)

def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), default=float).encode()


class TelemetrySender:
    def __init__(self, outbox: Outbox, *, batch_records: int = 500,
                 batch_bytes: int = 1024 * 1024, max_batches: int = 20) -> None:
        self.outbox = outbox
        self.batch_records = batch_records
        self.batch_bytes = batch_bytes
        self.max_batches = max_batches
        self._reported_dropped = 0  # the drop count the control plane last acknowledged

    async def send(self, transport: Transport) -> int:
        """Send pending records; return how many were acknowledged (and deleted). With nothing
        pending, a new drop count still goes out (in an empty batch): records that could not
        even be stored (a full disk) are otherwise invisible to the fleet."""
        sent = 0
        for _ in range(self.max_batches):
            records = self.outbox.pending(self.batch_records, self.batch_bytes)
            stats = self.outbox.stats()
            if not records:
                if stats.dropped != self._reported_dropped:
                    await transport.send_telemetry(agent_pb2.TelemetryBatch(
                        dropped=stats.dropped, depth=stats.depth))
                    self._reported_dropped = stats.dropped
                break
            acked = await transport.send_telemetry(
                agent_pb2.TelemetryBatch(
                    records=[agent_pb2.TelemetryRecord(seq=r.seq, kind=r.kind,
                                                       created_at=r.created_at,
                                                       payload=r.payload) for r in records],
                    dropped=stats.dropped, depth=stats.depth,
                ),
            )
            self._reported_dropped = stats.dropped
            deleted = self.outbox.ack(acked)
            sent += deleted
            if deleted < len(records):
                log.warning("control plane acknowledged %d of %d telemetry records", deleted,
                            len(records))
                break
        return sent
