"""The agent's telemetry outbox: a bounded SQLite queue that loses nothing silently.

Records are kept in two tables. ``outbox`` holds the newest ones a row each (the unsealed
tail); ``outbox_batches`` holds the older ones sealed into batches, a row per batch whose
``body`` is already the batch's wire encoding (a ``TelemetryColumns`` message,
``edge_agent/reporting/wire.py``) beside its first and last seq, record count and payload
bytes. Sending a backlog is then, per batch of 500 records, one row read, one publish and one
row delete (``next_batch`` and ``ack``), not 500 rows read and deleted.

Rules:

* Every record gets a per-device sequence number (``seq``) that strictly increases and is never
  reused: the next one is kept in the file, so it survives restarts, also after every record was
  acknowledged and deleted. The control plane deduplicates on (device, seq). Triggers refuse a
  row (of either table) that would reuse a seq; a sealed batch is either new records or records
  moved from the tail in the same transaction, and a stored batch never gains records or seqs.
* Every sealed batch's seqs are below every tail record's, and batches do not overlap: seq
  order is batches by ``first_seq``, then the tail.
* Sealing: in the transaction of an append, once the tail holds ``batch_records`` records or
  ``batch_bytes`` of payload, its oldest records are sealed into batches of at most
  ``batch_records`` records, ``batch_bytes`` of payload (except a single bigger record) and 255
  distinct kinds, until what is left is under both. ``append_many`` writes new records that
  fill whole batches straight into sealed batches, never as rows first.
* ``append`` is durable when it returns: one transaction on a WAL database with
  ``synchronous=FULL`` (``fleetcore.sqlite.connect``). ``append_many`` writes a batch in one.
* A record is deleted only when the receiver has acknowledged it (``ack`` for exactly the given
  seqs, ``ack_through`` for every seq up to one); unknown seqs are ignored. A sealed batch all
  of whose records are acknowledged is deleted as a row, without reading its body; one
  acknowledged in part is rewritten without those records.
* Bound policy: the outbox holds at most ``max_records`` records and ``max_bytes`` of payload.
  When a new record would exceed either bound, the OLDEST pending records (of any kind, sealed
  or not) are dropped, exactly as many as needed for it to fit; each drop is counted by kind in
  the file (``stats().dropped``, ``dropped_by_kind``) and logged. A sealed batch that loses
  only some of its records is rewritten without its oldest ones. A dropped record may already
  have been delivered but not yet acknowledged; it is counted all the same. Bounds are enforced
  when appending, so reopening with smaller bounds trims on the next append. Since
  ``max_payload_bytes <= max_bytes`` is required, a new record always fits once enough older
  ones are gone.
* A payload over ``max_payload_bytes`` is refused with ``InvalidInputError`` and changes
  nothing; it is not a drop.
* A sealed batch whose body does not decode, or does not hold the seqs and sizes its row says
  (a damaged file), is never sent or misread: reading it (``next_batch``, ``pending``) raises
  ``CorruptBatchError`` (an ``InvalidInputError``) naming it, and ``discard_corrupt`` deletes
  it, counting its records as dropped under the kind ``CORRUPT_KIND`` (the sender does so and
  goes on, so one damaged row cannot block the queue; the drop count reaches the control
  plane). Where a write must decode a batch (a partial ack, a drop), a corrupt one is
  discarded the same way.
* A file that is not an outbox (not SQLite, or another SQLite database) is refused with
  ``InvalidInputError`` and left untouched: recreating it would lose the telemetry in it.
* Storage faults (a full disk, a read-only or failing file system) never escape to the caller:
  serving and the heartbeat go on. A record that cannot be written is lost and counted in
  memory (``stats().unwritable``, also in ``dropped``); an acknowledgement that cannot be
  written leaves the records pending (sent again later; the control plane deduplicates). One
  warning per spell, until a write succeeds again.

One ``Outbox`` owns one connection behind a lock, so serving threads may append while the
sender reads and acknowledges. Depth and byte counters (``outbox_meta``) count both tables and
are kept in the same transaction as the change: by triggers on inserting new records (a row or
a batch), and by the code that deletes, moves or rewrites, with one update per statement or
operation (a per-row delete trigger cost ~1 us a record).
"""

from __future__ import annotations

import bisect
import functools
import logging
import math
import operator
import sqlite3
import sys
import threading
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from edge_agent.reporting.wire import (
    MAX_KINDS,
    Columns,
    decode_columns,
    encode_columns,
    encode_records,
    records_of,
)
from fleetcore.errors import InvalidInputError
from fleetcore.sqlite import connect, migrate

__all__ = ["CORRUPT_KIND", "CorruptBatchError", "Outbox", "OutboxCounters", "OutboxRecord",
           "OutboxStats"]

log = logging.getLogger(__name__)

# PRAGMA application_id marks the file as an outbox ("EFOB"), so another database is never
# mistaken for one.
_APPLICATION_ID = 0x45464F42
_MAX_KIND_CHARS = 64
# The kind under which the records of a discarded corrupt batch are counted as dropped (its
# own kinds cannot be trusted).
CORRUPT_KIND = "(corrupt batch)"

