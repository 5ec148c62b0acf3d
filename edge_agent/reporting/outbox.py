"""The agent's telemetry outbox: a bounded SQLite queue that loses nothing silently.

Rules:

* Every record gets a per-device sequence number (``seq``) that strictly increases and is never
  reused: the next one is kept in the file, so it survives restarts, also after every record was
  acknowledged and deleted. The control plane deduplicates on (device, seq).
* ``append`` is durable when it returns: one transaction on a WAL database with
  ``synchronous=FULL`` (``fleetcore.sqlite.connect``). ``append_many`` writes a batch in one.
* A record is deleted only when the receiver has acknowledged it (``ack`` for exactly the given
  seqs, ``ack_through`` for every seq up to one); unknown seqs are ignored.
* Bound policy: the outbox holds at most ``max_records`` records and ``max_bytes`` of payload.
  When a new record would exceed either bound, the OLDEST pending records (of any kind) are
  dropped until it fits; each drop is counted by kind in the file (``stats().dropped``,
  ``dropped_by_kind``) and logged. A dropped record may already have been delivered but not
  yet acknowledged; it is counted all the same. Bounds are enforced when appending, so reopening
  with smaller bounds trims on the next append. Since ``max_payload_bytes <= max_bytes`` is
  required, a new record always fits once enough older ones are gone.
* A payload over ``max_payload_bytes`` is refused with ``InvalidInputError`` and changes
  nothing; it is not a drop.
* A file that is not an outbox (not SQLite, or another SQLite database) is refused with
  ``InvalidInputError`` and left untouched: recreating it would lose the telemetry in it.
* Storage faults (a full disk, a read-only or failing file system) never escape to the caller:
  serving and the heartbeat go on. A record that cannot be written is lost and counted in
  memory (``stats().unwritable``, also in ``dropped``); an acknowledgement that cannot be
  written leaves the records pending (sent again later; the control plane deduplicates). One
  warning per spell, until a write succeeds again.

One ``Outbox`` owns one connection behind a lock, so serving threads may append while the
sender reads and acknowledges. Depth and byte counters are kept in the same file, in the same
transaction as the change: by a trigger on insert, and by ``_delete`` (the one place records
are deleted) with one update per statement (a per-row delete trigger cost ~1 us a record,
about a quarter of the agent's CPU when it sent a backlog).
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from edge_agent.reporting.wire import record_head
from fleetcore.errors import InvalidInputError
from fleetcore.sqlite import connect, migrate

__all__ = ["Outbox", "OutboxRecord", "OutboxStats"]

log = logging.getLogger(__name__)

# PRAGMA application_id marks the file as an outbox ("EFOB"), so another database is never
# mistaken for one.
_APPLICATION_ID = 0x45464F42
_MAX_KIND_CHARS = 64

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
    # 3: each record's protobuf framing (edge_agent/reporting/wire.py), so that a batch is read
    # as `head || payload` of each row; NULL for rows appended before (framed when read)
    """
    ALTER TABLE outbox ADD COLUMN head BLOB;
    """,
]


class OutboxRecord(NamedTuple):  # a tuple: cheap to build, a batch reads hundreds
    seq: int  # per device, strictly increasing, never reused
    kind: str  # e.g. "drift", "arm_stats", "install", "error", "sample"
    created_at: float  # unix seconds
    payload: bytes  # opaque; the caller serializes


@dataclass(frozen=True)
class OutboxStats:
    depth: int  # records waiting
    depth_bytes: int  # payload bytes waiting
    dropped: int  # records dropped: the outbox was full (persisted) or the disk was (in memory)
    dropped_by_kind: dict[str, int]
    next_seq: int
    oldest_created_at: float | None  # unix seconds; None when empty
    unwritable: int = 0  # records lost since start because storage refused the write


class Outbox:
    """A durable, bounded, thread-safe telemetry queue in one SQLite file."""

    def __init__(
        self,
        path: Path,
        *,
        max_records: int = 100_000,
        max_bytes: int = 64 * 1024 * 1024,
        max_payload_bytes: int = 256 * 1024,
    ) -> None:
        if max_records < 1 or max_payload_bytes < 0 or max_payload_bytes > max_bytes:
            raise InvalidInputError(
                "outbox bounds must satisfy max_records >= 1 and "
                f"0 <= max_payload_bytes <= max_bytes; got max_records={max_records}, "
                f"max_payload_bytes={max_payload_bytes}, max_bytes={max_bytes}"
            )
        self.path = Path(path)
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.max_payload_bytes = max_payload_bytes
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
        seqs: list[int] = []
        dropped_through = 0
        with self._unless_storage_fails("append", lost=batch) as outcome:
            seqs, dropped_through = self._insert(batch, now)
        if not outcome.ok:
            return [None] * len(batch)
        return [seq if seq > dropped_through else None for seq in seqs]

    def _insert(self, batch: list[tuple[str, bytes]], now: float) -> tuple[list[int], int]:
        """Insert in one transaction; return the seqs and the highest seq dropped for room."""
        seqs: list[int] = []
        dropped_through = 0
        with self._transaction("IMMEDIATE") as conn:
            for kind, payload in batch:
                next_seq, depth, depth_bytes = conn.execute(
                    "SELECT next_seq, depth, depth_bytes FROM outbox_meta"
                ).fetchone()
                excess_records = depth + 1 - self.max_records
                excess_bytes = depth_bytes + len(payload) - self.max_bytes
                if excess_records > 0 or excess_bytes > 0:
                    dropped_through = self._drop_oldest(conn, excess_records, excess_bytes)
                conn.execute(
                    "INSERT INTO outbox (seq, kind, created_at, payload, head)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (next_seq, kind, now, payload,
                     record_head(next_seq, kind, now, len(payload))),
                )
                seqs.append(next_seq)
        return seqs, dropped_through

    def ack(self, seqs: Iterable[int]) -> int:
        """Delete exactly these acknowledged records; return how many existed.

        Deletes commit without waiting for the disk (``synchronous=NORMAL`` for their
        transaction; appends keep ``FULL``): a delete lost to a power cut only sends those
        records again, and the control plane stores each (device, seq) once. WAL keeps the
        order: the next append's sync writes the delete too."""
        unique = sorted(set(seqs))
        if not unique:
            return 0
        deleted = 0
        with self._unless_storage_fails("acknowledge") as outcome, \
                self._transaction("IMMEDIATE", sync=False) as conn:
            # One range delete per run of consecutive seqs (a batch's, usually one run):
            # exactly the same rows as one delete per seq.
            deleted = _delete(conn, "seq BETWEEN ? AND ?", _runs(unique))
        if outcome.ok:
            self._note_freed(deleted)
        return deleted if outcome.ok else 0

    def ack_through(self, seq: int) -> int:
        """Delete every pending record with a seq <= ``seq``; return how many."""
        deleted = 0
        with self._unless_storage_fails("acknowledge") as outcome, \
                self._transaction("IMMEDIATE", sync=False) as conn:
            deleted = _delete(conn, "seq <= ?", [(seq,)])
        if outcome.ok:
            self._note_freed(deleted)
        return deleted if outcome.ok else 0

    # -- reading --

    def pending(self, limit: int = 500, max_bytes: int = 1024 * 1024, *,
                after: int = 0) -> list[OutboxRecord]:
        """The oldest records first (of those with a seq above ``after``: the ones not already
        in flight): at most ``limit``, and no more than ``max_bytes`` of payload, except that
        the oldest record is always returned (else a big one would block the queue)."""
        if limit < 1:
            return []
        if self._unopened is not None:
            return []
        with self._transaction("DEFERRED") as conn:
            rows = conn.execute(
                "SELECT seq, kind, created_at, payload FROM outbox WHERE seq > ? ORDER BY seq"
                " LIMIT ?", (after, limit),
            ).fetchall()
        rows = rows[:_fitting([len(row[3]) for row in rows], max_bytes)]
        return [OutboxRecord._make(row) for row in rows]

    def pending_wire(self, limit: int = 500, max_bytes: int = 1024 * 1024, *,
                     after: int = 0) -> tuple[list[int], bytes]:
        """``pending``, as the seqs and the records' ``TelemetryBatch`` encoding (the
        ``records`` field of each, in order: add ``wire.batch_tail`` for a whole batch). The
        byte bound counts the encoded records."""
        if limit < 1 or self._unopened is not None:
            return [], b""
        with self._transaction("DEFERRED") as conn:
            rows = conn.execute(
                "SELECT seq, CAST(head || payload AS BLOB) FROM outbox WHERE seq > ?"
                " ORDER BY seq LIMIT ?",
                (after, limit),
            ).fetchall()
            if any(framed is None for _, framed in rows):  # appended before migration 3
                rows = self._framed(conn, rows)
        framed = [row[1] for row in rows]
        n = _fitting(list(map(len, framed)), max_bytes)
        return [row[0] for row in rows[:n]], b"".join(framed[:n])

    @staticmethod
    def _framed(conn: sqlite3.Connection,
                rows: list[tuple[int, bytes | None]]) -> list[tuple[int, bytes]]:
        missing = [seq for seq, framed in rows if framed is None]
        heads = {seq: record_head(seq, kind, at, len(payload)) + payload
                 for seq, kind, at, payload in conn.execute(
                     "SELECT seq, kind, created_at, payload FROM outbox WHERE seq BETWEEN ? AND ?"
                     " AND head IS NULL", (missing[0], missing[-1]))}
        return [(seq, framed if framed is not None else heads[seq]) for seq, framed in rows]

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
            oldest = conn.execute("SELECT created_at FROM outbox ORDER BY seq LIMIT 1").fetchone()
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

    def _drop_oldest(self, conn: sqlite3.Connection, excess_records: int, excess_bytes: int) -> int:
        """Delete the oldest records until both excesses are gone; count them; return the
        highest seq dropped."""
        victims: Counter[str] = Counter()
        last_seq = 0
        cursor = conn.execute("SELECT seq, kind, length(payload) FROM outbox ORDER BY seq")
        try:
            for seq, kind, size in cursor:
                victims[kind] += 1
                last_seq = seq
                excess_records -= 1
                excess_bytes -= size
                if excess_records <= 0 and excess_bytes <= 0:
                    break
        finally:
            cursor.close()
        _delete(conn, "seq <= ?", [(last_seq,)])
        conn.executemany(
            "INSERT INTO outbox_dropped (kind, count) VALUES (?, ?) "
            "ON CONFLICT (kind) DO UPDATE SET count = count + excluded.count",
            sorted(victims.items()),
        )
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
        return last_seq

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
    def _transaction(self, mode: str, *, sync: bool = True) -> Iterator[sqlite3.Connection]:
        """``sync=False``: the commit does not wait for the disk (only for what may be lost
        on a power cut: an acknowledged record's delete)."""
        with self._lock:
            if self._unopened is not None:
                raise self._unopened
            conn = self._conn
            if conn is None:
                raise RuntimeError(f"outbox {self.path} is closed")
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


