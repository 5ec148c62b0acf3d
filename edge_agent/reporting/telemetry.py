"""Send the outbox to the control plane; delete only what it acknowledged.

Called after each heartbeat: up to ``max_batches`` batches of the oldest records go out with
the outbox's drop count and depth; only the seqs the control plane acknowledged are deleted.
It stores each (device, seq) once and answers with the seqs it holds: directly over gRPC, and
over MQTT through the bridge on ``telemetry/ack`` (the broker's PUBACK is not enough: a broker
that crashes before delivering would lose what it had acknowledged). A failure leaves every
record in place for the next try, so telemetry written during an outage - or before a
``kill -9`` - arrives once the control plane is back, exactly once.

Each batch is a ``TelemetryBatch`` whose ``columns`` is a batch as the outbox keeps it (a
``TelemetryColumns`` encoding, ``Outbox.next_batch``): one parse of bytes, nothing per record.
A sealed batch the outbox finds corrupt (a damaged file) is discarded by the outbox and counted
as dropped (``Outbox.discard_corrupt``), and the sender goes on with the next one: one damaged
row must not block the queue for good, and the loss reaches the control plane in the drop
count. Only if the discard itself cannot be written (a storage fault) does the send fail, to be
tried again later.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable
from typing import Any, TypeVar

from edgefleet.v1 import agent_pb2

from edge_agent.reporting.outbox import CorruptBatchError, Outbox
from edge_agent.reporting.wire import frame_batch
from edge_agent.transport.base import Transport

__all__ = ["TelemetrySender", "encode"]

log = logging.getLogger(__name__)

T = TypeVar("T")


async def _all_finished(finished: asyncio.Queue[T]) -> list[T]:
    """At least one: what finished by the time the first did."""
    done = [await finished.get()]
    while not finished.empty():
        done.append(finished.get_nowait())
    return done


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), default=float).encode()


class TelemetrySender:
    """Sends the outbox in batches with a sliding window of up to ``in_flight`` batches
    unacknowledged, and no new one while ``in_flight_bytes`` are (so at most that plus one
    batch, whatever their size): each batch waits for the control plane's acknowledgement
    (over MQTT a round trip through the broker and the bridge), and as soon as one is
    acknowledged (and deleted) the next is read and sent, so the path never drains between
    rounds. The control plane stores each (device, seq) once, whatever the order.

    Why 32: the control plane stores the batches waiting for it in one transaction (its
    fsyncs are most of a batch's cost on a slow disk), and an agent's next batches can only
    be waiting there when more are in flight than one transaction takes: at 8 a transaction
    took four, at 32 a dozen or more (docs/mqtt.md, "Since: groups as large as the window
    lets them be"). Typical 45 KB batches make 32 about 1.4 MB held; 1 MiB batches stop at
    the byte bound."""

    def __init__(self, outbox: Outbox, *, batch_records: int = 500,
                 batch_bytes: int = 1024 * 1024, max_batches: int = 20,
                 in_flight: int = 32, in_flight_bytes: int = 4 * 1024 * 1024) -> None:
        self.outbox = outbox
        self.batch_records = batch_records
        self.batch_bytes = batch_bytes
        self.max_batches = max_batches
        self.in_flight = max(1, in_flight)
        self.in_flight_bytes = in_flight_bytes
        self._reported_dropped = 0  # the drop count the control plane last acknowledged
        self._discards = 0  # corrupt batches discarded so far (their records count as dropped)

    async def send(self, transport: Transport) -> int:
        """Send pending records, at most ``max_batches`` batches; return how many were
        acknowledged (and deleted). With nothing pending, a new drop count still goes out (in
        an empty batch): records that could not even be stored (a full disk) are otherwise
        invisible to the fleet. A failed batch stops new ones; those in flight are waited for
        (what they got acknowledged is deleted) and the failure is raised: the rest goes
        again."""
        stats = self.outbox.counters()
        if not stats.depth:
            await self._report_drops(transport, stats.dropped)
            return 0
        sent, issued, after = 0, 0, 0  # after: the highest seq handed to a batch
        failure: BaseException | None = None
        short = False  # the control plane acknowledged part of a batch: stop for now
        window: dict[asyncio.Task[tuple[list[int], list[int] | BaseException]], int] = {}
        held = 0  # bytes of the batches in the window
        # Finished batches, as they finish (cheaper than asyncio.wait over the window, which
        # adds and removes a callback on every task in flight each time one is answered).
        finished: asyncio.Queue[asyncio.Task[tuple[list[int], list[int] | BaseException]]] = (
            asyncio.Queue())
        try:
            while True:
                # The counters are read once a refill: nothing in it awaits, so a read per
                # batch gives the same numbers, unless a corrupt batch was discarded since.
                read_at: int | None = None  # self._discards when they were read
                while (failure is None and not short and issued < self.max_batches
                       and len(window) < self.in_flight
                       and (not window or held < self.in_flight_bytes)):
                    # The batch as stored, already encoded (edge_agent/reporting/wire.py):
                    # one parse of its bytes, not a message built per record.
                    try:
                        seqs, body = self._next_batch(after)
                    except CorruptBatchError as exc:  # could not even be discarded
                        failure = exc
                        break
                    if not seqs:
                        break
                    if read_at != self._discards:  # what goes with the batch
                        stats, read_at = self.outbox.counters(), self._discards
                    after, issued = seqs[-1], issued + 1
                    wire = frame_batch(body, stats.dropped, stats.depth)  # sent as it is
                    task = asyncio.create_task(self._one(transport, seqs, wire))
                    task.add_done_callback(finished.put_nowait)
                    window[task] = len(wire)
                    held += len(wire)
                if not window:
                    break
                done = await _all_finished(finished)
                held -= sum(window.pop(task) for task in done)
                runs, acked, expected, failed = self._answers(done)
                failure = failure or failed
                # Every batch answered meanwhile: one commit (a seq alone is a run of one;
                # ack_runs joins them).
                deleted = self.outbox.ack_runs([*runs, *((seq, seq) for seq in acked)])
                sent += deleted
                if deleted < expected:
                    log.warning("control plane acknowledged %d of %d telemetry records",
                                deleted, expected)
                    short = True
        finally:
            for task in window:  # cancelled ourselves: nothing is deleted, it goes again
                task.cancel()
        if failure is not None:
            raise failure  # what was acknowledged is deleted; the rest goes again
        self._reported_dropped = stats.dropped
        return sent

    async def _report_drops(self, transport: Transport, dropped: int) -> None:
        """Nothing pending: a drop count the control plane has not acknowledged goes alone."""
        if dropped != self._reported_dropped:
            await transport.send_telemetry(agent_pb2.TelemetryBatch(dropped=dropped, depth=0))
            self._reported_dropped = dropped

    def _next_batch(self, after: int) -> tuple[list[int], bytes]:
        """The outbox's next batch above ``after``; a corrupt sealed batch on the way is
        discarded (counted as dropped: its count goes with the next batch) and the next one
        read. ``CorruptBatchError`` only when the discard could not be written."""
        while True:
            try:
                return self.outbox.next_batch(self.batch_records, self.batch_bytes, after=after)
            except CorruptBatchError as exc:
                if not self.outbox.discard_corrupt(exc.first_seq):
                    raise
                self._discards += 1

    @staticmethod
    def _answers(done: Iterable[asyncio.Task[tuple[list[int], list[int] | BaseException]]]
                 ) -> tuple[list[tuple[int, int]], list[int], int, BaseException | None]:
        """What the finished batches got: the (first, last) runs of those acknowledged whole
        (a batch's seqs are consecutive unless records were dropped from it: its seqs are the
        outbox's, increasing), the other seqs acknowledged, how many were sent in the
        batches answered, and the first failure."""
        runs: list[tuple[int, int]] = []
        acked: list[int] = []
        expected = 0
        failure: BaseException | None = None
        for task in done:
            seqs, result = task.result()
            if isinstance(result, BaseException):
                failure = failure or result
                continue
            if result is seqs and seqs and seqs[-1] - seqs[0] + 1 == len(seqs):
                runs.append((seqs[0], seqs[-1]))  # the usual answer: no list of 500 to sort
            else:
                acked += result
            expected += len(seqs)
        return runs, acked, expected, failure

    @staticmethod
    async def _one(transport: Transport, seqs: list[int], wire: bytes
                   ) -> tuple[list[int], list[int] | BaseException]:
        try:
            return seqs, await transport.send_telemetry_wire(seqs, wire)
        except Exception as exc:  # raised by send() once the window is done
            return seqs, exc
