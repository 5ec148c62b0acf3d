"""Telemetry on the wire, written and read by hand (pure): ``TelemetryColumns`` bodies and the
``TelemetryBatch`` around one.

The outbox keeps its records sealed into batches whose stored body is already the encoding of
a ``TelemetryColumns`` message (protos/edgefleet/v1/agent.proto): the seqs, times, kind
indexes and payload sizes as packed little-endian arrays, the distinct kinds once, then the
payloads concatenated. Sending a stored batch is then ``frame_batch(body, dropped, depth)``:
``TelemetryBatch.columns`` (field 4) around the body as it is, then ``dropped`` and ``depth``,
one parse by the protobuf runtime on the way out; nothing is built per record.

Why by hand: a message per record cost the agent ~0.9 us a record to build; the columns are a
few C-level ``array`` operations per batch (``array('Q', seqs).tobytes()``...), and decoding
slices the same columns back. Both are checked against the generated classes
(tests/test_outbox_wire.py).

Decoding checks every length against the bytes it has (each column's size against the record
count, the payload sizes against the payloads, every kind index against the kinds, the kinds'
UTF-8) and refuses anything else with ``InvalidInputError``: a stored body is our own writing,
but a damaged file must fail loudly, never be misread or sent as garbage.

``record_head`` is the framing of the previous design (a ``TelemetryBatch.records`` element
before its payload); it stays for the tests that check what older agents sent.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterable, Sequence
from itertools import accumulate
from typing import Any, NamedTuple

from fleetcore.errors import InvalidInputError

__all__ = ["ASK_ACK_RUNS", "MAX_KINDS", "Columns", "batch_tail", "decode_columns",
           "decode_records", "encode_columns", "encode_records", "frame_batch", "record_head",
           "records_of", "seqs_from_column"]

# Field tags: (number << 3) | wire type (0 varint, 1 fixed64, 2 length-delimited).
_BATCH_RECORDS = b"\x0a"  # TelemetryBatch.records = 1
_BATCH_DROPPED = b"\x10"  # TelemetryBatch.dropped = 2
_BATCH_DEPTH = b"\x18"  # TelemetryBatch.depth = 3
_BATCH_COLUMNS = b"\x22"  # TelemetryBatch.columns = 4
_SEQ = b"\x08"  # TelemetryRecord.seq = 1
_KIND = b"\x12"  # TelemetryRecord.kind = 2
_CREATED_AT = b"\x19"  # TelemetryRecord.created_at = 3 (double)
_PAYLOAD = b"\x22"  # TelemetryRecord.payload = 4
_DOUBLE = struct.Struct("<d")

# TelemetryColumns: every field is length-delimited (wire type 2); tag = number << 3 | 2.
_C_SEQS, _C_CREATED_AT, _C_KINDS, _C_KIND_INDEX, _C_SIZES, _C_PAYLOADS = range(1, 7)
_KINDS_TAG = b"\x1a"  # TelemetryColumns.kinds = 3
MAX_KINDS = 255  # distinct kinds in one batch (kind_index is a uint8)
_INDEXES = bytes(range(256))

_SWAP = sys.byteorder != "little"
# The columns' widths are the protocol's; the array type codes must give them here.
assert array("Q").itemsize == 8 and array("d").itemsize == 8 and array("I").itemsize == 4


class Columns(NamedTuple):
    """A decoded ``TelemetryColumns`` body: every column checked, n entries each."""

    seqs: array[int]  # 'Q'
    created_at: array[float]  # 'd'
    kinds: list[str]
    kind_index: bytes  # n x index into ``kinds``
    sizes: array[int]  # 'I', each payload's length
    payloads: bytes  # concatenated, sum(sizes) bytes


def _varint(n: int) -> bytes:
    if not 0 <= n < 1 << 64:
        raise ValueError(f"a varint holds 0 to 2^64-1; got {n}")
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def record_head(seq: int, kind: str, created_at: float, payload_len: int) -> bytes:
    """What precedes a record's payload in a ``TelemetryBatch``'s ``records`` field (the
    encoding before ``columns``): ``head + payload`` is one element."""
    kind_bytes = kind.encode()
    body = b"".join((_SEQ, _varint(seq), _KIND, _varint(len(kind_bytes)), kind_bytes,
                     _CREATED_AT, _DOUBLE.pack(created_at), _PAYLOAD, _varint(payload_len)))
    return _BATCH_RECORDS + _varint(len(body) + payload_len) + body


def batch_tail(dropped: int, depth: int) -> bytes:
    """``TelemetryBatch``'s ``dropped`` and ``depth`` fields, to follow the records."""
    return _BATCH_DROPPED + _varint(dropped) + _BATCH_DEPTH + _varint(depth)


