"""The outbox's sealed batches (outbox migration 4): records sealed a batch per row whose body
is the wire encoding, with every rule of the outbox kept: seqs, bounds and drops counted per
kind, acknowledgements of exactly the given seqs, counters equal to a recount, old files
upgraded, damaged rows refused clearly and discarded with a count."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from edgefleet.v1 import agent_pb2
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from edge_agent.reporting.outbox import (
    _MIGRATIONS,
    CORRUPT_KIND,
    CorruptBatchError,
    Outbox,
    OutboxRecord,
)
from edge_agent.reporting.wire import decode_records, encode_records, frame_batch, record_head
from fleetcore.errors import InvalidInputError
from fleetcore.sqlite import connect, migrate

NOW = 1_700_000_000.0


@contextlib.contextmanager
def _file(path: Path) -> Iterator[sqlite3.Connection]:
    """A second, independent connection to the outbox file (as another process would)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def _batches(path: Path) -> list[tuple[int, int, int]]:
    """(first_seq, last_seq, records) of each sealed batch, in order."""
    with _file(path) as conn:
        return conn.execute("SELECT first_seq, last_seq, records FROM outbox_batches"
                            " ORDER BY first_seq").fetchall()


def _tail(path: Path) -> list[int]:
    with _file(path) as conn:
        return [seq for (seq,) in conn.execute("SELECT seq FROM outbox ORDER BY seq")]


def _recount(path: Path) -> tuple[int, int]:
    """(records, payload bytes) pending, counted from the rows and the decoded bodies."""
    with _file(path) as conn:
        n, size = conn.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox").fetchone()
        for first, last, records, nbytes, body in conn.execute(
                "SELECT first_seq, last_seq, records, payload_bytes, body FROM outbox_batches"):
            decoded = decode_records(body)
            assert [len(decoded), sum(len(r[3]) for r in decoded)] == [records, nbytes]
            assert (decoded[0][0], decoded[-1][0]) == (first, last)
            n, size = n + records, size + nbytes
    return n, size


def _all(box: Outbox) -> list[OutboxRecord]:
    return box.pending(limit=1_000_000, max_bytes=1 << 40)


def _consistent(box: Outbox) -> None:
    stats = box.stats()
    assert (stats.depth, stats.depth_bytes) == _recount(box.path)
    records = _all(box)
    assert [r.seq for r in records] == sorted({r.seq for r in records})
    assert (len(records), sum(len(r.payload) for r in records)) == (stats.depth,
                                                                     stats.depth_bytes)
    assert stats.oldest_created_at == (records[0].created_at if records else None)
    assert box.counters() == (stats.dropped, stats.depth)  # what each sent batch carries


def _drain(box: Outbox, limit: int = 500,
           max_bytes: int = 1 << 20) -> list[tuple[list[int], bytes]]:
    """Every batch ``next_batch`` hands out, ``after`` moving on, nothing acknowledged."""
    out: list[tuple[list[int], bytes]] = []
    after = 0
    while True:
        seqs, body = box.next_batch(limit, max_bytes, after=after)
        if not seqs:
            return out
        out.append((seqs, body))
        after = seqs[-1]


@contextlib.contextmanager
def _inserts_into_tail(box: Outbox) -> Iterator[list[int]]:
    """Count the rows the outbox's own connection inserts into the tail table (a temporary
    trigger: it lives on that connection only, the file is not changed)."""
    conn = box._conn
    assert conn is not None
    conn.execute("CREATE TEMP TABLE tail_inserts (n INTEGER)")
    conn.execute("INSERT INTO tail_inserts VALUES (0)")
    conn.execute("CREATE TEMP TRIGGER count_tail_inserts AFTER INSERT ON main.outbox BEGIN"
                 " UPDATE tail_inserts SET n = n + 1; END")
    got: list[int] = []
    try:
        yield got
    finally:
        got.append(conn.execute("SELECT n FROM tail_inserts").fetchone()[0])
        conn.execute("DROP TRIGGER count_tail_inserts")
        conn.execute("DROP TABLE tail_inserts")


