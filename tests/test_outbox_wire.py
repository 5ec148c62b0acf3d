"""Telemetry written by hand (edge_agent/reporting/wire.py) is what the protobuf runtime makes
of it: ``TelemetryColumns`` bodies both ways, the ``TelemetryBatch`` around one, the framing
of the records of older agents; damaged bodies are refused with ``InvalidInputError``. The
outbox hands out batches in that encoding: exactly what it holds, rows from before the
upgrades included."""

from __future__ import annotations

import contextlib
import math
import sqlite3
import struct
from pathlib import Path

import pytest
from edgefleet.v1 import agent_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.reporting.outbox import _MIGRATIONS, Outbox, OutboxRecord
from edge_agent.reporting.wire import (
    MAX_KINDS,
    batch_tail,
    decode_columns,
    decode_records,
    encode_columns,
    encode_records,
    frame_batch,
    record_head,
    seqs_from_column,
)
from fleetcore.errors import InvalidInputError
from fleetcore.sqlite import connect, migrate

_PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


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


# -- TelemetryColumns --

Record = tuple[int, str, float, bytes]


def _generated(records: list[Record]) -> agent_pb2.TelemetryColumns:
    """The same records as the generated classes build them (the protocol's reference)."""
    kinds = list(dict.fromkeys(r[1] for r in records))
    return agent_pb2.TelemetryColumns(
        seqs=struct.pack(f"<{len(records)}Q", *(r[0] for r in records)),
        created_at=struct.pack(f"<{len(records)}d", *(r[2] for r in records)),
        kinds=kinds,
        kind_index=bytes(kinds.index(r[1]) for r in records),
        payload_sizes=struct.pack(f"<{len(records)}I", *(len(r[3]) for r in records)),
        payloads=b"".join(r[3] for r in records))


def _records_of(msg: agent_pb2.TelemetryColumns) -> list[Record]:
    n = len(msg.seqs) // 8
    seqs = struct.unpack(f"<{n}Q", msg.seqs)
    times = struct.unpack(f"<{n}d", msg.created_at)
    sizes = struct.unpack(f"<{n}I", msg.payload_sizes)
    out, at = [], 0
    for i in range(n):
        out.append((seqs[i], msg.kinds[msg.kind_index[i]], times[i],
                    msg.payloads[at:at + sizes[i]]))
        at += sizes[i]
    return out


_KINDS = st.sampled_from(["drift", "error", "sample", "arm_stats", "dérive", "k" * 64, ""])
_RECORDS = st.lists(st.tuples(st.integers(0, 2**64 - 1), _KINDS,
                              st.floats(allow_nan=False), st.binary(max_size=300)), max_size=40)


@_PROPERTY
@given(_RECORDS)
def test_columns_written_by_hand_are_the_generated_encoding(records: list[Record]) -> None:
    body = encode_records(records)
    assert body == _generated(records).SerializeToString()
    assert _records_of(agent_pb2.TelemetryColumns.FromString(body)) == records
    assert decode_records(body) == records


@_PROPERTY
@given(_RECORDS, _RECORDS)
def test_columns_read_by_hand_are_what_the_generated_classes_read(
    first: list[Record], second: list[Record]
) -> None:
    # Two messages one after the other are one message to protobuf (a bytes field: the last
    # one counts; kinds: both lists): read the same way, or refused when the columns disagree.
    body = encode_records(first) + encode_records(second)
    reference = agent_pb2.TelemetryColumns.FromString(body)
    if _holds_together(reference):
        got = decode_columns(body)
        assert got.kinds == list(reference.kinds)
        assert decode_records(body) == _records_of(reference)
    else:
        with pytest.raises(InvalidInputError):
            decode_columns(body)


def _holds_together(msg: agent_pb2.TelemetryColumns) -> bool:
    """Whether a parsed message's columns agree (the protocol's rules, read off the
    generated message)."""
    n, rest = divmod(len(msg.seqs), 8)
    return (not rest and len(msg.created_at) == 8 * n and len(msg.kind_index) == n
            and len(msg.payload_sizes) == 4 * n and len(msg.kinds) <= MAX_KINDS
            and all(i < len(msg.kinds) for i in msg.kind_index)
            and sum(struct.unpack(f"<{n}I", msg.payload_sizes)) == len(msg.payloads))


def test_a_nan_time_and_extreme_values_survive_the_columns() -> None:
    records = [(0, "e", math.nan, b""), (2**64 - 1, "e", -math.inf, b"\x00" * 70_000)]
    (first, last) = decode_records(encode_records(records))
    assert first[0] == 0 and math.isnan(first[2])
    assert last == records[1]
    assert decode_records(b"") == [] and encode_records([]) == b""


def test_a_whole_batch_around_the_columns_parses_as_one() -> None:
    records = [(7, "drift", 1.5, b'{"a":1}'), (9, "error", 2.0, b"x")]
    body = encode_records(records)
    batch = agent_pb2.TelemetryBatch.FromString(frame_batch(body, 2**40, 300))
    assert (batch.dropped, batch.depth, list(batch.records)) == (2**40, 300, [])
    assert batch.columns.SerializeToString() == body
    assert seqs_from_column(batch.columns.seqs) == [7, 9]
    empty = agent_pb2.TelemetryBatch.FromString(frame_batch(b"", 0, 0))
    assert empty.HasField("columns") and seqs_from_column(empty.columns.seqs) == []


