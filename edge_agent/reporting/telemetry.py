"""Send the outbox to the control plane; delete only what it acknowledged.

Called after each heartbeat: up to ``max_batches`` batches of the oldest records go out with
the outbox's drop count and depth; only the seqs the control plane acknowledged are deleted.
It stores each (device, seq) once and answers with the seqs it holds: directly over gRPC, and
over MQTT through the bridge on ``telemetry/ack`` (the broker's PUBACK is not enough: a broker
that crashes before delivering would lose what it had acknowledged). A failure leaves every
record in place for the next try, so telemetry written during an outage - or before a
``kill -9`` - arrives once the control plane is back, exactly once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from edgefleet.v1 import agent_pb2

from edge_agent.reporting.outbox import Outbox, OutboxRecord
from edge_agent.transport.base import Transport

__all__ = ["TelemetrySender", "encode"]

log = logging.getLogger(__name__)

def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), default=float).encode()


class TelemetrySender:
    """Sends the outbox in batches, ``in_flight`` at a time: each batch waits for the control
    plane's acknowledgement (over MQTT a round trip through the broker and the bridge), so
    overlapping them keeps throughput up; the control plane stores each (device, seq) once,
    whatever the order."""

    def __init__(self, outbox: Outbox, *, batch_records: int = 500,
                 batch_bytes: int = 1024 * 1024, max_batches: int = 20,
                 in_flight: int = 4) -> None:
        self.outbox = outbox
        self.batch_records = batch_records
        self.batch_bytes = batch_bytes
        self.max_batches = max_batches
        self.in_flight = in_flight
        self._reported_dropped = 0  # the drop count the control plane last acknowledged

    async def send(self, transport: Transport) -> int:
        """Send pending records; return how many were acknowledged (and deleted). With nothing
        pending, a new drop count still goes out (in an empty batch): records that could not
        even be stored (a full disk) are otherwise invisible to the fleet."""
        sent = 0
        for _ in range(0, self.max_batches, self.in_flight):
            records = self.outbox.pending(self.batch_records * self.in_flight,
                                          self.batch_bytes * self.in_flight)
            stats = self.outbox.stats()
            if not records:
                if stats.dropped != self._reported_dropped:
                    await transport.send_telemetry(agent_pb2.TelemetryBatch(
                        dropped=stats.dropped, depth=stats.depth))
                    self._reported_dropped = stats.dropped
                break
            batches = self._batches(records, stats.dropped, stats.depth)
            results = await asyncio.gather(*(transport.send_telemetry(b) for b in batches),
                                           return_exceptions=True)
            acked = [seq for r in results if not isinstance(r, BaseException) for seq in r]
            deleted = self.outbox.ack(acked)
            sent += deleted
            failure = next((r for r in results if isinstance(r, BaseException)), None)
            if failure is not None:
                raise failure  # what was acknowledged is deleted; the rest goes again
            self._reported_dropped = stats.dropped
            if deleted < len(records):
                log.warning("control plane acknowledged %d of %d telemetry records", deleted,
                            len(records))
                break
        return sent

    def _batches(self, records: list[OutboxRecord], dropped: int,
                 depth: int) -> list[agent_pb2.TelemetryBatch]:
        out: list[agent_pb2.TelemetryBatch] = []
        chunk: list[OutboxRecord] = []
        size = 0
        for r in records:
            if chunk and (len(chunk) >= self.batch_records
                          or size + len(r.payload) > self.batch_bytes):
                out.append(_batch(chunk, dropped, depth))
                chunk, size = [], 0
            chunk.append(r)
            size += len(r.payload)
        if chunk:
            out.append(_batch(chunk, dropped, depth))
        return out


def _batch(records: list[OutboxRecord], dropped: int, depth: int) -> agent_pb2.TelemetryBatch:
    return agent_pb2.TelemetryBatch(
        records=[agent_pb2.TelemetryRecord(seq=r.seq, kind=r.kind, created_at=r.created_at,
                                           payload=r.payload) for r in records],
        dropped=dropped, depth=depth)
