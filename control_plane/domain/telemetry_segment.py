"""How the control plane keeps raw telemetry: a device's stored batch as one segment (pure).

Raw telemetry is written far more than it is read (the rows operators query are the derived
ones: drift windows, arm statistics, samples; raw records are kept for their retention, then
rolled up into per-day counts). Storing a 500-record batch as 500 rows cost more than
everything else on the MQTT telemetry path together (three B-tree inserts a record on SQLite),
so a stored batch is one row holding one segment: the batch's new records, columnar.

Layout (little-endian), version 1::

    u8 version | u32 n | n x i64 seq | n x f64 created_at | n x u8 kind code
    | n x u32 payload length | payloads, concatenated

Encoding and decoding are a few C-level array operations per column, not Python work per
field. Kinds are codes into ``KIND_CODES`` (only known kinds are stored: ``screen`` refuses the
rest). Decoding checks every length against the bytes it has and refuses anything else with
``InvalidInputError``: a segment is our own writing, but a database restored from elsewhere
should fail loudly, not be misread.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence

import numpy as np

from control_plane.domain.record_columns import RecordColumns, as_columns
from control_plane.domain.records import TelemetryRecord
from fleetcore.errors import InvalidInputError

__all__ = ["KIND_CODES", "MAX_SEGMENT_RECORDS", "decode", "encode", "seqs_of"]

# Codes are stored: append new kinds at the end, never reorder.
KIND_CODES = ("arm_stats", "drift", "sample", "install", "error")
_CODE = {kind: i for i, kind in enumerate(KIND_CODES)}
MAX_SEGMENT_RECORDS = 100_000
_VERSION = 1
_HEADER = struct.Struct("<BI")
_SWAP = sys.byteorder != "little"


def _read(typecode: str, body: bytes, start: int, n: int) -> tuple[array, int]:
    col = array(typecode)
    end = start + n * col.itemsize
    if end > len(body):
        raise InvalidInputError("telemetry segment is truncated")
    col.frombytes(body[start:end])
    if _SWAP:
        col.byteswap()
    return col, end


def encode(records: Sequence[TelemetryRecord] | RecordColumns) -> bytes:
    """One segment of ``records`` (of known kinds only). From columns: a few array
    operations, the payloads as they came."""
    columns = as_columns(records)
    n = len(columns)
    if n > MAX_SEGMENT_RECORDS:
        raise InvalidInputError(f"a telemetry segment holds at most {MAX_SEGMENT_RECORDS} "
                                f"records; got {n}")
    table = np.array([_CODE.get(k, 255) for k in columns.kind_names] or [255], dtype=np.uint8)
    codes = table[columns.kind_index]
    if n and int(codes.max()) == 255:
        used = {columns.kind_names[i] for i in np.unique(columns.kind_index).tolist()}
        raise InvalidInputError(f"telemetry kinds {sorted(used - _CODE.keys())} cannot be "
                                f"stored (known: {', '.join(KIND_CODES)})")
    if n and int(columns.seqs.max()) > 2**63 - 1:
        raise InvalidInputError("a telemetry segment holds seqs below 2^63")
    return b"".join((
        _HEADER.pack(_VERSION, n),
        columns.seqs.astype("<i8").tobytes(),
        columns.created_at.astype("<f8").tobytes(),
        codes.tobytes(),
        columns.sizes.astype("<u4").tobytes(),
        columns.payloads,
    ))


def _columns(body: bytes) -> tuple[int, array, int]:
    if len(body) < _HEADER.size:
        raise InvalidInputError("telemetry segment is truncated")
    version, n = _HEADER.unpack_from(body)
    if version != _VERSION:
        raise InvalidInputError(f"telemetry segment version {version} is not known (this "
                                f"software reads version {_VERSION})")
    if n > MAX_SEGMENT_RECORDS:
        raise InvalidInputError(f"telemetry segment claims {n} records; at most "
                                f"{MAX_SEGMENT_RECORDS}")
    seqs, end = _read("q", body, _HEADER.size, n)
    return n, seqs, end


def seqs_of(body: bytes) -> list[int]:
    """The seqs a segment holds (what deduplication needs, without the payloads)."""
    return list(_columns(body)[1])


def decode(body: bytes) -> list[TelemetryRecord]:
    """The records of a segment, in the order they were stored."""
    n, seqs, end = _columns(body)
    created, end = _read("d", body, end, n)
    codes = body[end:end + n]
    if len(codes) != n:
        raise InvalidInputError("telemetry segment is truncated")
    if codes and max(codes) >= len(KIND_CODES):
        raise InvalidInputError(f"telemetry segment has an unknown kind code {max(codes)}")
    lengths, end = _read("I", body, end + n, n)
    if end + sum(lengths) != len(body):
        raise InvalidInputError("telemetry segment's payload lengths do not match its size")
    out: list[TelemetryRecord] = []
    for seq, at, code, size in zip(seqs, created, codes, lengths, strict=True):
        out.append(TelemetryRecord(seq, KIND_CODES[code], at, body[end:end + size]))
        end += size
    return out