_MIGRATIONS = [
    """
    PRAGMA application_id = 1162235714;  -- _APPLICATION_ID, 0x45464F42
    CREATE TABLE outbox_meta (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        next_seq INTEGER NOT NULL,
        depth INTEGER NOT NULL,
        depth_bytes INTEGER NOT NULL
    );
    INSERT INTO outbox_meta (id, next_seq, depth, depth_bytes) VALUES (1, 1, 0, 0);
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        created_at REAL NOT NULL,
        payload BLOB NOT NULL
    );
    CREATE TABLE outbox_dropped (
        kind TEXT PRIMARY KEY,
        count INTEGER NOT NULL
    );
    CREATE TRIGGER outbox_seq_never_reused BEFORE INSERT ON outbox
    WHEN NEW.seq < (SELECT next_seq FROM outbox_meta)
    BEGIN
        SELECT RAISE(ABORT, 'outbox seq would be reused');
    END;
    CREATE TRIGGER outbox_count_insert AFTER INSERT ON outbox BEGIN
        UPDATE outbox_meta SET next_seq = NEW.seq + 1, depth = depth + 1,
            depth_bytes = depth_bytes + length(NEW.payload);
    END;
    CREATE TRIGGER outbox_count_delete AFTER DELETE ON outbox BEGIN
        UPDATE outbox_meta SET depth = depth - 1,
            depth_bytes = depth_bytes - length(OLD.payload);
    END;
    """,
    # 2: deletes count what they remove once per statement (Outbox._delete), not per row
    """
    DROP TRIGGER outbox_count_delete;
    """,
    # 3: each record's protobuf framing, so that a batch was read as `head || payload` of each
    # row. Unused since migration 4 (rows are framed as columns when read); NULL in new rows.
    """
    ALTER TABLE outbox ADD COLUMN head BLOB;
    """,
    # 4: sealed batches, a row each, the body already a TelemetryColumns encoding. A batch is
    # either new records (first_seq >= next_seq: counted here, next_seq moves past it) or the
    # tail's records moved into it (all of them rows of `outbox` in its range, deleted from
    # there in the same transaction: the counts do not change). A stored batch never grows.
    """
    CREATE TABLE outbox_batches (
        first_seq INTEGER PRIMARY KEY,
        last_seq INTEGER NOT NULL,
        records INTEGER NOT NULL,
        payload_bytes INTEGER NOT NULL,
        first_created_at REAL NOT NULL,
        body BLOB NOT NULL,
        CHECK (records BETWEEN 1 AND last_seq - first_seq + 1)
    );
    CREATE TRIGGER outbox_batches_seq_never_reused BEFORE INSERT ON outbox_batches
    WHEN NEW.first_seq < (SELECT next_seq FROM outbox_meta) AND (
        NEW.last_seq >= (SELECT next_seq FROM outbox_meta)
        OR NEW.records != (SELECT count(*) FROM outbox
                           WHERE seq BETWEEN NEW.first_seq AND NEW.last_seq))
    BEGIN
        SELECT RAISE(ABORT, 'outbox seq would be reused');
    END;
    CREATE TRIGGER outbox_batches_count_insert AFTER INSERT ON outbox_batches
    WHEN NEW.first_seq >= (SELECT next_seq FROM outbox_meta)
    BEGIN
        UPDATE outbox_meta SET next_seq = NEW.last_seq + 1, depth = depth + NEW.records,
            depth_bytes = depth_bytes + NEW.payload_bytes;
    END;
    CREATE TRIGGER outbox_batches_only_shrink BEFORE UPDATE ON outbox_batches
    WHEN NEW.first_seq < OLD.first_seq OR NEW.last_seq > OLD.last_seq
        OR NEW.records > OLD.records
    BEGIN
        SELECT RAISE(ABORT, 'a sealed outbox batch never gains records');
    END;
    """,
]

class OutboxRecord(NamedTuple):  # a tuple: cheap to build, a batch reads hundreds
    seq: int  # per device, strictly increasing, never reused
    kind: str  # e.g. "drift", "arm_stats", "install", "error", "sample"
    created_at: float  # unix seconds
    payload: bytes  # opaque; the caller serializes


class OutboxCounters(NamedTuple):
    dropped: int  # as OutboxStats.dropped
    depth: int  # as OutboxStats.depth


@dataclass(frozen=True)
class OutboxStats:
    depth: int  # records waiting
    depth_bytes: int  # payload bytes waiting
    dropped: int  # records dropped: the outbox was full (persisted) or the disk was (in memory)
    dropped_by_kind: dict[str, int]
    next_seq: int
    oldest_created_at: float | None  # unix seconds; None when empty
    unwritable: int = 0  # records lost since start because storage refused the write


class CorruptBatchError(InvalidInputError):
    """A sealed batch's body does not decode, or does not match its row: it cannot be sent.
    ``Outbox.discard_corrupt(first_seq)`` deletes it and counts its records as dropped."""

    def __init__(self, path: Path, first_seq: int, last_seq: int, records: int,
                 why: str) -> None:
        super().__init__(f"telemetry outbox {path}: the sealed batch of seqs {first_seq} to "
                         f"{last_seq} ({records} records) is corrupt: {why}")
        self.first_seq, self.last_seq, self.records = first_seq, last_seq, records


_Row = tuple[int, int, int, int, bytes]  # first_seq, last_seq, records, payload_bytes, body
_Record = tuple[int, str, float, bytes]


