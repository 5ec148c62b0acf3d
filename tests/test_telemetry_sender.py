"""The agent's telemetry sender over its outbox of sealed batches: each batch goes out as
``TelemetryBatch.columns`` exactly as stored, only what is acknowledged is deleted, failures
and partial answers leave the rest for later, the drop count goes out even with nothing
pending, and a damaged batch is discarded with a count instead of blocking the queue.

The receiver here stands in for the control plane's telemetry handler (in memory, through the
agent's own ``Transport`` base class and its checks): it reads each batch with the generated
classes, stores each seq once and answers with the seqs it holds. The end-to-end tests against
a real control plane (tests/test_telemetry.py, tests/test_mqtt*.py) cover the same path once
the control plane reads ``columns``."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from edgefleet.v1 import agent_pb2

from edge_agent.reporting.outbox import CORRUPT_KIND, CorruptBatchError, Outbox
from edge_agent.reporting.telemetry import TelemetrySender
from edge_agent.transport.base import acked_seqs
from fleetcore.errors import InvalidInputError, TransportError
from tests.support import InMemoryTransport

NOW = 1_700_000_000.0


class Receiver(InMemoryTransport):
    """Acknowledges what it stores, like the control plane; misbehaves on request."""

    name = "receiver"

    def __init__(self) -> None:
        super().__init__()
        self.stored: dict[int, tuple[str, float, bytes]] = {}
        self.batches: list[agent_pb2.TelemetryBatch] = []
        self.fail: set[int] = set()  # these batches (by arrival, from 0) fail
        self.quota: int | None = None  # store at most this many records of each batch

    async def _send_telemetry(self, batch: agent_pb2.TelemetryBatch) -> list[int]:
        number = len(self.batches)
        self.batches.append(batch)
        # An answer comes later, as over a network: after the loop has run what is ready.
        later = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(later.set_result, None)
        await later
        if number in self.fail:
            raise ConnectionResetError("connection reset")
        cols = batch.columns
        n = len(cols.seqs) // 8
        seqs = struct.unpack(f"<{n}Q", cols.seqs)
        times = struct.unpack(f"<{n}d", cols.created_at)
        sizes = struct.unpack(f"<{n}I", cols.payload_sizes)
        at = 0
        records = []
        for i in range(n):
            records.append((seqs[i], (cols.kinds[cols.kind_index[i]], times[i],
                                       cols.payloads[at:at + sizes[i]])))
            at += sizes[i]
        records += [(r.seq, (r.kind, r.created_at, r.payload)) for r in batch.records]
        acked = []
        for seq, record in records[:self.quota]:
            self.stored.setdefault(seq, record)
            acked.append(seq)
        return acked


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox(tmp_path / "outbox.db") as box:
        yield box


def _fill(box: Outbox, n: int) -> dict[int, tuple[str, float, bytes]]:
    kinds = ["drift", "error", "sample"]
    items = [(kinds[i % 3], b'{"i":%d}' % i) for i in range(n)]
    seqs = box.append_many(items, NOW)
    return {seq: (kind, NOW, payload) for seq, (kind, payload) in zip(seqs, items, strict=True)
            if seq is not None}


def _bodies(box: Outbox) -> list[bytes]:
    with sqlite3.connect(box.path) as conn:
        return [body for (body,) in conn.execute(
            "SELECT body FROM outbox_batches ORDER BY first_seq")]


def _send(sender: TelemetrySender, receiver: Receiver) -> int:
    return asyncio.run(sender.send(receiver))


def test_the_outbox_goes_out_as_stored_columns_and_only_acknowledged_records_go(
    outbox: Outbox,
) -> None:
    records = _fill(outbox, 1_200)  # two sealed batches and a tail of 200
    stored = _bodies(outbox)
    receiver = Receiver()
    assert _send(TelemetrySender(outbox), receiver) == 1_200
    assert receiver.stored == records
    assert [len(b.records) for b in receiver.batches] == [0, 0, 0]
    assert [b.columns.SerializeToString() for b in receiver.batches[:2]] == stored
    assert [b.depth for b in receiver.batches] == [1_200] * 3  # read before any answer
    assert outbox.stats().depth == 0
    assert _send(TelemetrySender(outbox), receiver) == 0 and len(receiver.batches) == 3


def test_the_senders_own_bounds_split_a_stored_batch(outbox: Outbox) -> None:
    records = _fill(outbox, 1_000)
    receiver = Receiver()
    assert _send(TelemetrySender(outbox, batch_records=300, max_batches=100), receiver) == 1_000
    assert [len(b.columns.seqs) // 8 for b in receiver.batches] == [300, 200, 300, 200]
    assert receiver.stored == records and outbox.stats().depth == 0


def test_a_failed_batch_keeps_its_records_and_the_failure_is_raised(outbox: Outbox) -> None:
    records = _fill(outbox, 1_500)
    receiver = Receiver()
    receiver.fail = {1}
    sender = TelemetrySender(outbox)
    with pytest.raises(TransportError):
        _send(sender, receiver)
    assert sorted(receiver.stored) == [s for s in records if not 501 <= s <= 1000]
    assert [r.seq for r in outbox.pending(limit=1000)] == list(range(501, 1001))
    assert _send(sender, receiver) == 500  # the rest goes next time, once
    assert receiver.stored == records and outbox.stats().depth == 0


def test_a_partial_answer_deletes_only_what_was_acknowledged(outbox: Outbox) -> None:
    records = _fill(outbox, 1_000)
    receiver = Receiver()
    receiver.quota = 150  # e.g. the device's quota: the rest of each batch is not stored
    sender = TelemetrySender(outbox, in_flight=1)
    assert _send(sender, receiver) == 150  # it stops for now: the control plane is full
    assert outbox.stats().depth == 850 and sorted(receiver.stored) == list(range(1, 151))
    receiver.quota = None
    assert _send(sender, receiver) == 850  # the batch's rest (rewritten), then the next
    assert receiver.stored == records and outbox.stats().depth == 0


class Counting(Receiver):
    """Records the most batches, and bytes, it held unanswered at once."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[int] = []  # the sizes of the batches unanswered now
        self.most = (0, 0)  # (batches, bytes)

    async def _send_telemetry(self, batch: agent_pb2.TelemetryBatch) -> list[int]:
        size = batch.ByteSize()
        self.held.append(size)
        self.most = max(self.most, (len(self.held), sum(self.held)))
        try:
            return await super()._send_telemetry(batch)
        finally:
            self.held.remove(size)


