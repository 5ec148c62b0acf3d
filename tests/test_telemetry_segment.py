"""Raw telemetry as segments (control_plane/domain/telemetry_segment.py): what goes in comes
out, and bytes that are not a segment are refused, never misread."""

from __future__ import annotations

import struct

import pytest

from control_plane.domain import telemetry_segment as seg
from control_plane.domain.records import TelemetryRecord
from control_plane.domain.telemetry import KINDS
from fleetcore.errors import InvalidInputError

RECORDS = [TelemetryRecord(7, "drift", 1.5, b'{"a":1}'),
           TelemetryRecord(2**63 - 1, "error", -0.0, b""),
           TelemetryRecord(0, "sample", 1e300, b"\x00\xff" * 1000),
           TelemetryRecord(9, "install", 2.0, b"x")]


def test_records_come_back_as_they_went_in_with_their_seqs_readable_alone() -> None:
    body = seg.encode(RECORDS)
    assert seg.decode(body) == RECORDS
    assert seg.seqs_of(body) == [7, 2**63 - 1, 0, 9]
    assert seg.decode(seg.encode([])) == []


def test_every_kind_the_control_plane_accepts_has_a_stored_code() -> None:
    assert set(seg.KIND_CODES) == KINDS


def test_a_kind_without_a_code_is_refused_when_encoding() -> None:
    with pytest.raises(InvalidInputError, match="cannot be stored"):
        seg.encode([TelemetryRecord(1, "weather", 1.0, b"")])


def _header(version: int, n: int) -> bytes:
    return struct.pack("<BI", version, n)


@pytest.mark.parametrize(("body", "why"), [
    (b"", "truncated"),
    (b"\x01\x02", "truncated"),
    (_header(2, 0), "version 2"),
    (_header(1, 10**9), "claims"),
    (_header(1, 2) + b"\x00" * 8, "truncated"),  # one seq of two
    (seg.encode(RECORDS)[:-1], "do not match"),  # a payload cut short
    (seg.encode(RECORDS) + b"!", "do not match"),  # bytes past the last payload
], ids=["empty", "short-header", "version", "count", "seqs", "cut", "trailing"])
def test_bytes_that_are_not_a_whole_segment_are_refused(body: bytes, why: str) -> None:
    with pytest.raises(InvalidInputError, match=why):
        seg.decode(body)


def test_an_unknown_kind_code_is_refused() -> None:
    body = bytearray(seg.encode([TelemetryRecord(1, "error", 1.0, b"p")]))
    body[5 + 8 + 8] = 200  # the kind column follows the header, the seq and the time
    with pytest.raises(InvalidInputError, match="unknown kind code 200"):
        seg.decode(bytes(body))


def test_a_lying_payload_length_cannot_reach_past_the_segment() -> None:
    body = bytearray(seg.encode([TelemetryRecord(1, "error", 1.0, b"p")]))
    struct.pack_into("<I", body, 5 + 8 + 8 + 1, 2**32 - 1)
    with pytest.raises(InvalidInputError, match="do not match"):
        seg.decode(bytes(body))