class Outbox:
    """A durable, bounded, thread-safe telemetry queue in one SQLite file."""

    def __init__(
        self,
        path: Path,
        *,
        max_records: int = 100_000,
        max_bytes: int = 64 * 1024 * 1024,
        max_payload_bytes: int = 256 * 1024,
        batch_records: int = 500,
        batch_bytes: int = 1024 * 1024,
    ) -> None:
        if max_records < 1 or max_payload_bytes < 0 or max_payload_bytes > max_bytes:
            raise InvalidInputError(
                "outbox bounds must satisfy max_records >= 1 and "
                f"0 <= max_payload_bytes <= max_bytes; got max_records={max_records}, "
                f"max_payload_bytes={max_payload_bytes}, max_bytes={max_bytes}"
            )
        if batch_records < 1 or batch_bytes < 1:
            raise InvalidInputError(f"outbox batches must allow batch_records >= 1 and "
                                    f"batch_bytes >= 1; got {batch_records} and {batch_bytes}")
        self.path = Path(path)
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.max_payload_bytes = max_payload_bytes
        self.batch_records = batch_records
        self.batch_bytes = batch_bytes
        self._lock = threading.Lock()
        self._warned_full = False
        self._unwritable: Counter[str] = Counter()  # lost to storage faults, by kind
        self._storage_fault = False  # in a spell of storage faults (one warning each)
        self._conn: sqlite3.Connection | None = None
        self._unopened: sqlite3.Error | None = None  # storage refused to open the file
        try:
            self._conn = _open(self.path)
        except sqlite3.Error as exc:
            if not _is_storage_fault(exc):
                raise
            # A read-only or full state directory: serve anyway, count what cannot be kept.
            log.error("telemetry outbox %s cannot be opened (%s); telemetry is counted as "
                      "dropped until the agent restarts with writable storage", self.path, exc)
            self._unopened, self._storage_fault = exc, True

    # -- writing --

    def append(self, kind: str, payload: bytes, now: float) -> int | None:
        """Store one record durably and return its seq (it always fits; older ones may drop);
        None when storage refused the write (the record is counted as lost)."""
        (seq,) = self.append_many([(kind, payload)], now)
        return seq

    def append_many(self, items: Iterable[tuple[str, bytes]], now: float) -> list[int | None]:
        """Store a batch in one transaction; return each seq, or None for a record that later
        records of the same batch pushed out (the batch alone exceeded a bound).

        The whole batch is validated first: one bad item refuses the batch and changes nothing.
        """
        batch = [self._checked(kind, payload) for kind, payload in items]
        if not math.isfinite(now):
            raise InvalidInputError(f"expected a finite unix time for 'now', got {now!r}")
        if not batch:
            return []
        seqs: list[int | None] = []
        with self._unless_storage_fails("append", lost=batch) as outcome:
            seqs = self._insert(batch, now)
        if not outcome.ok:
            return [None] * len(batch)
        return seqs

    def _insert(self, batch: list[tuple[str, bytes]], now: float) -> list[int | None]:
        """Insert in one transaction (dropping the oldest records for room, sealing the tail);
        return the seqs, None for those of the batch that later ones pushed out."""
        kinds = [kind for kind, _ in batch]
        payloads = [payload for _, payload in batch]
        sizes = list(map(len, payloads))
        with self._transaction("IMMEDIATE") as conn:
            next_seq, depth, depth_bytes = conn.execute(
                "SELECT next_seq, depth, depth_bytes FROM outbox_meta").fetchone()
            excess_records = depth + len(batch) - self.max_records
            excess_bytes = depth_bytes + sum(sizes) - self.max_bytes
            skip = 0  # of the batch's own records, pushed out by its later ones
            if excess_records > 0 or excess_bytes > 0:
                skip = self._drop_oldest(conn, excess_records, excess_bytes, kinds, sizes)
            seqs = list(range(next_seq, next_seq + len(batch)))
            self._store(conn, seqs[skip:], kinds[skip:], payloads[skip:], sizes[skip:], now)
        out: list[int | None] = [None] * skip
        return out + seqs[skip:]

    def _store(self, conn: sqlite3.Connection, seqs: list[int], kinds: list[str],
               payloads: list[bytes], sizes: list[int], now: float) -> None:
        """Write new records (seqs from ``next_seq`` on, or past it when the first ones were
        pushed out) and seal the tail: full batches of new records go straight into
        ``outbox_batches``, a batch that takes tail records is moved from the tail."""
        tail_n, tail_bytes = conn.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox").fetchone()
        if tail_n + len(seqs) < self.batch_records and \
                tail_bytes + sum(sizes) < self.batch_bytes:
            self._insert_rows(conn, seqs, kinds, payloads, now)
            return
        tail = conn.execute("SELECT seq, kind, length(payload) FROM outbox ORDER BY seq"
                            ).fetchall() if tail_n else []
        t = len(tail)
        ends = _seal_points([row[1] for row in tail] + kinds, [row[2] for row in tail] + sizes,
                            self.batch_records, self.batch_bytes)
        start = stored = 0  # stored: how many of the new records are written so far
        for end in ends:
            if start < t:  # holds tail records: its new ones become rows, then all move
                if end > t:
                    self._insert_rows(conn, seqs[:end - t], kinds[:end - t],
                                      payloads[:end - t], now)
                    stored = end - t
                first, last = tail[start][0], tail[end - 1][0] if end <= t else seqs[end - t - 1]
                rows = conn.execute(
                    "SELECT seq, kind, created_at, payload FROM outbox WHERE seq BETWEEN ? AND ?"
                    " ORDER BY seq", (first, last)).fetchall()
                _insert_batch(conn, rows[0][0], rows[-1][0], len(rows),
                              sum(len(row[3]) for row in rows), rows[0][2], encode_records(rows))
                conn.execute("DELETE FROM outbox WHERE seq BETWEEN ? AND ?", (first, last))
            else:  # new records only: sealed as they come
                i, j = start - t, end - t
                _insert_batch(conn, seqs[i], seqs[j - 1], j - i, sum(sizes[i:j]), now,
                              encode_columns(seqs[i:j], [now] * (j - i), kinds[i:j],
                                             payloads[i:j]))
                stored = j
            start = end
        self._insert_rows(conn, seqs[stored:], kinds[stored:], payloads[stored:], now)

    @staticmethod
    def _insert_rows(conn: sqlite3.Connection, seqs: list[int], kinds: list[str],
                     payloads: list[bytes], now: float) -> None:
        conn.executemany("INSERT INTO outbox (seq, kind, created_at, payload) VALUES (?, ?, ?, ?)",
                         zip(seqs, kinds, [now] * len(seqs), payloads, strict=True))

    def ack(self, seqs: Iterable[int]) -> int:
        """Delete exactly these acknowledged records; return how many existed.

        A sealed batch all of whose seqs are acknowledged is deleted without reading its body
        (the common case: the sender acknowledges the batches it sent); one acknowledged in
        part is rewritten without them.

        Deletes commit without waiting for the disk (``synchronous=NORMAL`` for their
        transaction; appends keep ``FULL``): a delete lost to a power cut only sends those
        records again, and the control plane stores each (device, seq) once. WAL keeps the
        order: the next append's sync writes the delete too."""
        # One range per run of consecutive seqs (a batch's, usually one run): exactly the
        # same records as one delete per seq.
        return self.ack_runs(_runs(sorted(set(seqs))))

    def ack_runs(self, runs: Sequence[tuple[int, int]]) -> int:
        """``ack`` of every seq from ``first`` to ``last`` of each (first, last) run (what a
        sender whose batches were acknowledged whole knows without listing their seqs)."""
        runs = _merged(runs)
        if not runs:
            return 0
        deleted = 0
        with self._unless_storage_fails("acknowledge") as outcome, \
                self._transaction("IMMEDIATE", sync=False) as conn:
            count, size = self._ack_batches(conn, runs)
            (tail_first,) = conn.execute("SELECT min(seq) FROM outbox").fetchone()
            if tail_first is not None:
                n, b = _delete(conn, "seq BETWEEN ? AND ?",
                               [run for run in runs if run[1] >= tail_first])
                count, size = count + n, size + b
            _forget(conn, count, size)
            deleted = count
        if outcome.ok:
            self._note_freed(deleted)
        return deleted if outcome.ok else 0

    def _ack_batches(self, conn: sqlite3.Connection,
                     runs: list[tuple[int, int]]) -> tuple[int, int]:
        """Delete the acknowledged records of sealed batches; return (records, bytes)."""
        count = size = 0
        partial: dict[int, tuple[int, int]] = {}  # first_seq -> (first, last) of the batch
        for a, b in runs:
            contained = False
            for first, last, n, nbytes in conn.execute(
                    "SELECT first_seq, last_seq, records, payload_bytes FROM outbox_batches"
                    " WHERE first_seq BETWEEN coalesce((SELECT max(first_seq) FROM"
                    " outbox_batches WHERE first_seq <= ?), ?) AND ?", (a, a, b)).fetchall():
                if last < a:
                    continue
                if a <= first and last <= b:  # every seq of the batch is acknowledged
                    count, size, contained = count + n, size + nbytes, True
                    partial.pop(first, None)
                else:
                    partial[first] = (first, last)
            if contained:
                conn.execute("DELETE FROM outbox_batches WHERE first_seq BETWEEN ? AND ?"
                             " AND last_seq <= ?", (a, b, b))
        if partial:
            def kept(seq: int) -> bool:  # not acknowledged: a run ends at or after it
                i = bisect.bisect_left(ends, seq)
                return i == len(runs) or runs[i][0] > seq

            ends = [b for _, b in runs]
            for first in sorted(partial):
                n, b = self._shrink(conn, first, kept)
                count, size = count + n, size + b
        return count, size

    def ack_through(self, seq: int) -> int:
        """Delete every pending record with a seq <= ``seq``; return how many."""
        deleted = 0
        with self._unless_storage_fails("acknowledge") as outcome, \
                self._transaction("IMMEDIATE", sync=False) as conn:
            count, size = conn.execute(
                "SELECT coalesce(sum(records), 0), coalesce(sum(payload_bytes), 0)"
                " FROM outbox_batches WHERE first_seq <= ? AND last_seq <= ?",
                (seq, seq)).fetchone()
            if count:
                conn.execute("DELETE FROM outbox_batches WHERE first_seq <= ? AND last_seq <= ?",
                             (seq, seq))
            inside = conn.execute("SELECT first_seq FROM outbox_batches WHERE first_seq <= ?"
                                  " AND last_seq > ?", (seq, seq)).fetchone()
            if inside is not None:
                n, b = self._shrink(conn, inside[0], lambda s: s > seq)
                count, size = count + n, size + b
            n, b = _delete(conn, "seq <= ?", [(seq,)])
            _forget(conn, count + n, size + b)
            deleted = count + n
        if outcome.ok:
            self._note_freed(deleted)
        return deleted if outcome.ok else 0

    def discard_corrupt(self, first_seq: int) -> int:
        """Delete the sealed batch starting at ``first_seq`` if it is corrupt (see
        ``CorruptBatchError``), counting its records as dropped (kind ``CORRUPT_KIND``);
        return how many. A batch that reads correctly is left alone (0)."""
        discarded = 0
        with self._unless_storage_fails("discard a corrupt batch") as outcome, \
                self._transaction("IMMEDIATE") as conn:
            row = conn.execute("SELECT first_seq, last_seq, records, payload_bytes, body"
                               " FROM outbox_batches WHERE first_seq = ?",
                               (first_seq,)).fetchone()
            if row is not None:
                try:
                    self._columns(row)
                except CorruptBatchError as exc:
                    discarded = self._discard(conn, row, exc)
        return discarded if outcome.ok else 0

    # -- reading --

    def pending(self, limit: int = 500, max_bytes: int = 1024 * 1024, *,
                after: int = 0) -> list[OutboxRecord]:
        """The oldest records first (of those with a seq above ``after``: the ones not already
        in flight), sealed or not: at most ``limit``, and no more than ``max_bytes`` of
        payload, except that the oldest record is always returned (else a big one would block
        the queue). A corrupt sealed batch on the way raises ``CorruptBatchError``."""
        if limit < 1 or self._unopened is not None:
            return []
        out: list[_Record] = []
        with self._transaction("DEFERRED") as conn:
            cursor = conn.execute("SELECT first_seq, last_seq, records, payload_bytes, body"
                                  " FROM outbox_batches WHERE last_seq > ?"
                                  " ORDER BY first_seq", (after,))
            try:
                for row in cursor:
                    out += [r for r in records_of(self._columns(row)) if r[0] > after]
                    if len(out) >= limit:
                        break
            finally:
                cursor.close()
            if len(out) < limit:
                out += conn.execute(
                    "SELECT seq, kind, created_at, payload FROM outbox WHERE seq > ?"
                    " ORDER BY seq LIMIT ?", (after, limit - len(out))).fetchall()
        out = out[:limit]
        out = out[:_fitting([len(r[3]) for r in out], max_bytes)]
        return [OutboxRecord._make(r) for r in out]

    def next_batch(self, limit: int = 500, max_bytes: int = 1024 * 1024, *,
                   after: int = 0) -> tuple[list[int], bytes]:
        """The next batch to send: its seqs and its ``TelemetryColumns`` encoding (the body of
        ``TelemetryBatch.columns``; ``wire.frame_batch`` makes the whole message).

        The oldest records above ``after``, at most ``limit`` and ``max_bytes`` of payload (the
        oldest record always goes), never more than one sealed batch: the oldest sealed batch
        above ``after`` exactly as stored when it fits (one row read; its seqs and sizes are
        checked against its row, not re-encoded), else the part of it that fits, re-encoded,
        else the tail's oldest rows, encoded. ([], b"") when nothing is pending. A corrupt
        sealed batch raises ``CorruptBatchError`` (``discard_corrupt`` it and read again)."""
        if limit < 1 or self._unopened is not None:
            return [], b""
        records: list[_Record]
        with self._statement() as conn:  # one statement: no transaction around it
            row = conn.execute("SELECT first_seq, last_seq, records, payload_bytes, body"
                               " FROM outbox_batches WHERE last_seq > ?"
                               " ORDER BY first_seq LIMIT 1", (after,)).fetchone()
            if row is None:  # the lock is held: nothing was sealed in between
                records = conn.execute(
                    "SELECT seq, kind, created_at, payload FROM outbox WHERE seq > ?"
                    " ORDER BY seq LIMIT ?", (after, limit)).fetchall()
        if row is not None:
            first, last, n, nbytes, body = row
            cols = self._columns(row)
            if first > after and n <= limit and (nbytes <= max_bytes or n == 1):
                seqs = list(range(first, last + 1)) if n == last - first + 1 \
                    else cols.seqs.tolist()
                return seqs, body
            records = [r for r in records_of(cols) if r[0] > after][:limit]
        records = records[:_fitting([len(r[3]) for r in records], max_bytes)]
        return [r[0] for r in records], encode_records(records)

    def counters(self) -> OutboxCounters:
        """``stats().dropped`` and ``stats().depth`` in one read (what each sent batch
        carries)."""
        if self._unopened is not None:
            return OutboxCounters(sum(self._unwritable.values()), 0)
        with self._statement() as conn:
            depth, dropped = conn.execute(
                "SELECT depth, (SELECT COALESCE(SUM(count), 0) FROM outbox_dropped)"
                " FROM outbox_meta").fetchone()
        return OutboxCounters(dropped + sum(self._unwritable.values()), depth)

    def stats(self) -> OutboxStats:
        if self._unopened is not None:
            lost = dict(sorted(self._unwritable.items()))
            return OutboxStats(0, 0, sum(lost.values()), lost, 0, None, sum(lost.values()))
        with self._transaction("DEFERRED") as conn:
            next_seq, depth, depth_bytes = conn.execute(
                "SELECT next_seq, depth, depth_bytes FROM outbox_meta"
            ).fetchone()
            by_kind = {
                kind: count
                for kind, count in conn.execute(
                    "SELECT kind, count FROM outbox_dropped ORDER BY kind"
                )
            }
            oldest = conn.execute("SELECT first_created_at FROM outbox_batches"
                                  " ORDER BY first_seq LIMIT 1").fetchone() \
                or conn.execute("SELECT created_at FROM outbox ORDER BY seq LIMIT 1").fetchone()
        for kind, count in self._unwritable.items():
            by_kind[kind] = by_kind.get(kind, 0) + count
        return OutboxStats(
            depth=depth,
            depth_bytes=depth_bytes,
            dropped=sum(by_kind.values()),
            dropped_by_kind=dict(sorted(by_kind.items())),
            next_seq=next_seq,
            oldest_created_at=None if oldest is None else oldest[0],
            unwritable=sum(self._unwritable.values()),
        )

    # -- lifecycle --

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --

    def _checked(self, kind: str, payload: bytes) -> tuple[str, bytes]:
        if not isinstance(kind, str) or not 0 < len(kind) <= _MAX_KIND_CHARS:
            raise InvalidInputError(
                f"expected a record kind of 1 to {_MAX_KIND_CHARS} characters, got {kind!r}"
            )
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise InvalidInputError(
                f"expected a bytes payload, got {type(payload).__name__} (serialize it first)"
            )
        if len(payload) > self.max_payload_bytes:
            raise InvalidInputError(
                f"telemetry payload of kind {kind!r} is {len(payload)} bytes; "
                f"the limit is {self.max_payload_bytes}"
            )
        return kind, bytes(payload)

    def _columns(self, row: _Row) -> Columns:
        """A sealed batch's body decoded and checked against its row (seqs strictly
        increasing from ``first_seq`` to ``last_seq``, ``records`` of them, ``payload_bytes``
        of payload); ``CorruptBatchError`` otherwise."""
        first, last, n, nbytes, body = row
        try:
            cols = decode_columns(body)
        except InvalidInputError as exc:
            raise CorruptBatchError(self.path, first, last, n, str(exc)) from exc
        seqs = cols.seqs
        if len(seqs) != n or not n:
            why = f"its body holds {len(seqs)} records"
        elif n == last - first + 1:
            why = "" if _is_run(seqs, first) else "its seqs are not its range"
        elif seqs[0] != first or seqs[-1] != last or not all(map(operator.lt, seqs,
                                                                  seqs[1:])):
            why = "its seqs are not its range, in order"
        else:
            why = ""
        if not why and len(cols.payloads) != nbytes:
            why = f"its body holds {len(cols.payloads)} payload bytes"
        if why:
            raise CorruptBatchError(self.path, first, last, n, why)
        return cols

    def _shrink(self, conn: sqlite3.Connection, first_seq: int,
                keep: Callable[[int], bool]) -> tuple[int, int]:
        """Rewrite the sealed batch at ``first_seq`` with only the records whose seq ``keep``
        accepts (deleting it when none is left); return the (records, bytes) removed, for the
        caller to take off the counters. A corrupt batch is discarded whole (``_discard``:
        counted as dropped, off the counters already; (0, 0) then)."""
        row = conn.execute("SELECT first_seq, last_seq, records, payload_bytes, body"
                           " FROM outbox_batches WHERE first_seq = ?", (first_seq,)).fetchone()
        try:
            records = records_of(self._columns(row))
        except CorruptBatchError as exc:  # all its records are counted as dropped instead
            self._discard(conn, row, exc)
            return 0, 0
        kept = [r for r in records if keep(r[0])]
        if len(kept) == len(records):  # the seqs fell in a gap of the batch
            return 0, 0
        _rewrite(conn, first_seq, kept)
        return len(records) - len(kept), row[3] - sum(len(r[3]) for r in kept)

    def _discard(self, conn: sqlite3.Connection, row: _Row, exc: CorruptBatchError) -> int:
        """Delete a corrupt sealed batch, off the counters, counting its records as dropped
        (``CORRUPT_KIND``): what it held cannot be told, acknowledged or not."""
        first, _, n, nbytes, _ = row
        conn.execute("DELETE FROM outbox_batches WHERE first_seq = ?", (first,))
        _forget(conn, n, nbytes)
        _count_dropped(conn, Counter({CORRUPT_KIND: n}))
        log.error("%s; discarded, its %d records counted as dropped", exc, n)
        return n

    def _drop_oldest(self, conn: sqlite3.Connection, excess_records: int, excess_bytes: int,
                     new_kinds: list[str], new_sizes: list[int]) -> int:
        """Drop the oldest records until both excesses are gone (sealed batches first, then
        the tail, then the oldest of the records being appended); count them; return how many
        of the new records were dropped."""
        victims: Counter[str] = Counter()
        excess_records, excess_bytes, count, size = self._drop_sealed(
            conn, excess_records, excess_bytes, victims)
        if excess_records > 0 or excess_bytes > 0:  # every batch is gone: the tail's turn
            last_seq = 0
            cursor = conn.execute("SELECT seq, kind, length(payload) FROM outbox ORDER BY seq")
            try:
                for seq, kind, nbytes in cursor:
                    if excess_records <= 0 and excess_bytes <= 0:
                        break
                    victims[kind] += 1
                    last_seq = seq
                    excess_records, excess_bytes = excess_records - 1, excess_bytes - nbytes
            finally:
                cursor.close()
            n, b = _delete(conn, "seq <= ?", [(last_seq,)])
            count, size = count + n, size + b
        _forget(conn, count, size)
        skip = 0  # everything stored is gone: the oldest of the new records go
        if excess_records > 0 or excess_bytes > 0:
            skip = _prefix_to_drop(excess_records, excess_bytes, new_sizes)
            victims.update(new_kinds[:skip])
        _count_dropped(conn, victims)
        # One warning per full spell (until an ack frees space), so an outage does not flood
        # the log; the persisted counters carry the totals.
        level = logging.DEBUG if self._warned_full else logging.WARNING
        self._warned_full = True
        log.log(
            level,
            "telemetry outbox %s full: dropped the %d oldest records (%s)",
            self.path,
            sum(victims.values()),
            ", ".join(f"{k}={n}" for k, n in sorted(victims.items())),
        )
        return skip

    def _drop_sealed(self, conn: sqlite3.Connection, excess_records: int, excess_bytes: int,
                     victims: Counter[str]) -> tuple[int, int, int, int]:
        """``_drop_oldest`` among the sealed batches: whole batches (their kinds counted from
        the kind column, at C speed), then the oldest records of one, rewritten without them.
        Return the excesses left and the (records, bytes) to take off the counters."""
        count = size = 0
        whole_through = 0  # the last first_seq of the batches dropped whole
        cut: tuple[int, list[_Record]] | None = None  # a batch that keeps its newest records
        cursor = conn.execute("SELECT first_seq, last_seq, records, payload_bytes"
                              " FROM outbox_batches ORDER BY first_seq")
        try:
            for first, last, n, nbytes in cursor:
                if excess_records <= 0 and excess_bytes <= 0:
                    break
                body = conn.execute("SELECT body FROM outbox_batches WHERE first_seq = ?",
                                    (first,)).fetchone()[0]
                try:
                    cols = self._columns((first, last, n, nbytes, body))
                except CorruptBatchError as exc:  # unreadable: gone whole, counted as such
                    log.error("%s; dropped", exc)
                    victims[CORRUPT_KIND] += n
                else:
                    if excess_records < n and excess_bytes <= nbytes:  # it keeps some
                        records = records_of(cols)
                        k = _prefix_to_drop(excess_records, excess_bytes,
                                            [len(r[3]) for r in records])
                        victims.update(r[1] for r in records[:k])
                        freed = sum(len(r[3]) for r in records[:k])
                        excess_records, excess_bytes = excess_records - k, excess_bytes - freed
                        count, size = count + k, size + freed
                        cut = (first, records[k:])
                        break
                    victims.update({cols.kinds[i]: c
                                    for i, c in Counter(cols.kind_index).items()})
                whole_through = first
                excess_records, excess_bytes = excess_records - n, excess_bytes - nbytes
                count, size = count + n, size + nbytes
        finally:
            cursor.close()
        if whole_through:
            conn.execute("DELETE FROM outbox_batches WHERE first_seq <= ?", (whole_through,))
        if cut is not None:
            _rewrite(conn, *cut)
        return excess_records, excess_bytes, count, size

    def _note_freed(self, deleted: int) -> None:
        if deleted:
            self._warned_full = False

    @contextmanager
    def _unless_storage_fails(
        self, what: str, lost: Sequence[tuple[str, bytes]] = ()
    ) -> Iterator[_Outcome]:
        """Run a write; a storage fault is logged (once a spell), counts ``lost`` records, and
        does not propagate: the yielded outcome's ``ok`` is False then."""
        outcome = _Outcome()
        try:
            yield outcome
        except sqlite3.Error as exc:
            if not _is_storage_fault(exc):
                raise
            outcome.ok = False
            for kind, _ in lost:
                self._unwritable[kind] += 1
            if not self._storage_fault:
                log.error("telemetry outbox %s cannot %s: %s; serving goes on, records that "
                          "cannot be stored are counted as dropped", self.path, what, exc)
            self._storage_fault = True
            return
        self._storage_fault = False

    @contextmanager
    def _statement(self) -> Iterator[sqlite3.Connection]:
        """The connection for reads of one statement each (a statement is atomic by itself)
        under the lock, without a transaction's BEGIN and COMMIT: the sender reads a batch and
        the counters for each one it sends. Only this object's connection writes the file,
        under the same lock, so consecutive reads see no write between them."""
        with self._lock:
            yield self._open_conn()

    def _open_conn(self) -> sqlite3.Connection:
        """The connection (under the lock); why there is none raises."""
        if self._unopened is not None:
            raise self._unopened
        if self._conn is None:
            raise RuntimeError(f"outbox {self.path} is closed")
        return self._conn

    @contextmanager
    def _transaction(self, mode: str, *, sync: bool = True) -> Iterator[sqlite3.Connection]:
        """``sync=False``: the commit does not wait for the disk (only for what may be lost
        on a power cut: an acknowledged record's delete)."""
        with self._lock:
            conn = self._open_conn()
            if not sync:
                conn.execute("PRAGMA synchronous = NORMAL")
            try:
                conn.execute(f"BEGIN {mode}")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            finally:
                if not sync:
                    conn.execute("PRAGMA synchronous = FULL")


