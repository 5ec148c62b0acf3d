"""PostgreSQL implementation of the control-plane store (psycopg 3 with a connection pool).

It shares ``SqliteStore``'s SQL: most statements are written in the dialect both databases
speak (``ON CONFLICT`` upserts, ``RETURNING``, aliased subqueries), and ``?`` placeholders are
rewritten to psycopg's ``%s`` here. The few methods whose SQL is SQLite's own (``rowid``,
``json_extract``, bare columns beside ``MAX``) are overridden below; a new method written for
SQLite runs here unchanged when its SQL is portable, and tests/test_store_contract.py runs every
storage test on both backends to show it.

Durability: every write is one transaction, committed before the method returns (the pool's
connections run in autocommit mode, so reads hold no transaction open; ``synchronous_commit`` is
forced on per connection whatever the server's default). The audit log stays one hash chain
under concurrent writers, in any number of processes: each append takes a transaction-level
advisory lock before it reads the head, so appends are serialized and a second writer sees the
first one's entry; ``seq`` as primary key would refuse a fork anyway. Migrations run under
another advisory lock, so replicas starting together apply each exactly once.

Writers are serialized as on SQLite: a write transaction first takes one advisory lock (what
SQLite's ``BEGIN IMMEDIATE`` does), so the shared methods' read-then-write steps (a token used
once, a release serial that only grows, a model version's digest) keep their meaning under
PostgreSQL's READ COMMITTED with writers in several threads or processes. Reads take no lock.
The two writes that come with the fleet's size, telemetry and heartbeats, touch and read only
their own devices' rows: they hold that lock shared (every other write still waits for them,
and they for it) and a lock per device, taken in one order, so different devices' writes run
side by side on every replica while one device's stay serialized (its telemetry's
deduplication reads what it stored before). tests/test_pg_write_locks.py watches each wait in
``pg_locks``.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from functools import lru_cache
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from control_plane.domain.records import AuditRecord, ModelVersionRecord
from control_plane.storage.pg_coordination import ChangeListener, Leadership
from control_plane.storage.pg_migrations import PRELUDE, TUNING, pg_migrations
from control_plane.storage.sqlite import (
    _SEGMENT_BODY,
    SqliteStore,
    _audit_record,
    _model_version,
    _usable_token,
)
from fleetcore.errors import EdgefleetError

__all__ = ["PostgresStore", "redact"]

# pg_advisory_xact_lock keys (any 64-bit numbers no other application on the database uses).
_MIGRATE_LOCK = 0x45_46_4D_49_47  # "EFMIG"
_AUDIT_LOCK = 0x45_46_41_55_44  # "EFAUD"
_WRITE_LOCK = 0x45_46_57_52_54  # "EFWRT"
# pg_advisory_xact_lock(int, int) keys (a key space apart from the one-bigint locks above):
# this class, and a 32-bit hash of the device id (two devices sharing one only wait more).
_DEVICE_LOCKS = 0x45_46_44_56  # "EFDV"


def _device_key(device_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(device_id.encode(), digest_size=4).digest(), "big",
                          signed=True)


class PostgresStore(SqliteStore):
    """``postgresql://USER[:PASSWORD]@HOST:PORT/DB[?options]`` (libpq's URL)."""

    _integrity_errors = (psycopg.IntegrityError,)
    writes_off_loop = True

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 8,
                 connect_timeout_s: float = 10.0) -> None:
        self.url = url
        try:  # one direct connection first: its error says what is wrong (the pool's retries
            # would only time out)
            psycopg.connect(url, connect_timeout=max(1, int(connect_timeout_s))).close()
        except psycopg.Error as exc:
            reason = " ".join(str(exc).split())[:300]
            raise EdgefleetError(
                f"cannot connect to PostgreSQL at {redact(url)}: {reason}; check that the server "
                "runs and the URL's user, host, port and database") from None
        self._local = threading.local()
        self._pool = ConnectionPool(
            url, min_size=min_size, max_size=max_size, open=False, name="edgefleet",
            kwargs={"autocommit": True, "row_factory": _row_factory,
                    "options": "-c synchronous_commit=on"},
        )
        try:
            self._pool.open(wait=True, timeout=connect_timeout_s)
        except PoolTimeout:
            self._pool.close()
            raise EdgefleetError(
                f"cannot connect to PostgreSQL at {redact(url)} within {connect_timeout_s:g}s; "
                "check that the server runs and the URL's user, host, port and database") from None
        try:
            self._migrate()
        except BaseException:
            self._pool.close()
            raise
        # Several replicas on this database (pg_coordination.py): who leads, what changed.
        self._leadership = Leadership(url)
        self._changes = ChangeListener(url, self._notify)

    def _migrate(self) -> None:
        scripts = pg_migrations()
        with self._tx() as c:
            c.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATE_LOCK,))
            c.raw.execute(PRELUDE)
            c.raw.execute("CREATE TABLE IF NOT EXISTS edgefleet_schema (version BIGINT NOT NULL)")
            row = c.execute("SELECT version FROM edgefleet_schema").fetchone()
            if row is None:
                c.execute("INSERT INTO edgefleet_schema(version) VALUES (0)")
            current = int(row["version"]) if row else 0
            if current > len(scripts):
                raise RuntimeError(
                    f"database schema version {current} is newer than this software "
                    f"(knows {len(scripts)}); refusing to touch it")
            for script in scripts[current:]:
                c.raw.execute(script)
            c.execute("UPDATE edgefleet_schema SET version = ?", (len(scripts),))
            c.raw.execute(TUNING)

    def schema_version(self) -> int:
        return int(self._query("SELECT version FROM edgefleet_schema")[0]["version"])

    @contextmanager
    def _tx(self, devices: Sequence[str] | None = None,  # type: ignore[override]
            *, pipelined: bool = False) -> Iterator[_Connection]:
        """A write transaction. Without ``devices`` it holds the write lock alone (as
        SQLite's ``BEGIN IMMEDIATE``). With ``devices`` (telemetry, heartbeats: writes that
        touch and read only those devices' rows) it holds the write lock shared, so such
        writes run side by side on every replica, and each device's own lock, taken in one
        order, so one device's writes stay serialized (telemetry's deduplication reads what
        the device stored before)."""
        held: _Connection | None = getattr(self._local, "conn", None)
        if held is not None:  # a method calling another inside its transaction
            yield held
            return
        with self._pool.connection() as raw, \
                raw.pipeline() if pipelined else nullcontext(), raw.transaction():
            self._local.conn = _Connection(raw)
            try:
                if devices is None:
                    self._local.conn.execute("SELECT pg_advisory_xact_lock(?)", (_WRITE_LOCK,))
                else:  # one round trip: the shared lock, then the devices' in their order
                    self._local.conn.execute(
                        "SELECT pg_advisory_xact_lock_shared(?), (SELECT count(*) FROM"
                        " (SELECT pg_advisory_xact_lock(?, k) FROM unnest(?::integer[]) AS k)"
                        " AS held)",
                        (_WRITE_LOCK, _DEVICE_LOCKS, sorted({_device_key(d) for d in devices})))
                yield self._local.conn
            finally:
                self._local.conn = None

    @staticmethod
    def _stored_query(chunk: Sequence[tuple[int, str, int, int]]) -> tuple[str, list[Any]]:
        """``SqliteStore._stored_query`` with the batches as four arrays, so its text is the
        same whatever the group's size (a prepared statement, planned once), and the lookups
        in a LATERAL subquery, so every batch is an index range scan (a join of the whole
        group would let the planner scan a table it thinks small)."""
        return ("SELECT q.i, s.* FROM unnest(?::bigint[], ?::text[], ?::bigint[], ?::bigint[])"
                " AS q(i, d, lo, hi) CROSS JOIN LATERAL ("
                f"SELECT {_SEGMENT_BODY}, NULL::bigint AS seq FROM telemetry_segments"
                " WHERE device_id = q.d AND last_seq >= q.lo AND first_seq <= q.hi"
                " UNION ALL SELECT NULL, NULL, NULL, NULL, seq FROM telemetry"
                " WHERE device_id = q.d AND seq BETWEEN q.lo AND q.hi) AS s",
                [list(column) for column in zip(*chunk, strict=True)])

    @contextmanager
    def _read(self) -> Iterator[_Connection]:
        held: _Connection | None = getattr(self._local, "conn", None)
        if held is not None:
            yield held
            return
        with self._pool.connection() as raw:
            yield _Connection(raw)

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._read() as c:
            return c.execute(sql, args).fetchall()

    def token_labels(self, token_hash: str, now: float) -> dict[str, str]:
        with self._read() as c:
            return _usable_token(c, token_hash, now)  # type: ignore[arg-type]

    def close(self) -> None:
        self._changes.close()
        self._leadership.close()  # the locks go with the session: another replica leads
        self._pool.close()

    # --- replicas ---
    def try_lead(self, name: str) -> bool:
        return self._leadership.try_lead(name)

    def publish_change(self, what: str) -> None:
        self._changes.publish(what)

    def listen_changes(self, callback: Callable[[str], None]) -> Callable[[], None]:
        return self._changes.listen(callback)

    def shares_blobs(self) -> bool:
        return True

    def _notify(self, sql: str, args: tuple[Any, ...]) -> None:
        with self._pool.connection() as raw:
            raw.execute(sql, args)

    # --- audit: one writer at a time, in every process ---
    def append_audit(
        self, now: float, actor: str, action: str, target: str, outcome: str, detail: str,
        role: str = "",
    ) -> AuditRecord:
        with self._tx() as c:
            c.execute("SELECT pg_advisory_xact_lock(?)", (_AUDIT_LOCK,))
            return super().append_audit(now, actor, action, target, outcome, detail, role)

    def audit_chain(self) -> list[AuditRecord]:
        return [_audit_record(r) for r in self._query("SELECT * FROM audit_events ORDER BY seq")]

    # --- SQLite's JSON functions, in PostgreSQL's ---
    def list_model_versions(self, name: str | None = None) -> list[ModelVersionRecord]:
        rows = self._query(
            "SELECT name, version, digest, length, created_at, published_by, publisher_key,"
            " json_build_object('name', m->'name', 'version', m->'version',"
            " 'created', m->'created', 'task', COALESCE(m->'task', '\"classification\"'::jsonb),"
            " 'metrics', m->'metrics', 'compression', m->'compression',"
            " 'runtime', m->'runtime')::text AS manifest, manifest_bytes"
            " FROM (SELECT *, manifest::jsonb AS m, length(manifest) AS manifest_bytes"
            " FROM model_versions WHERE (? = '' OR name = ?)) AS v ORDER BY name, version",
            (name or "", name or ""))
        return [_model_version(r) for r in rows]

    # --- retention: ctid where SQLite has rowid, DISTINCT ON for its bare-column MAX ---
    def expire_telemetry(self, raw_before: float, drift_before: float,
                         limit: int = 10_000) -> int:
        def oldest(table: str) -> str:
            return (f"ctid = ANY(ARRAY(SELECT ctid FROM {table} WHERE received_at < ?"
                    " ORDER BY received_at, device_id, seq LIMIT ?))")

        removed = 0
        with self._tx() as c:
            c.execute(
                "INSERT INTO telemetry_rollup(device_id, kind, day, records, bytes)"
                " SELECT device_id, kind, FLOOR(received_at / 86400)::BIGINT, COUNT(*),"
                f" SUM(length(payload)) FROM telemetry WHERE {oldest('telemetry')}"
                " GROUP BY 1, 2, 3 ON CONFLICT(device_id, kind, day) DO UPDATE SET"
                " records = telemetry_rollup.records + excluded.records,"
                " bytes = telemetry_rollup.bytes + excluded.bytes",
                (raw_before, limit))
            removed += c.execute(f"DELETE FROM telemetry WHERE {oldest('telemetry')}",
                                 (raw_before, limit)).rowcount
            removed += self._expire_segments(c, raw_before, limit)  # type: ignore[arg-type]
            c.execute(
                "INSERT INTO drift_rollup(device_id, model, version, day, windows, drifted, rows,"
                " score_sum, score_max) SELECT device_id, model, version,"
                ' FLOOR("end" / 86400)::BIGINT, COUNT(*), SUM(drifted), SUM(rows), SUM(score),'
                f" MAX(score) FROM drift_windows WHERE {oldest('drift_windows')}"
                " GROUP BY 1, 2, 3, 4 ON CONFLICT(device_id, model, version, day) DO UPDATE SET"
                " windows = drift_rollup.windows + excluded.windows,"
                " drifted = drift_rollup.drifted + excluded.drifted,"
                " rows = drift_rollup.rows + excluded.rows,"
                " score_sum = drift_rollup.score_sum + excluded.score_sum,"
                " score_max = GREATEST(drift_rollup.score_max, excluded.score_max)",
                (drift_before, limit))
            removed += c.execute(f"DELETE FROM drift_windows WHERE {oldest('drift_windows')}",
                                 (drift_before, limit)).rowcount
            c.execute(
                "INSERT INTO arm_stats_rollup(device_id, model, version, day, seq, requests,"
                " errors, labelled, correct, abs_error_sum, p95_ms) SELECT * FROM"
                " (SELECT DISTINCT ON (device_id, model, version, day) device_id, model,"
                " version, day, seq, requests, errors, labelled, correct, abs_error_sum, p95_ms"
                " FROM (SELECT *, FLOOR(created_at / 86400)::BIGINT AS day FROM"
                f" arm_stats_history WHERE {oldest('arm_stats_history')}) AS expired"
                " ORDER BY device_id, model, version, day, seq DESC) AS last"
                " ON CONFLICT(device_id, model, version, day) DO UPDATE SET"
                " seq = excluded.seq, requests = excluded.requests, errors = excluded.errors,"
                " labelled = excluded.labelled, correct = excluded.correct,"
                " abs_error_sum = excluded.abs_error_sum, p95_ms = excluded.p95_ms"
                " WHERE excluded.seq > arm_stats_rollup.seq",
                (drift_before, limit))
            removed += c.execute(
                f"DELETE FROM arm_stats_history WHERE {oldest('arm_stats_history')}",
                (drift_before, limit)).rowcount
        return removed


