"""A telemetry batch as columns (control_plane/domain/record_columns.py): the wire's byte
columns are read whole or refused, and every operation the checks use keeps records intact."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from edgefleet.v1 import agent_pb2

from control_plane.api.convert import telemetry_from_proto
from control_plane.domain import telemetry_segment as seg
from control_plane.domain.record_columns import MAX_KIND_NAMES, RecordColumns
from control_plane.domain.records import ReportRefusal, TelemetryRecord
from control_plane.domain.telemetry import (
    MAX_PAYLOAD_BYTES,
    OUT_OF_RANGE,
    TOO_LARGE,
    UNKNOWN_KIND,
    screen,
)
from fleetcore.errors import InvalidInputError

RECORDS = [TelemetryRecord(3, "error", 1.5, b'{"a":1}'),
           TelemetryRecord(4, "drift", 2.5, b""),
           TelemetryRecord(9, "error", -0.0, b"\x00\xff" * 100),
           TelemetryRecord(2**63 - 1, "install", 1e300, b"x")]


def _buffers(records: list[TelemetryRecord]) -> dict[str, object]:
    """The six fields of a TelemetryColumns message, written here with struct (not by the
    code under test)."""
    kinds: list[str] = []
    for r in records:
        if r.kind not in kinds:
            kinds.append(r.kind)
    n = len(records)
    return {"seqs": struct.pack(f"<{n}Q", *(r.seq for r in records)),
            "created_at": struct.pack(f"<{n}d", *(r.created_at for r in records)),
            "kinds": kinds,
            "kind_index": bytes(kinds.index(r.kind) for r in records),
            "payload_sizes": struct.pack(f"<{n}I", *(len(r.payload) for r in records)),
            "payloads": b"".join(r.payload for r in records)}


def _columns(fields: dict[str, object]) -> RecordColumns:
    return RecordColumns.from_buffers(fields["seqs"], fields["created_at"],  # type: ignore[arg-type]
                                      fields["kinds"], fields["kind_index"],  # type: ignore[arg-type]
                                      fields["payload_sizes"], fields["payloads"])  # type: ignore[arg-type]


def test_wire_columns_give_back_the_records_they_were_written_from() -> None:
    columns = _columns(_buffers(RECORDS))
    assert len(columns) == 4
    assert columns.records() == RECORDS
    assert columns.seq_list() == [3, 4, 9, 2**63 - 1]
    assert columns.kinds() == ["error", "drift", "error", "install"]
    assert _columns(_buffers([])).records() == []


def test_columns_built_from_records_equal_those_read_from_the_wire() -> None:
    ours, wire = RecordColumns.of(RECORDS), _columns(_buffers(RECORDS))
    assert ours.records() == wire.records()
    assert seg.encode(ours) == seg.encode(wire) == seg.encode(RECORDS)
    assert seg.decode(seg.encode(wire)) == RECORDS


def _with(**changes: object) -> dict[str, object]:
    return {**_buffers(RECORDS), **changes}


@pytest.mark.parametrize(("fields", "why"), [
    (_with(seqs=b"\x00" * 31), "whole number"),
    (_with(seqs=b"\x00" * 40), "created_at holds 32 bytes; 5 records need 40"),
    (_with(created_at=b"\x00" * 24), "created_at holds 24 bytes"),
    (_with(kind_index=b"\x00" * 5), "kind_index holds 5 bytes"),
    (_with(payload_sizes=b"\x00" * 15), "payload_sizes holds 15 bytes"),
    (_with(kind_index=b"\x00\x01\x00\x03"), "kind index 3 but 3 kinds named"),
    (_with(kinds=[]), "kind index 2 but 0 kinds named"),
    (_with(payloads=b""), "do not add up"),
    (_with(payloads=_buffers(RECORDS)["payloads"] + b"!"), "do not add up"),  # type: ignore[operator]
    (_with(payload_sizes=struct.pack("<4I", 2**32 - 1, 2**32 - 1, 2**32 - 1, 2**32 - 1)),
     "do not add up"),  # sizes that overflow 32 bits when added are still summed exactly
    (_with(kinds=[f"k{i}" for i in range(MAX_KIND_NAMES + 1)]), "at most 255"),
], ids=["seqs-ragged", "seqs-extra", "times", "kinds", "sizes", "index", "no-kinds",
        "payload-short", "payload-long", "size-overflow", "many-kinds"])
def test_columns_that_do_not_fit_each_other_are_refused(fields: dict[str, object],
                                                        why: str) -> None:
    with pytest.raises(InvalidInputError, match=why):
        _columns(fields)


def test_a_batch_refused_at_the_edge_is_refused_whole_through_the_protobuf_message() -> None:
    fields = _with(payloads=b"")
    batch = agent_pb2.TelemetryBatch(columns=agent_pb2.TelemetryColumns(**fields))  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="do not add up"):
        telemetry_from_proto(batch)


def test_an_older_agent_s_records_come_first_then_the_columns() -> None:
    old = [agent_pb2.TelemetryRecord(seq=1, kind="error", created_at=1.0, payload=b"p"),
           agent_pb2.TelemetryRecord(seq=2, kind="made-up", created_at=1.0, payload=b"")]
    batch = agent_pb2.TelemetryBatch(records=old, columns=agent_pb2.TelemetryColumns(
        **_buffers(RECORDS)))  # type: ignore[arg-type]
    columns = telemetry_from_proto(batch)
    assert columns.seq_list() == [1, 2, 3, 4, 9, 2**63 - 1]
    assert columns.kinds() == ["error", "made-up", "error", "drift", "error", "install"]
    assert columns.records()[2:] == RECORDS
    assert telemetry_from_proto(agent_pb2.TelemetryBatch()).records() == []


def test_screen_refuses_by_array_what_it_refused_record_by_record() -> None:
    records = [*RECORDS,
               TelemetryRecord(2**63, "error", 1.0, b""),
               TelemetryRecord(11, "drift", float("inf"), b""),
               TelemetryRecord(12, "weather", 1.0, b""),
               TelemetryRecord(13, "sample", 1.0, b"x" * (MAX_PAYLOAD_BYTES + 1))]
    kept, refused = screen("dev-1", _columns(_buffers(records)))
    assert kept.records() == RECORDS
    assert refused == [ReportRefusal("dev-1", "error", OUT_OF_RANGE),
                       ReportRefusal("dev-1", "drift", OUT_OF_RANGE),
                       ReportRefusal("dev-1", "?", UNKNOWN_KIND),
                       ReportRefusal("dev-1", "sample", TOO_LARGE)]
    all_good = RecordColumns.of(RECORDS)
    assert screen("dev-1", all_good) == (all_good, [])  # nothing copied in the usual case


def test_kind_masks_and_the_records_they_pick_for_one_kind_several_or_none() -> None:
    mixed = RecordColumns.of(RECORDS)
    kinds = [r.kind for r in RECORDS]
    for wanted in ({"error"}, {"sample", "drift"}, {"weather"}, set(kinds)):
        mask = mixed.kind_mask(wanted)
        assert mask.tolist() == [k in wanted for k in kinds]
        assert mixed.records(mask) == [r for r in RECORDS if r.kind in wanted]
    one_kind = RecordColumns.of([r._replace(kind="error") for r in RECORDS])
    assert one_kind.kind_mask({"error"}).tolist() == [True] * 4
    assert one_kind.kind_mask({"drift"}).tolist() == [False] * 4
    assert one_kind.records(one_kind.kind_mask({"drift"})) == []
    assert RecordColumns.of([]).kind_mask({"error"}).tolist() == []


def test_select_head_concat_and_replace_keep_each_record_whole() -> None:
    columns = RecordColumns.of(RECORDS)
    assert columns.select(np.array([False, True, True, False])).records() == RECORDS[1:3]
    assert columns.select(np.ones(4, dtype=np.bool_)) is columns
    assert columns.head(2).records() == RECORDS[:2]
    assert columns.head(9) is columns
    other = RecordColumns.of([TelemetryRecord(20, "sample", 3.0, b"s"),
                              TelemetryRecord(21, "error", 3.0, b"e")])
    joined = RecordColumns.concat([columns, other])
    assert joined.records() == [*RECORDS, *other.records()]
    assert joined.kind_names == ("error", "drift", "install", "sample")
    replaced = columns.replace_payloads({9: b"new"})
    assert [r.payload for r in replaced.records()] == [b'{"a":1}', b"", b"new", b"x"]
    assert columns.records(columns.kind_mask({"error"})) == [RECORDS[0], RECORDS[2]]