def _fitting(sizes: list[int], max_bytes: int) -> int:
    """How many of the oldest records fit in ``max_bytes`` (at least one: a big record must
    not block the queue)."""
    if sum(sizes) <= max_bytes:
        return len(sizes)
    total = 0
    for n, size in enumerate(sizes):
        total += size
        if n and total > max_bytes:
            return n
    return len(sizes)


def _is_run(seqs: array[int], first: int) -> bool:
    """Whether ``seqs`` is ``first, first + 1, ...``: the column read as one little-endian
    integer (C speed) against ``first * sum(2^64i) + sum(i * 2^64i)``, exact since no entry
    overflows its 64 bits; a third of comparing with an array built from a range."""
    if sys.byteorder != "little":  # the array holds native (big-endian) entries
        return seqs == array("Q", range(first, first + len(seqs)))
    ones, steps = _run_terms(len(seqs))
    return int.from_bytes(seqs, "little") == first * ones + steps


@functools.lru_cache(maxsize=8)
def _run_terms(n: int) -> tuple[int, int]:
    ones = int.from_bytes(array("Q", [1] * n), "little")
    steps = int.from_bytes(array("Q", range(n)), "little")
    return ones, steps


def _prefix_to_drop(excess_records: int, excess_bytes: int, sizes: list[int]) -> int:
    """How many of the oldest of these records must go for both excesses to be gone (all of
    them when that is not enough)."""
    for k, size in enumerate(sizes):
        if excess_records <= 0 and excess_bytes <= 0:
            return k
        excess_records, excess_bytes = excess_records - 1, excess_bytes - size
    return len(sizes)