# ``TelemetryBatch.ack_runs = true`` (field 5, varint): appended to a batch's bytes, it asks
# the control plane to answer with (first, last) runs.
ASK_ACK_RUNS = bytes([5 << 3 | 0, 1])


def frame_batch(body: bytes, dropped: int, depth: int) -> bytes:
    """A whole ``TelemetryBatch``: ``columns`` = ``body`` (a ``TelemetryColumns`` encoding, as
    stored), then ``dropped`` and ``depth``."""
    return b"".join((_BATCH_COLUMNS, _varint(len(body)), body, batch_tail(dropped, depth)))


# -- encoding --


def _field(number: int, value: bytes) -> bytes:
    """One length-delimited field; empty ones are left out, as the protobuf runtime does."""
    if not value:
        return b""
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _kind_field(kind: str) -> bytes:
    """One element of the repeated ``kinds`` (written even when empty, as protobuf does)."""
    raw = kind.encode()
    return _KINDS_TAG + _varint(len(raw)) + raw


def _packed(typecode: str, values: Iterable[int] | Iterable[float]) -> bytes:
    col = array(typecode, values)
    if _SWAP:
        col.byteswap()
    return col.tobytes()


def encode_columns(seqs: Sequence[int], created_at: Sequence[float], kinds: Sequence[str],
                   payloads: Sequence[bytes]) -> bytes:
    """The ``TelemetryColumns`` encoding of n records given as columns (each of length n).

    Kinds are listed in the order they first appear. Raises ``ValueError`` for columns of
    different lengths, more than ``MAX_KINDS`` distinct kinds, a seq outside uint64 or a payload
    over 4 GiB."""
    n = len(seqs)
    if not len(created_at) == len(kinds) == len(payloads) == n:
        raise ValueError("telemetry columns must all hold one entry per record")
    index = dict.fromkeys(kinds)  # first appearance order, C-level
    if len(index) > MAX_KINDS:
        raise ValueError(f"a telemetry batch holds at most {MAX_KINDS} distinct kinds; "
                         f"got {len(index)}")
    codes = {kind: i for i, kind in enumerate(index)}
    try:
        seq_col = _packed("Q", seqs)
        size_col = _packed("I", map(len, payloads))
    except OverflowError as exc:
        raise ValueError(f"a seq or payload size does not fit its column: {exc}") from exc
    return b"".join((
        _field(_C_SEQS, seq_col),
        _field(_C_CREATED_AT, _packed("d", created_at)),
        *[_kind_field(kind) for kind in codes],
        _field(_C_KIND_INDEX, bytes(map(codes.__getitem__, kinds))),
        _field(_C_SIZES, size_col),
        _field(_C_PAYLOADS, b"".join(payloads)),
    ))


def encode_records(records: Iterable[tuple[int, str, float, bytes]]) -> bytes:
    """``encode_columns`` of (seq, kind, created_at, payload) tuples (e.g. ``OutboxRecord``)."""
    rows = list(records)
    if not rows:
        return b""
    seqs, kinds, created_at, payloads = zip(*rows, strict=True)
    return encode_columns(seqs, created_at, kinds, payloads)


# -- decoding --