def _delete(conn: sqlite3.Connection, where: str, params: Sequence[tuple[int, ...]]) -> int:
    """Delete the records matching ``where`` for each of ``params`` and take them off the
    depth counters, in the caller's transaction; return how many were deleted."""
    count = size = 0
    for args in params:
        # ``where`` is one of this module's constants; the values are bound.
        n, b = conn.execute(
            f"SELECT count(*), COALESCE(SUM(length(payload)), 0) FROM outbox WHERE {where}",  # noqa: S608
            args).fetchone()
        if n:
            conn.execute(f"DELETE FROM outbox WHERE {where}", args)  # noqa: S608
            count, size = count + n, size + b
    if count:
        conn.execute("UPDATE outbox_meta SET depth = depth - ?, depth_bytes = depth_bytes - ?",
                     (count, size))
    return count


def _runs(seqs: list[int]) -> list[tuple[int, int]]:
    """Sorted unique seqs as (first, last) runs of consecutive integers."""
    runs: list[tuple[int, int]] = []
    for seq in seqs:
        if runs and runs[-1][1] == seq - 1:
            runs[-1] = (runs[-1][0], seq)
        else:
            runs.append((seq, seq))
    return runs


def _open(path: Path) -> sqlite3.Connection:
    """Open (creating if absent) and migrate the outbox; refuse a file that is not one."""
    conn: sqlite3.Connection | None = None
    try:
        conn = connect(path)
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