def _seal_points(kinds: list[str], sizes: list[int], batch_records: int,
                 batch_bytes: int) -> list[int]:
    """Where batches end (exclusive indexes) when the oldest of these records are sealed
    while what is left holds ``batch_records`` records or ``batch_bytes`` of payload: each
    at most ``batch_records`` records, ``batch_bytes`` of payload (or one record) and
    ``MAX_KINDS`` kinds."""
    ends: list[int] = []
    n, left, i = len(sizes), sum(sizes), 0
    while i < n and (n - i >= batch_records or left >= batch_bytes):
        j = min(i + batch_records, n)
        if sum(sizes[i:j]) <= batch_bytes and len(set(kinds[i:j])) <= MAX_KINDS:
            pass  # the usual case, checked at C speed: a whole batch of records
        else:
            j, total, seen = i, 0, set[str]()
            while j < n and j - i < batch_records:
                if j > i and total + sizes[j] > batch_bytes:
                    break
                if kinds[j] not in seen:
                    if len(seen) == MAX_KINDS:
                        break
                    seen.add(kinds[j])
                total += sizes[j]
                j += 1
        ends.append(j)
        left -= sum(sizes[i:j])
        i = j
    return ends


def _insert_batch(conn: sqlite3.Connection, first: int, last: int, records: int,
                  payload_bytes: int, first_created_at: float, body: bytes) -> None:
    conn.execute("INSERT INTO outbox_batches (first_seq, last_seq, records, payload_bytes,"
                 " first_created_at, body) VALUES (?, ?, ?, ?, ?, ?)",
                 (first, last, records, payload_bytes, first_created_at, body))