@pytest.mark.parametrize(("in_flight", "bound", "batches"), [(4, 100, 4), (32, 2.5, 3)])
def test_the_window_is_bounded_in_batches_and_in_bytes(
    outbox: Outbox, in_flight: int, bound: float, batches: int
) -> None:
    """At most ``in_flight`` batches unanswered, and none added once ``in_flight_bytes`` are:
    the bytes held stay under the bound plus one batch whatever the batches' size."""
    records = _fill(outbox, 2_000)
    probe = Counting()
    assert _send(TelemetrySender(outbox, batch_records=100, max_batches=1), probe) == 100
    size = probe.batches[0].ByteSize()  # one 100-record batch (they are alike)
    receiver = Counting()
    sender = TelemetrySender(outbox, batch_records=100, max_batches=100, in_flight=in_flight,
                             in_flight_bytes=int(bound * size))
    assert _send(sender, receiver) == 1_900
    assert receiver.most[0] == batches  # 2.5 batches' bytes: the third is the last let in
    assert receiver.most[1] < bound * size + max(b.ByteSize() for b in receiver.batches)
    assert {**probe.stored, **receiver.stored} == records and outbox.stats().depth == 0


def test_the_default_window_keeps_many_batches_in_flight(outbox: Outbox) -> None:
    """32 batches, below the byte bound (4 MiB) at typical sizes: enough for the control
    plane to find a dozen or more waiting, to store in one transaction."""
    _fill(outbox, 20_000)
    receiver = Counting()
    assert _send(TelemetrySender(outbox, batch_records=500, max_batches=100), receiver) == 20_000
    assert receiver.most[0] == 32


def test_seqs_acknowledged_but_not_sent_in_the_batch_are_not_deleted(outbox: Outbox) -> None:
    """The answer is the control plane's word: only seqs of the batch it answers count."""
    _fill(outbox, 1_000)

    class Overreaching(Receiver):
        async def _send_telemetry(self, batch: agent_pb2.TelemetryBatch) -> list[int]:
            return [*await super()._send_telemetry(batch), 600, 700, 99_999]

    assert _send(TelemetrySender(outbox, max_batches=1), Overreaching()) == 500
    assert [r.seq for r in outbox.pending(limit=1_000)][:2] == [501, 502]
    assert {600, 700} <= {r.seq for r in outbox.pending(limit=1_000)}
    assert outbox.stats().depth == 500