def test_columns_refuse_what_the_protocol_cannot_hold() -> None:
    with pytest.raises(ValueError, match="255"):
        encode_records([(i, f"k{i}", 0.0, b"") for i in range(MAX_KINDS + 1)])
    assert len(decode_columns(encode_records([(i, f"k{i}", 0.0, b"")
                                              for i in range(MAX_KINDS)])).kinds) == MAX_KINDS
    with pytest.raises(ValueError, match="one entry per record"):
        encode_columns([1, 2], [0.0], ["e", "e"], [b"", b""])
    with pytest.raises(ValueError, match="does not fit"):
        encode_records([(2**64, "e", 0.0, b"")])
    with pytest.raises(InvalidInputError, match="n x 8"):
        seqs_from_column(b"\x00" * 9)


_SAMPLE = encode_records([(1, "drift", 1.0, b"abc"), (2, "error", 2.0, b""),
                          (3, "drift", 3.0, b"defg")])


def _with(**fields: bytes | list[str]) -> bytes:
    msg = agent_pb2.TelemetryColumns.FromString(_SAMPLE)
    for name, value in fields.items():
        if name == "kinds":
            del msg.kinds[:]
            msg.kinds.extend(value)  # type: ignore[arg-type]
        else:
            setattr(msg, name, value)
    return msg.SerializeToString()


@pytest.mark.parametrize(("body", "why"), [
    (b"\x0a\x05abc", "claims 5 bytes"),
    (b"\x0a", "truncated"),
    (b"\x0a" + b"\xff" * 11, "longer than 10 bytes"),
    (b"\x08\x01", "wire type 0"),
    (b"\x3a\x00", "field 7"),
    (_with(seqs=b"\x00" * 12), "not a multiple of 8"),
    (_with(created_at=b"\x00" * 16), "created_at holds 16 bytes"),
    (_with(kind_index=b"\x00\x00"), "kind_index holds 2"),
    (_with(kind_index=b"\x00\x01\x02"), "kind index 2 but 2 kinds"),
    (_with(payload_sizes=b"\x00" * 8), "payload_sizes holds 8"),
    (_with(payloads=b"abcdef"), "add up to 7 bytes"),
    (_with(kinds=[f"k{i}" for i in range(MAX_KINDS + 1)]), "at most 255"),
    (_SAMPLE.replace(b"\x1a\x05drift", b"\x1a\x05\xff\xfeift"), "UTF-8"),
], ids=["past-the-end", "no-length", "long-varint", "wire-type", "unknown-field", "seqs",
        "times", "kind-count", "kind-range", "sizes", "payloads", "kinds", "utf8"])
def test_damaged_columns_are_refused_never_misread(body: bytes, why: str) -> None:
    with pytest.raises(InvalidInputError, match=why):
        decode_records(body)


@_PROPERTY
@given(_RECORDS.filter(lambda rs: any(r[3] for r in rs)), st.data())
def test_every_cut_of_a_body_is_refused(records: list[Record], data: st.DataObject) -> None:
    body = encode_records(records)
    cut = data.draw(st.integers(1, len(body) - 1))  # none at all is no records: fine
    with pytest.raises(InvalidInputError):
        decode_records(body[:cut])


# -- the outbox's batches in that encoding --


def test_next_batch_is_pending_encoded_with_the_same_bounds(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:  # under 500 records: all in the unsealed tail
        box.append_many([("error", b"e%d" % i * 40) for i in range(10)], 5.0)
        box.append("drift", b'{"a":1}', 6.0)
        seqs, body = box.next_batch(limit=100)
        assert decode_records(body) == box.pending(limit=100)
        assert seqs == list(range(1, 12))
        seqs, body = box.next_batch(limit=3, after=4)
        assert seqs == [5, 6, 7] and [r[0] for r in decode_records(body)] == seqs
        # The byte bound counts payloads, and the oldest record always goes.
        assert box.next_batch(max_bytes=1)[0] == [1]
        assert box.next_batch(max_bytes=2 * 80 + 5)[0] == [1, 2]
        assert box.next_batch(limit=0) == ([], b"")
        assert box.next_batch(after=11) == ([], b"")


def test_rows_appended_before_the_framing_column_are_read_like_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with contextlib.closing(connect(path)) as conn:  # an outbox as an older agent left it
        migrate(conn, _MIGRATIONS[:2])
        conn.executemany("INSERT INTO outbox (seq, kind, created_at, payload) VALUES (?,?,?,?)",
                         [(1, "error", 1.0, b"one"), (2, "drift", 2.0, b"two")])
    with Outbox(path) as box:
        box.append("install", b"three", 3.0)
        seqs, body = box.next_batch()
        assert seqs == [1, 2, 3]
        assert decode_records(body) == box.pending() == [
            OutboxRecord(1, "error", 1.0, b"one"), OutboxRecord(2, "drift", 2.0, b"two"),
            OutboxRecord(3, "install", 3.0, b"three")]
        assert box.stats().depth == 3 and box.ack([1, 2, 3]) == 3 and box.stats().depth == 0
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (len(_MIGRATIONS),)