# -- sealing --


def test_the_tail_is_sealed_once_it_holds_batch_records(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", batch_records=4) as box:
        for i in range(3):
            box.append("drift", b"%d" % i, NOW + i)
        assert (_batches(box.path), _tail(box.path)) == ([], [1, 2, 3])
        box.append("error", b"3", NOW + 3)
        assert (_batches(box.path), _tail(box.path)) == ([(1, 4, 4)], [])
        box.append("error", b"4", NOW + 4)
        assert (_batches(box.path), _tail(box.path)) == ([(1, 4, 4)], [5])
        assert _all(box) == [OutboxRecord(i + 1, "drift" if i < 3 else "error", NOW + i,
                                          b"%d" % i) for i in range(5)]
        _consistent(box)


def test_the_tail_is_sealed_once_it_holds_batch_bytes_and_no_batch_exceeds_them(
    tmp_path: Path,
) -> None:
    with Outbox(tmp_path / "o.db", batch_records=100, batch_bytes=100,
                max_payload_bytes=500) as box:
        box.append_many([("sample", bytes(30))] * 3, NOW)
        assert _batches(box.path) == []  # 90 bytes
        box.append("sample", bytes(30), NOW)  # 120 >= 100: three fit in a batch
        assert (_batches(box.path), _tail(box.path)) == ([(1, 3, 3)], [4])
        box.append("sample", bytes(70), NOW)  # 100: exactly a batch
        assert (_batches(box.path), _tail(box.path)) == ([(1, 3, 3), (4, 5, 2)], [])
        box.append("sample", bytes(500), NOW)  # one record over batch_bytes: a batch alone
        assert (_batches(box.path)[-1], _tail(box.path)) == ((6, 6, 1), [])
        _consistent(box)


def test_a_batch_holds_at_most_255_kinds(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", batch_records=300) as box:
        box.append_many([(f"k{i}", b"x") for i in range(300)], NOW)
        assert _batches(box.path) == [(1, 255, 255)]
        assert _tail(box.path) == list(range(256, 301))
        assert [r.kind for r in _all(box)] == [f"k{i}" for i in range(300)]
        _consistent(box)


def test_append_many_writes_full_batches_as_batches_not_rows(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        with _inserts_into_tail(box) as rows:
            seqs = box.append_many([("error", b"e%d" % i) for i in range(2_000)], NOW)
        assert seqs == list(range(1, 2_001))
        assert rows == [0]  # not a single row: four batches of 500, written as such
        assert _batches(box.path) == [(1, 500, 500), (501, 1000, 500), (1001, 1500, 500),
                                      (1501, 2000, 500)]
        _consistent(box)


def test_append_many_seals_the_tail_first_then_writes_new_batches(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", batch_records=4) as box:
        box.append_many([("drift", b"a"), ("drift", b"b")], NOW)  # the tail: 1, 2
        with _inserts_into_tail(box) as rows:
            assert box.append_many([("error", b"%d" % i) for i in range(8)], NOW + 1) == \
                list(range(3, 11))
        # 1-4: the tail and two new records (moved, so those two were rows first); 5-8 new,
        # sealed as they came; 9-10 the new tail.
        assert (_batches(box.path), _tail(box.path)) == ([(1, 4, 4), (5, 8, 4)], [9, 10])
        assert rows == [4]
        assert [(r.kind, r.created_at) for r in _all(box)][1:3] == [("drift", NOW),
                                                                   ("error", NOW + 1)]
        _consistent(box)


def test_the_reuse_guard_covers_batches(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", batch_records=2) as box:
        box.append_many([("drift", b"%d" % i) for i in range(5)], NOW)  # 1-2, 3-4 sealed; 5
        box.ack_through(2)
        body = encode_records([(1, "drift", NOW, b"again")])
    with _file(tmp_path / "o.db") as conn:
        with pytest.raises(sqlite3.IntegrityError, match="reused"):  # acknowledged, gone
            conn.execute("INSERT INTO outbox_batches VALUES (1, 1, 1, 5, 0, ?)", (body,))
        with pytest.raises(sqlite3.IntegrityError, match="reused"):  # 5 is a row, 6 new
            conn.execute("INSERT INTO outbox_batches VALUES (5, 6, 2, 5, 0, ?)", (body,))
        with pytest.raises(sqlite3.IntegrityError, match="never gains records"):
            conn.execute("UPDATE outbox_batches SET last_seq = 9 WHERE first_seq = 3")
    with Outbox(tmp_path / "o.db", batch_records=2) as box:
        assert [r.seq for r in _all(box)] == [3, 4, 5] and box.append("drift", b"d", NOW) == 6


def test_a_full_disk_while_sealing_loses_only_the_new_records_counted(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", batch_records=4) as box:
        box.append_many([("drift", b"%d" % i) for i in range(3)], NOW)
        assert box._conn is not None
        (pages,) = box._conn.execute("PRAGMA page_count").fetchone()
        box._conn.execute(f"PRAGMA max_page_count = {pages}")  # SQLITE_FULL from here on
        assert box.append_many([("sample", bytes(3000))] * 6, NOW) == [None] * 6
        assert (_batches(box.path), _tail(box.path)) == ([], [1, 2, 3])  # as it was
        assert box.stats().unwritable == 6 and box.stats().dropped_by_kind == {"sample": 6}
        box._conn.execute("PRAGMA max_page_count = 1000000")
        assert box.append("error", b"x", NOW) == 4  # space again: sealed as usual
        assert _batches(box.path) == [(1, 4, 4)]
        _consistent(box)


# -- reading --


def test_next_batch_hands_out_a_sealed_batch_exactly_as_stored(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", batch_records=4) as box:
        box.append_many([("drift" if i % 3 else "error", b"p%d" % i) for i in range(10)], NOW)
        with _file(box.path) as conn:
            stored = [body for (body,) in conn.execute(
                "SELECT body FROM outbox_batches ORDER BY first_seq")]
        batches = _drain(box)
        assert [seqs for seqs, _ in batches] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
        assert [body for _, body in batches[:2]] == stored
        # What goes on the wire: a TelemetryBatch whose columns are the records.
        parsed = agent_pb2.TelemetryBatch.FromString(frame_batch(batches[0][1], 7, 10))
        assert (parsed.dropped, parsed.depth, len(parsed.records)) == (7, 10, 0)
        assert parsed.columns.SerializeToString() == stored[0]
        every = [r for _, body in batches for r in decode_records(body)]
        assert every == [tuple(r) for r in _all(box)]
        assert box.next_batch(limit=0) == ([], b"")


def test_next_batch_splits_a_batch_larger_than_the_callers_bounds(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", batch_records=6) as box:
        box.append_many([("sample", bytes(10)) for _ in range(8)], NOW)
        assert [seqs for seqs, _ in _drain(box, limit=4)] == [[1, 2, 3, 4], [5, 6], [7, 8]]
        assert [seqs for seqs, _ in _drain(box, max_bytes=25)] == [[1, 2], [3, 4], [5, 6],
                                                                   [7, 8]]
        assert box.next_batch(max_bytes=1)[0] == [1]  # the oldest always goes
        seqs, body = box.next_batch(after=3)  # from inside a batch: the rest of it
        assert seqs == [4, 5, 6] and [r[0] for r in decode_records(body)] == seqs


def test_a_batch_with_gaps_is_handed_out_with_its_own_seqs(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", batch_records=5) as box:
        box.append_many([("drift", b"%d" % i) for i in range(5)], NOW)
        assert box.ack([2, 4]) == 2
        assert _batches(box.path) == [(1, 5, 3)]
        assert box.ack([2, 4]) == 0  # seqs in its gaps: nothing to do
        ((seqs, body),) = _drain(box)
        assert seqs == [1, 3, 5] and [r[3] for r in decode_records(body)] == [b"0", b"2", b"4"]
        _consistent(box)


# -- acknowledging --


def test_ack_of_whole_batches_deletes_their_rows_without_reading_them(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", batch_records=4) as box:
        box.append_many([("drift", b"%d" % i) for i in range(14)], NOW)
        assert _batches(box.path) == [(1, 4, 4), (5, 8, 4), (9, 12, 4)]
        with _file(box.path) as conn:  # damage two bodies: whole acks never decode them
            conn.execute("UPDATE outbox_batches SET body = x'ff' WHERE first_seq IN (1, 9)")
        assert box.ack([9, 10, 11, 12, 1, 2, 3, 4, 13]) == 9
        assert (_batches(box.path), _tail(box.path)) == ([(5, 8, 4)], [14])
        assert box.stats().dropped == 0  # deleted as acknowledged, not discarded
        _consistent(box)


def test_a_partial_ack_rewrites_the_batch_without_those_seqs(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", batch_records=4) as box:
        box.append_many([("drift" if i % 2 else "error", b"%d" % i) for i in range(10)], NOW)
        assert box.ack([1, 6, 7, 9, 99]) == 4  # across two batches and the tail
        assert (_batches(box.path), _tail(box.path)) == ([(2, 4, 3), (5, 8, 2)], [10])
        assert [r.seq for r in _all(box)] == [2, 3, 4, 5, 8, 10]
        assert [r.payload for r in _all(box)] == [b"1", b"2", b"3", b"4", b"7", b"9"]
        _consistent(box)
        assert box.ack([2, 3, 4, 5, 8, 10]) == 6 and _batches(box.path) == []
        _consistent(box)


def test_ack_runs_deletes_exactly_the_seqs_inside_them(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", batch_records=4) as box:
        box.append_many([("drift", b"%d" % i) for i in range(14)], NOW)
        with _file(box.path) as conn:  # a whole batch acknowledged is never decoded
            conn.execute("UPDATE outbox_batches SET body = x'ff' WHERE first_seq = 9")
        # Batch 9-12 whole (as two runs that touch), 2-3 of batch 1-4, and 14 of the tail;
        # an empty run and seqs never given out change nothing.
        assert box.ack_runs([(11, 12), (9, 10), (2, 3), (14, 20), (7, 6)]) == 7
        assert (_batches(box.path), _tail(box.path)) == ([(1, 4, 2), (5, 8, 4)], [13])
        assert [r.seq for r in _all(box)] == [1, 4, 5, 6, 7, 8, 13]
        assert box.stats().dropped == 0
        _consistent(box)
        assert box.ack_runs([]) == 0 and box.ack_runs([(1, 100)]) == 7
        _consistent(box)


def test_ack_through_a_seq_inside_a_batch(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", batch_records=4) as box:
        box.append_many([("drift", b"%d" % i) for i in range(10)], NOW + 0)
        box.append("error", b"late", NOW + 5)
        assert box.ack_through(6) == 6
        assert (_batches(box.path), _tail(box.path)) == ([(7, 8, 2)], [9, 10, 11])
        assert box.stats().oldest_created_at == NOW
        _consistent(box)
        assert box.ack_through(10) == 4
        assert box.stats().oldest_created_at == NOW + 5
        assert box.ack_through(100) == 1 and box.stats().depth == 0
        _consistent(box)


# -- the bounds --


def test_drops_take_the_oldest_records_of_a_sealed_batch_counted_per_kind(
    tmp_path: Path,
) -> None:
    kinds = ["drift", "error", "sample"]
    with Outbox(tmp_path / "o.db", max_records=10, batch_records=4) as box:
        box.append_many([(kinds[i % 3], b"%d" % i) for i in range(10)], NOW)
        assert _batches(box.path) == [(1, 4, 4), (5, 8, 4)]
        assert box.append_many([("install", b"a"), ("install", b"b"), ("install", b"c")],
                               NOW) == [11, 12, 13]
        # Exactly three dropped: seqs 1-3, the oldest of the first batch, rewritten to seq 4.
        assert _batches(box.path)[0] == (4, 4, 1)
        assert [r.seq for r in _all(box)] == list(range(4, 14))
        assert box.stats().dropped_by_kind == {"drift": 1, "error": 1, "sample": 1}
        _consistent(box)
        box.append("install", b"d", NOW)  # the rest of the first batch: the row goes
        assert [r.seq for r in _all(box)] == list(range(5, 15))
        assert box.stats().dropped_by_kind == {"drift": 2, "error": 1, "sample": 1}
        _consistent(box)


def test_a_byte_bound_drops_whole_batches_and_part_of_the_next(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_bytes=100, max_payload_bytes=100, batch_records=3) as box:
        box.append_many([("sample" if i % 2 else "drift", bytes(10)) for i in range(10)], NOW)
        assert _batches(box.path) == [(1, 3, 3), (4, 6, 3), (7, 9, 3)]
        assert box.append("error", bytes(45), NOW) == 11  # 100 + 45: five 10-byte ones go
        assert _batches(box.path) == [(6, 6, 1), (7, 9, 3)]
        assert box.stats().dropped_by_kind == {"drift": 3, "sample": 2}
        assert (box.stats().depth, box.stats().depth_bytes) == (6, 95)
        _consistent(box)


def test_an_append_many_over_the_bound_keeps_its_newest_records(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_records=5, batch_records=2) as box:
        box.append_many([("drift", b"old")] * 4, NOW)
        seqs = box.append_many([("sample", b"%d" % i) for i in range(7)], NOW)
        assert seqs == [None, None, 7, 8, 9, 10, 11]
        assert [r.payload for r in _all(box)] == [b"2", b"3", b"4", b"5", b"6"]
        assert box.stats().dropped_by_kind == {"drift": 4, "sample": 2}
        assert box.stats().next_seq == 12
        _consistent(box)


# -- files from before --


def _old_outbox(path: Path) -> None:
    """An outbox as the agent of migration 3 left it: rows framed, rows from before (head
    NULL), some acknowledged."""
    with contextlib.closing(connect(path)) as conn:
        migrate(conn, _MIGRATIONS[:3])
        conn.executemany("INSERT INTO outbox (seq, kind, created_at, payload) VALUES (?,?,?,?)",
                         [(1, "error", 1.0, b"one"), (2, "drift", 2.0, b"two")])
        conn.executemany("INSERT INTO outbox (seq, kind, created_at, payload, head)"
                         " VALUES (?,?,?,?,?)",
                         [(i, "drift", float(i), b"r%d" % i,
                           record_head(i, "drift", float(i), len(b"r%d" % i)))
                          for i in range(3, 8)])
        conn.execute("DELETE FROM outbox WHERE seq = 7")
        conn.execute("UPDATE outbox_meta SET depth = depth - 1, depth_bytes = depth_bytes - 2")
        assert tuple(conn.execute("SELECT next_seq, depth FROM outbox_meta").fetchone()) == (8, 6)


def test_an_outbox_of_migration_3_keeps_working_after_the_upgrade(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    _old_outbox(path)
    expected = [OutboxRecord(1, "error", 1.0, b"one"), OutboxRecord(2, "drift", 2.0, b"two"),
                *[OutboxRecord(i, "drift", float(i), b"r%d" % i) for i in range(3, 7)]]
    with Outbox(path, batch_records=4) as box:
        assert _all(box) == expected  # its rows are the tail, read as they are
        _consistent(box)
        seqs, body = box.next_batch(limit=3)
        assert seqs == [1, 2, 3] and decode_records(body) == [tuple(r) for r in expected[:3]]
        assert box.ack(seqs) == 3
        assert box.append("install", b"new", 9.0) == 8  # seqs go on; the old rows get sealed
        assert (_batches(path), _tail(path)) == ([(4, 8, 4)], [])
        ((seqs, body),) = _drain(box)
        assert decode_records(body) == [*map(tuple, expected[3:]), (8, "install", 9.0, b"new")]
        assert box.ack(seqs) == 4 and box.stats().depth == 0
        _consistent(box)
    with _file(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (len(_MIGRATIONS),)


# -- damaged rows --


def _damage(path: Path, first_seq: int, body: bytes) -> None:
    with _file(path) as conn:
        conn.execute("UPDATE outbox_batches SET body = ? WHERE first_seq = ?", (body, first_seq))


@pytest.mark.parametrize("body", [
    b"\xff\xff", b"",  # not columns at all; no records
    encode_records([(5, "drift", 1.0, b"4"), (6, "drift", 1.0, b"5")]) + b"\x32\x05abc",
    encode_records([(5, "drift", 1.0, b"4x"), (6, "drift", 1.0, b"5"), (7, "drift", 1.0, b"6"),
                    (8, "drift", 1.0, b"7")]),  # valid, but not what its row says (bytes)
    encode_records([(1, "drift", 1.0, b"0"), (2, "drift", 1.0, b"1"), (3, "drift", 1.0, b"2"),
                    (4, "drift", 1.0, b"3")]),  # another batch's seqs
], ids=["junk", "empty", "truncated-payloads", "sizes", "seqs"])
def test_a_corrupt_batch_is_refused_clearly_and_discarded_with_a_count(
    tmp_path: Path, body: bytes
) -> None:
    with Outbox(tmp_path / "o.db", batch_records=4) as box:
        box.append_many([("drift", b"%d" % i) for i in range(10)], NOW)
        box.append("error", b"e", NOW)
        _damage(box.path, 5, body)
        assert box.next_batch(after=0)[0] == [1, 2, 3, 4]  # the one before is fine
        with pytest.raises(CorruptBatchError, match="seqs 5 to 8") as err:
            box.next_batch(after=4)
        assert isinstance(err.value, InvalidInputError) and err.value.first_seq == 5
        with pytest.raises(CorruptBatchError):
            box.pending(limit=100)
        assert box.discard_corrupt(1) == 0  # a sound batch is left alone
        assert box.discard_corrupt(5) == 4
        assert box.discard_corrupt(5) == 0
        stats = box.stats()
        assert (stats.dropped, stats.dropped_by_kind) == (4, {CORRUPT_KIND: 4})
        assert [r.seq for r in _all(box)] == [1, 2, 3, 4, 9, 10, 11]
        assert box.next_batch(after=4)[0] == [9, 10, 11]
        _consistent(box)


def test_writes_that_meet_a_corrupt_batch_discard_it_and_go_on(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_records=12, batch_records=4) as box:
        box.append_many([("drift", b"%d" % i) for i in range(12)], NOW)
        _damage(box.path, 1, b"\x00")
        _damage(box.path, 5, b"\x00")
        assert box.append("error", b"x", NOW) == 13  # a drop meets batch 1: gone whole
        # A partial ack meets batch 5: gone whole too, every record counted as dropped (which
        # of them seq 6 was cannot be told): none is reported as acknowledged.
        assert box.ack([6]) == 0
        assert [r.seq for r in _all(box)] == [9, 10, 11, 12, 13]
        assert box.stats().dropped_by_kind == {CORRUPT_KIND: 8}
        _consistent(box)


# -- every operation, against a model --


class OutboxMachine(RuleBasedStateMachine):
    """Random appends, acknowledgements, drains and reopenings against a list of what must be
    pending, with records dropped one by one, oldest first, as each new one arrives (the rule
    as written); after every step the outbox holds exactly the model and its counters equal a
    recount of the file."""

    BOUNDS: ClassVar[dict[str, int]] = {
        "max_records": 14, "max_bytes": 120, "max_payload_bytes": 40,
        "batch_records": 4, "batch_bytes": 50}

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="outbox-machine-"))
        self.box = Outbox(self.dir / "o.db", **self.BOUNDS)
        self.model: list[OutboxRecord] = []
        self.dropped: Counter[str] = Counter()
        self.next_seq = 1
        self.now = 0.0

    def teardown(self) -> None:
        self.box.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @initialize()
    def start(self) -> None:
        pass

    def _expect_append(self, items: list[tuple[str, bytes]]) -> list[int | None]:
        seqs = []
        for kind, payload in items:
            self.model.append(OutboxRecord(self.next_seq, kind, self.now, payload))
            seqs.append(self.next_seq)
            self.next_seq += 1
            while (len(self.model) > self.BOUNDS["max_records"]
                   or sum(len(r.payload) for r in self.model) > self.BOUNDS["max_bytes"]):
                self.dropped[self.model.pop(0).kind] += 1
        kept = {r.seq for r in self.model}
        return [seq if seq in kept else None for seq in seqs]

    @rule(kind=st.sampled_from(["drift", "error", "sample"]), payload=st.binary(max_size=40))
    def append(self, kind: str, payload: bytes) -> None:
        self.now += 1
        assert self.box.append(kind, payload, self.now) == self._expect_append([(kind, payload)])[0]

    @rule(items=st.lists(st.tuples(st.sampled_from(["drift", "error", "arm_stats"]),
                                   st.binary(max_size=30)), max_size=25))
    def append_many(self, items: list[tuple[str, bytes]]) -> None:
        self.now += 1
        assert self.box.append_many(items, self.now) == self._expect_append(items)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        pending = [r.seq for r in self.model]
        chosen = data.draw(st.lists(st.sampled_from(pending), max_size=12)
                           | st.lists(st.integers(0, self.next_seq + 3), max_size=6))
        gone = set(chosen) & set(pending)
        assert self.box.ack(chosen) == len(gone)
        self.model = [r for r in self.model if r.seq not in gone]

    @precondition(lambda self: self.model)
    @rule(runs=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 6)), max_size=4))
    def ack_runs(self, runs: list[tuple[int, int]]) -> None:
        """Runs that overlap, touch, are empty (last < first) or cover gaps and seqs never
        given out: exactly the pending seqs inside one are deleted."""
        pairs = [(a, a + d - 1) for a, d in runs]  # d = 0: an empty run
        gone = {r.seq for r in self.model if any(a <= r.seq <= b for a, b in pairs)}
        assert self.box.ack_runs(pairs) == len(gone)
        self.model = [r for r in self.model if r.seq not in gone]

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def ack_through(self, data: st.DataObject) -> None:
        seq = data.draw(st.integers(0, self.next_seq))
        assert self.box.ack_through(seq) == sum(r.seq <= seq for r in self.model)
        self.model = [r for r in self.model if r.seq > seq]

    @rule(limit=st.integers(1, 6), max_bytes=st.integers(1, 80))
    def drain_without_acking(self, limit: int, max_bytes: int) -> None:
        got = []
        for seqs, body in _drain(self.box, limit, max_bytes):
            records = decode_records(body)
            assert [r[0] for r in records] == seqs and len(seqs) <= limit
            assert len(seqs) == 1 or sum(len(r[3]) for r in records) <= max_bytes
            got += records
        assert got == [tuple(r) for r in self.model]

    @rule()
    def reopen(self) -> None:
        self.box.close()
        self.box = Outbox(self.dir / "o.db", **self.BOUNDS)

    @invariant()
    def holds_the_model_and_counts_right(self) -> None:
        assert _all(self.box) == self.model
        stats = self.box.stats()
        assert (stats.depth, stats.depth_bytes) == _recount(self.box.path) == (
            len(self.model), sum(len(r.payload) for r in self.model))
        assert stats.dropped_by_kind == dict(sorted((+self.dropped).items()))
        assert stats.next_seq == self.next_seq
        assert stats.oldest_created_at == (self.model[0].created_at if self.model else None)


TestOutboxMachine = OutboxMachine.TestCase
TestOutboxMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow])