def test_an_answer_in_runs_acknowledges_only_seqs_of_the_batch() -> None:
    sent = list(range(101, 111))
    whole = agent_pb2.TelemetryAck(runs=[101, 110])
    assert acked_seqs(whole, sent) is sent  # the usual answer: nothing to list
    assert acked_seqs(agent_pb2.TelemetryAck(acked=[101, 102, 999]), sent) == [101, 102, 999]
    part = agent_pb2.TelemetryAck(runs=[103, 104, 0, 101, 109, 2**64 - 1], acked=[107, 5])
    assert acked_seqs(part, sent) == [101, 103, 104, 107, 109, 110]  # a huge run: clipped
    gaps = [1, 2, 5, 6]  # a batch that lost records: its seqs are not a range
    assert acked_seqs(agent_pb2.TelemetryAck(runs=[1, 6]), gaps) == gaps
    with pytest.raises(InvalidInputError, match="pairs"):
        acked_seqs(agent_pb2.TelemetryAck(runs=[101]), sent)
    with pytest.raises(InvalidInputError, match="at most one a record"):
        acked_seqs(agent_pb2.TelemetryAck(runs=[1, 1] * 11), sent)


def test_a_drop_count_goes_out_even_with_nothing_pending(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_records=2) as box:
        box.append_many([("error", b"a"), ("error", b"b"), ("error", b"c")], NOW)
        receiver = Receiver()
        sender = TelemetrySender(box)
        assert _send(sender, receiver) == 2
        assert [b.dropped for b in receiver.batches] == [1]
        assert _send(sender, receiver) == 0  # nothing new to say
        box.append_many([("error", b"d"), ("error", b"e"), ("error", b"f")], NOW)
        box.ack_through(100)
        assert _send(sender, receiver) == 0
        assert [(b.dropped, b.depth, b.HasField("columns")) for b in receiver.batches[1:]] == [
            (2, 0, False)]


@pytest.mark.parametrize("in_flight", [1, 8])  # 8: the discard falls inside one refill
def test_a_corrupt_batch_is_discarded_counted_and_the_rest_goes(
    outbox: Outbox, caplog: pytest.LogCaptureFixture, in_flight: int
) -> None:
    records = _fill(outbox, 1_500)
    with sqlite3.connect(outbox.path) as conn:  # a damaged file: one batch body is garbage
        conn.execute("UPDATE outbox_batches SET body = x'0a05ff' WHERE first_seq = 501")
    receiver = Receiver()
    with caplog.at_level(logging.ERROR, "edge_agent.reporting.outbox"):
        assert _send(TelemetrySender(outbox, in_flight=in_flight), receiver) == 1_000
    assert "seqs 501 to 1000 (500 records) is corrupt" in caplog.text
    assert sorted(receiver.stored) == [s for s in records if not 501 <= s <= 1000]
    assert [b.dropped for b in receiver.batches] == [0, 500]  # the loss reaches the fleet
    stats = outbox.stats()
    assert (stats.depth, stats.dropped_by_kind) == (0, {CORRUPT_KIND: 500})


def test_a_corrupt_batch_that_cannot_be_discarded_fails_the_send(outbox: Outbox) -> None:
    _fill(outbox, 1_000)
    with sqlite3.connect(outbox.path) as conn:
        conn.execute("UPDATE outbox_batches SET body = x'00' WHERE first_seq = 1")
    assert outbox._conn is not None
    outbox._conn.execute("PRAGMA query_only = ON")  # storage refuses every write
    receiver = Receiver()
    with pytest.raises(CorruptBatchError, match="seqs 1 to 500"):
        _send(TelemetrySender(outbox), receiver)
    assert receiver.batches == [] and outbox.stats().depth == 1_000
    outbox._conn.execute("PRAGMA query_only = OFF")  # writable again: discarded, the rest goes
    assert _send(TelemetrySender(outbox), receiver) == 500
    assert outbox.stats().dropped_by_kind == {CORRUPT_KIND: 500}