def _rewrite(conn: sqlite3.Connection, first_seq: int, kept: Sequence[_Record]) -> None:
    """Store the sealed batch at ``first_seq`` as only ``kept`` (a subset of its records, in
    order), or delete it when that is empty. The counters are the caller's."""
    if not kept:
        conn.execute("DELETE FROM outbox_batches WHERE first_seq = ?", (first_seq,))
        return
    conn.execute("UPDATE outbox_batches SET first_seq = ?, last_seq = ?, records = ?,"
                 " payload_bytes = ?, first_created_at = ?, body = ? WHERE first_seq = ?",
                 (kept[0][0], kept[-1][0], len(kept), sum(len(r[3]) for r in kept),
                  kept[0][2], encode_records(kept), first_seq))


def _delete(conn: sqlite3.Connection, where: str,
            params: Sequence[tuple[int, ...]]) -> tuple[int, int]:
    """Delete the tail rows matching ``where`` for each of ``params``, in the caller's
    transaction; return how many and their payload bytes (for ``_forget``)."""
    count = size = 0
    for args in params:
        # ``where`` is one of this module's constants; the values are bound.
        n, b = conn.execute(
            f"SELECT count(*), COALESCE(SUM(length(payload)), 0) FROM outbox WHERE {where}",  # noqa: S608
            args).fetchone()
        if n:
            conn.execute(f"DELETE FROM outbox WHERE {where}", args)  # noqa: S608
            count, size = count + n, size + b
    return count, size


