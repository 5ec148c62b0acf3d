"""The outbox hands out batches already encoded (edge_agent/reporting/wire.py): what the
protobuf runtime parses from them is exactly what the outbox holds, for rows framed when they
were appended and for rows from before (framed when read)."""

from __future__ import annotations

import contextlib
import math
import sqlite3
from pathlib import Path

import pytest
from edgefleet.v1 import agent_pb2

from edge_agent.reporting.outbox import _MIGRATIONS, Outbox, OutboxRecord
from edge_agent.reporting.wire import batch_tail, record_head
from fleetcore.sqlite import connect, migrate


def _parsed(wire: bytes, dropped: int = 0, depth: int = 0) -> agent_pb2.TelemetryBatch:
    return agent_pb2.TelemetryBatch.FromString(wire + batch_tail(dropped, depth))


def _as_records(batch: agent_pb2.TelemetryBatch) -> list[OutboxRecord]:
    return [OutboxRecord(r.seq, r.kind, r.created_at, r.payload) for r in batch.records]


@pytest.mark.parametrize("seq", [0, 1, 127, 128, 16_383, 16_384, 2**63 - 1])
@pytest.mark.parametrize("payload", [b"", b"x", b"\x00\xff" * 64, b"p" * 20_000])
def test_a_framed_record_parses_as_the_record(seq: int, payload: bytes) -> None:
    for kind, at in (("error", 0.0), ("drift", -1.5), ("dérive", 1.7e9), ("k" * 64, 1e308)):
        (got,) = _parsed(record_head(seq, kind, at, len(payload)) + payload).records
        assert (got.seq, got.kind, got.created_at, got.payload) == (seq, kind, at, payload)


def test_the_tail_carries_the_drop_count_and_the_depth() -> None:
    batch = _parsed(b"", dropped=2**40, depth=300)
    assert (batch.dropped, batch.depth, list(batch.records)) == (2**40, 300, [])
    with pytest.raises(ValueError, match="varint"):
        batch_tail(-1, 0)


def test_a_nan_time_survives_the_framing() -> None:
    (got,) = _parsed(record_head(1, "error", math.nan, 0)).records
    assert math.isnan(got.created_at)


def test_pending_wire_is_pending_encoded_with_the_same_bounds(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        box.append_many([("error", b"e%d" % i * 40) for i in range(10)], 5.0)
        box.append("drift", b'{"a":1}', 6.0)
        seqs, wire = box.pending_wire(limit=100)
        assert _as_records(_parsed(wire)) == box.pending(limit=100)
        assert seqs == list(range(1, 12))
        seqs, wire = box.pending_wire(limit=3, after=4)
        assert seqs == [5, 6, 7] and [r.seq for r in _parsed(wire).records] == seqs
        # The byte bound counts encoded records, and the oldest one always goes.
        seqs, wire = box.pending_wire(max_bytes=1)
        assert seqs == [1] and len(_parsed(wire).records) == 1
        one = len(record_head(1, "error", 5.0, 80)) + 80  # each of the first ten, framed
        seqs, wire = box.pending_wire(max_bytes=2 * one + 5)
        assert seqs == [1, 2] and len(wire) == 2 * one
        assert box.pending_wire(limit=0) == ([], b"")


def test_rows_appended_before_the_framing_column_are_framed_when_read(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with contextlib.closing(connect(path)) as conn:  # an outbox as the previous agent left it
        migrate(conn, _MIGRATIONS[:2])
        conn.executemany("INSERT INTO outbox (seq, kind, created_at, payload) VALUES (?,?,?,?)",
                         [(1, "error", 1.0, b"one"), (2, "drift", 2.0, b"two")])
    with Outbox(path) as box:
        box.append("install", b"three", 3.0)  # after the upgrade: framed on append
        seqs, wire = box.pending_wire()
        assert seqs == [1, 2, 3]
        assert _as_records(_parsed(wire)) == box.pending() == [
            OutboxRecord(1, "error", 1.0, b"one"), OutboxRecord(2, "drift", 2.0, b"two"),
            OutboxRecord(3, "install", 3.0, b"three")]
        assert box.stats().depth == 3 and box.ack([1, 2, 3]) == 3 and box.stats().depth == 0
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (len(_MIGRATIONS),)