def _read_varint(body: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(body):
            raise InvalidInputError("telemetry columns are truncated (inside a varint)")
        byte = body[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift >= 64:
            raise InvalidInputError("telemetry columns hold a varint longer than 10 bytes")


def _unpacked(typecode: str, raw: bytes, n: int, name: str) -> array[Any]:
    col = array(typecode)
    if len(raw) != n * col.itemsize:
        raise InvalidInputError(f"telemetry columns: {name} holds {len(raw)} bytes, expected "
                                f"{n} x {col.itemsize} for {n} records")
    col.frombytes(raw)
    if _SWAP:
        col.byteswap()
    return col


def decode_columns(body: bytes) -> Columns:
    """The columns of a ``TelemetryColumns`` encoding, every length checked; anything that is
    not such an encoding raises ``InvalidInputError``.

    Fields may come in any order (a repeated ``bytes`` field: the last one counts, as in
    protobuf); a field this message does not have, or with another wire type, is refused."""
    fields: dict[int, bytes] = {}
    kinds: list[str] = []
    pos, end = 0, len(body)
    while pos < end:
        key = body[pos]  # every tag of this message is one byte; a longer one is refused
        pos += 1
        number, wire_type = key >> 3, key & 7
        if not _C_SEQS <= number <= _C_PAYLOADS or wire_type != 2:
            raise InvalidInputError(f"telemetry columns hold field {number} of wire type "
                                    f"{wire_type}; expected fields 1 to 6, length-delimited")
        length, pos = _read_varint(body, pos)
        if length > end - pos:
            raise InvalidInputError(f"telemetry columns: field {number} claims {length} bytes; "
                                    f"{end - pos} are left")
        value = body[pos:pos + length]
        pos += length
        if number == _C_KINDS:
            try:
                kinds.append(value.decode())
            except UnicodeDecodeError as exc:
                raise InvalidInputError(f"telemetry columns: a kind is not UTF-8 ({exc})") from exc
        else:
            fields[number] = value
    raw_seqs = fields.get(_C_SEQS, b"")
    if len(raw_seqs) % 8:
        raise InvalidInputError(f"telemetry columns: seqs hold {len(raw_seqs)} bytes, not a "
                                "multiple of 8")
    n = len(raw_seqs) // 8
    seqs = _unpacked("Q", raw_seqs, n, "seqs")
    created_at = _unpacked("d", fields.get(_C_CREATED_AT, b""), n, "created_at")
    kind_index = fields.get(_C_KIND_INDEX, b"")
    if len(kind_index) != n:
        raise InvalidInputError(f"telemetry columns: kind_index holds {len(kind_index)} "
                                f"entries for {n} records")
    if len(kinds) > MAX_KINDS:
        raise InvalidInputError(f"telemetry columns list {len(kinds)} kinds; at most "
                                f"{MAX_KINDS}")
    if kind_index.translate(None, _INDEXES[:len(kinds)]):  # any left: out of range (C speed)
        raise InvalidInputError(f"telemetry columns: kind index {max(kind_index)} but "
                                f"{len(kinds)} kinds")
    sizes = _unpacked("I", fields.get(_C_SIZES, b""), n, "payload_sizes")
    payloads = fields.get(_C_PAYLOADS, b"")
    if sum(sizes) != len(payloads):
        raise InvalidInputError(f"telemetry columns: payload sizes add up to {sum(sizes)} "
                                f"bytes; the payloads are {len(payloads)}")
    return Columns(seqs, created_at, kinds, kind_index, sizes, payloads)


def decode_records(body: bytes) -> list[tuple[int, str, float, bytes]]:
    """The (seq, kind, created_at, payload) records of a ``TelemetryColumns`` encoding, in
    order (``decode_columns``'s checks)."""
    return records_of(decode_columns(body))


def records_of(cols: Columns) -> list[tuple[int, str, float, bytes]]:
    """The records of decoded columns, in order."""
    ends = list(accumulate(cols.sizes))
    starts = [0, *ends][:len(ends)]
    payloads = cols.payloads
    kinds = [cols.kinds[i] for i in cols.kind_index]
    return list(zip(cols.seqs.tolist(), kinds, cols.created_at.tolist(),
                    [payloads[a:b] for a, b in zip(starts, ends, strict=True)], strict=True))


def seqs_from_column(raw: bytes) -> list[int]:
    """A ``seqs`` column (n x uint64 little-endian) as a list; ``InvalidInputError`` when its
    size is not a multiple of 8."""
    if len(raw) % 8:
        raise InvalidInputError(f"a seqs column of {len(raw)} bytes is not n x 8")
    return _unpacked("Q", raw, len(raw) // 8, "seqs").tolist()