def _forget(conn: sqlite3.Connection, count: int, size: int) -> None:
    """Take deleted records off the depth counters (one update per operation)."""
    if count:
        conn.execute("UPDATE outbox_meta SET depth = depth - ?, depth_bytes = depth_bytes - ?",
                     (count, size))


def _count_dropped(conn: sqlite3.Connection, victims: Counter[str]) -> None:
    conn.executemany(
        "INSERT INTO outbox_dropped (kind, count) VALUES (?, ?) "
        "ON CONFLICT (kind) DO UPDATE SET count = count + excluded.count",
        sorted(victims.items()),
    )


def _merged(runs: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """(first, last) runs sorted, those that overlap or touch joined, empty ones left out."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(r for r in runs if r[0] <= r[1]):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(b, out[-1][1]))
        else:
            out.append((a, b))
    return out


def _runs(seqs: list[int]) -> list[tuple[int, int]]:
    """Sorted unique seqs as (first, last) runs of consecutive integers. ``seqs[j] - j`` is
    the same along a run and grows after it, so each run's end is a binary search: a few
    steps per run, not a step per seq (an acknowledgement is a batch or a few)."""
    runs: list[tuple[int, int]] = []
    i, n = 0, len(seqs)
    while i < n:
        base, lo, hi = seqs[i] - i, i, n - 1  # the run ends at the last j with seqs[j]-j == base
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if seqs[mid] - mid == base:
                lo = mid
            else:
                hi = mid - 1
        runs.append((seqs[i], seqs[lo]))
        i = lo + 1
    return runs


def _open(path: Path) -> sqlite3.Connection:
    """Open (creating if absent) and migrate the outbox; refuse a file that is not one."""
    conn: sqlite3.Connection | None = None
    try:
        conn = connect(path)
        conn.row_factory = None  # plain tuples: a batch's rows are read by the hundred
        conn.execute("PRAGMA secure_delete = FAST")
        (app_id,) = conn.execute("PRAGMA application_id").fetchone()
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        (tables,) = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        if (version == 0 and tables) or (version > 0 and app_id != _APPLICATION_ID):
            raise InvalidInputError(
                f"{path} is an SQLite database but not a telemetry outbox (application_id "
                f"{app_id:#x}, expected {_APPLICATION_ID:#x}); refusing to touch it"
            )
        migrate(conn, _MIGRATIONS)
    except sqlite3.OperationalError:  # locked, unreadable directory...: not the file's fault
        if conn is not None:
            conn.close()
        raise
    except sqlite3.DatabaseError as exc:
        if conn is not None:
            conn.close()
        raise InvalidInputError(
            f"the telemetry outbox {path} is not a readable SQLite database ({exc}); it is "
            "left as it is, not recreated, so its records are not lost: move it aside to start "
            "a new outbox"
        ) from exc
    except BaseException:
        if conn is not None:
            conn.close()
        raise
    return conn


@dataclass
class _Outcome:
    ok: bool = True


# SQLite's primary result codes for a storage fault: read-only, I/O error, full, cannot open.
_STORAGE_FAULTS = {8, 10, 13, 14}


def _is_storage_fault(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _STORAGE_FAULTS