def redact(url: str) -> str:
    """The URL without its password (for messages and logs)."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    if "password" not in info:
        return url
    scheme, _, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    return f"{scheme}://{creds.split(':', 1)[0]}:***{at}{host}" if at else url


class _Connection:
    """What SqliteStore's code calls on a sqlite3 connection, on a psycopg one."""

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw

    def execute(self, sql: str, args: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        if not args:
            return self.raw.execute(sql)
        return self.raw.execute(_placeholders(sql), tuple(args))

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> psycopg.Cursor[Any]:
        cur = self.raw.cursor()
        cur.executemany(_placeholders(sql), rows)
        return cur


@lru_cache(maxsize=512)
def _placeholders(sql: str) -> str:
    """``?`` -> ``%s`` (and a literal ``%`` doubled). The shared SQL has no ``?`` in string
    literals or identifiers."""
    return sql.replace("%", "%%").replace("?", "%s")


class _Row(dict[str, Any]):
    """A row readable by column name and by position, as sqlite3.Row is."""

    __slots__ = ("_values",)

    def __init__(self, names: Sequence[str], values: Sequence[Any]) -> None:
        super().__init__(zip(names, values, strict=True))
        self._values = tuple(values)

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, int):
            return self._values[key]
        return super().__getitem__(key)


def _row_factory(cursor: psycopg.Cursor[Any]) -> Any:
    names = [d.name for d in cursor.description or ()]

    def make(values: Sequence[Any]) -> _Row:
        return _Row(names, values)

    return make
