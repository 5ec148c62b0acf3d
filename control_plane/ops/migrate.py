"""Move a SQLite home's fleet into an empty PostgreSQL database (``control-plane migrate``).

With the control plane stopped, every table of the home's SQLite database is copied, row for
row, into a PostgreSQL database that holds no fleet yet; then the home's config.toml names the
database's URL instead of the file. The steps, each refusing with one reason:

1. the home is on SQLite, and no control plane serves it: ``serve.lock`` is taken exclusively
   (control_plane/ops/serve_lock.py; a control plane started meanwhile refuses to start) and
   SQLite's own exclusive lock too (``locking_mode=EXCLUSIVE``, ``BEGIN EXCLUSIVE``: refused
   while any other connection has the database open, whatever program it is); that read
   transaction stays open to the end, so the copy is one consistent snapshot and nothing writes
   the file meanwhile;
2. the SQLite audit chain verifies (a broken chain is not copied: it would be laundered into a
   database whose own chain looks new);
3. the target holds no fleet: none of its tables has a row;
4. one PostgreSQL transaction creates the schema (the same translated migrations
   ``PostgresStore`` runs), copies each table with ``COPY`` in foreign-key order, moves each
   identity sequence past the copied ids, and checks, before ``COMMIT``, that every table has
   the same number of rows and the same content digest (an order-free sum of row hashes) as its
   SQLite twin and that the copied audit chain verifies with the same length and head hash;
5. after ``COMMIT``, the database is opened as the control plane will open it
   (``PostgresStore``) and its audit chain checked once more;
6. only then is config.toml rewritten (atomically: a new file renamed over the old one).

Audit rows are copied in ``seq`` order with their stored ``prev_hash`` and ``hash`` (the chain is
copied, not recomputed). The append-only triggers refuse UPDATE, DELETE and TRUNCATE, not INSERT,
so they stay enabled throughout: nothing is disabled, and no superuser right is needed.

A failure or a crash (even SIGKILL) anywhere before step 6 leaves the home as it was: the SQLite
file is only read, config.toml is untouched, and the PostgreSQL transaction is rolled back
(PostgreSQL aborts the transaction of a connection that dies), so the target is as empty as it
was and the command can simply be run again (or the database dropped and created anew). The
SQLite file stays after a migration, as the way back: set ``database = "edgefleet.db"`` in
config.toml's ``[server]`` again (what was written on PostgreSQL meanwhile stays there).
"""

from __future__ import annotations

import hashlib
import sqlite3
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from control_plane.config import ControlPlaneConfig
from control_plane.domain.audit_chain import verify_chain
from control_plane.domain.records import AuditRecord
from control_plane.ops.serve_lock import hold_exclusive
from control_plane.storage import SqliteStore, is_url
from control_plane.storage.migrations import MIGRATIONS
from control_plane.storage.segment_files import SegmentFiles, body_in_row, segment_dir
from fleetcore import tomlfile
from fleetcore.errors import AlreadyExistsError, EdgefleetError, InvalidInputError

__all__ = ["MigrationSummary", "migrate"]

_DIGEST_MOD = 1 << 256


@dataclass(frozen=True)
class MigrationSummary:
    url: str  # redacted
    rows: dict[str, int]  # table -> rows copied
    audit_entries: int
    audit_head: str
    sqlite_file: Path


def migrate(home: Path, url: str, *,
            on_table: Callable[[str, int], None] | None = None) -> MigrationSummary:
    """Copy ``home``'s SQLite fleet into the PostgreSQL database ``url`` (see the module doc).
    ``on_table(name, rows)`` is called after each table is copied, inside the transaction."""
    # Imported here: only this command and PostgreSQL homes need psycopg.
    from control_plane.storage.postgres import PostgresStore, redact  # noqa: PLC0415

    cfg = ControlPlaneConfig.load(Path(home))
    if cfg.database_url:
        raise InvalidInputError(f"{cfg.home} already uses {redact(cfg.database_url)}; migrate "
                                "copies a SQLite home's database")
    if not str(url).startswith(("postgresql://", "postgres://")) or not is_url(url):
        raise InvalidInputError(f"--to must be a postgresql://USER@HOST:PORT/DB URL, not {url!r}")
    database = cfg.database
    if not database.is_file():
        raise InvalidInputError(f"{database} does not exist; nothing to migrate")
    lock = hold_exclusive(cfg.home)
    try:
        try:
            rows, entries, head = _copy_home(cfg, database, url, on_table)
        except sqlite3.Error as exc:
            raise EdgefleetError(
                f"reading {database} failed ({exc}); nothing was committed: check the file "
                "(PRAGMA integrity_check), restore a backup if it is damaged") from None
        # As the control plane will open it: the committed chain, once more.
        store = PostgresStore(url)
        try:
            chain = store.audit_chain()
        finally:
            store.close()
        if _verified_chain(chain, "the committed PostgreSQL") != (entries, head):
            raise EdgefleetError("the committed PostgreSQL audit chain differs from SQLite's; "
                                 "config.toml was not changed (drop the database and retry)")
        _switch_config(cfg.layout.config, url)
    finally:
        lock.release()
    return MigrationSummary(redact(url), rows, entries, head, database)


def _copy_home(cfg: ControlPlaneConfig, database: Path, url: str,
               on_table: Callable[[str, int], None] | None) -> tuple[dict[str, int], int, str]:
    import psycopg  # noqa: PLC0415

    from control_plane.storage.postgres import redact  # noqa: PLC0415

    _lock_sqlite(database).close()  # nobody else has it open: then it may be upgraded
    _upgrade_schema(database)
    source = _lock_sqlite(database)
    files = SegmentFiles(segment_dir(database))
    try:
        entries, head = _verified_chain(_audit(source.execute(
            "SELECT * FROM audit_events ORDER BY seq").fetchall()), "the SQLite")
        try:
            target = psycopg.connect(url, connect_timeout=10)
        except psycopg.Error as exc:
            reason = " ".join(str(exc).split())[:300]
            raise EdgefleetError(
                f"cannot connect to PostgreSQL at {redact(url)}: {reason}; check that the "
                "server runs and the URL's user, host, port and database") from None
        try:
            rows = _copy(source, target, url, (entries, head), on_table, files)
        except psycopg.Error as exc:
            reason = " ".join(str(exc).split())[:300]
            raise EdgefleetError(
                f"copying into {redact(url)} failed ({reason}); nothing was committed and "
                f"{cfg.home} still uses SQLite: fix the cause and run migrate again") from None
        finally:
            target.close()
    finally:
        files.close()
        source.close()
    return rows, entries, head


def _switch_config(path: Path, url: str) -> None:
    """``[server] database = URL`` in config.toml, every other key as it was; atomically (a new
    file renamed over the old one, with the old one's mode)."""
    doc = tomlfile.load(path)
    doc.setdefault("server", {})["database"] = url
    tomlfile.write(path, doc, mode=stat.S_IMODE(path.stat().st_mode))
    if ControlPlaneConfig.load(path.parent).database_url != url:
        raise EdgefleetError(f"{path} did not take the URL; set [server] database by hand")


def _upgrade_schema(database: Path) -> None:
    """Bring an older SQLite schema to this software's version (what serving it would do)."""
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
    finally:
        conn.close()
    if version > len(MIGRATIONS):
        raise InvalidInputError(f"{database} has schema version {version}, newer than this "
                                f"software's {len(MIGRATIONS)}; migrate with the newer software")
    if version < len(MIGRATIONS):
        SqliteStore(database).close()


def _lock_sqlite(database: Path) -> sqlite3.Connection:
    """A connection holding SQLite's exclusive lock, inside a transaction never committed."""
    conn = sqlite3.connect(str(database), isolation_level=None, timeout=0)
    conn.row_factory = sqlite3.Row
    try:
        conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        conn.execute("BEGIN EXCLUSIVE")
    except sqlite3.OperationalError as exc:
        conn.close()
        raise InvalidInputError(
            f"{database} is in use by another process ({exc}); stop the control plane (and "
            "any tool using the database) and run the migration again") from None
    return conn


def _audit(rows: Iterable[Any]) -> list[AuditRecord]:
    return [AuditRecord(r["seq"], r["time"], r["actor"], r["action"], r["target"],
                        r["outcome"], r["detail"], r["prev_hash"], r["hash"], r["role"])
            for r in rows]


def _verified_chain(chain: Sequence[AuditRecord], where: str) -> tuple[int, str]:
    verdict = verify_chain(chain)
    if not verdict.ok:
        raise InvalidInputError(
            f"{where} audit chain is broken at entry {verdict.first_bad_seq} ({verdict.reason});"
            " refusing to copy it: investigate with `fleet audit verify`, restore a good backup")
    return len(chain), chain[-1].hash if chain else ""


def _tables(source: sqlite3.Connection) -> list[str]:
    """The SQLite tables, parents before the tables that reference them."""
    names = [r[0] for r in source.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        " ORDER BY name")]
    parents = {t: {r["table"] for r in source.execute(f'PRAGMA foreign_key_list("{t}")')} - {t}
               for t in names}
    ordered: list[str] = []
    while len(ordered) < len(names):
        ready = [t for t in names if t not in ordered and parents[t] <= set(ordered)]
        if not ready:
            left = sorted(set(names) - set(ordered))
            raise EdgefleetError(f"foreign keys form a cycle among {left}")
        ordered.extend(ready)
    return ordered


def _columns(source: sqlite3.Connection, table: str) -> list[str]:
    return [r["name"] for r in source.execute(f'PRAGMA table_info("{table}")')]


def _copy(source: sqlite3.Connection, target: Any, url: str, chain: tuple[int, str],
          on_table: Callable[[str, int], None] | None, files: SegmentFiles) -> dict[str, int]:
    """Every table, row for row; a telemetry segment's body read from ``files`` into its row
    (PostgreSQL keeps bodies in rows: replicas share no file system)."""
    from psycopg.rows import dict_row  # noqa: PLC0415

    from control_plane.storage.pg_migrations import PRELUDE, TUNING, pg_migrations  # noqa: PLC0415
    from control_plane.storage.postgres import _AUDIT_LOCK, _MIGRATE_LOCK, _WRITE_LOCK, redact  # noqa: PLC0415

    tables = _tables(source)
    copied: dict[str, int] = {}
    with target.transaction():
        cur = target.cursor()
        for key in (_MIGRATE_LOCK, _WRITE_LOCK, _AUDIT_LOCK):  # no replica writes meanwhile
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
        _refuse_a_fleet(cur, redact(url))
        scripts = pg_migrations()
        cur.execute(PRELUDE)
        cur.execute("CREATE TABLE IF NOT EXISTS edgefleet_schema (version BIGINT NOT NULL)")
        cur.execute("SELECT version FROM edgefleet_schema")
        row = cur.fetchone()
        current = int(row[0]) if row else 0
        if row is None:
            cur.execute("INSERT INTO edgefleet_schema(version) VALUES (0)")
        if current > len(scripts):
            raise InvalidInputError(f"{redact(url)} has a newer schema ({current}) than this "
                                    "software; give migrate an empty database")
        for script in scripts[current:]:
            cur.execute(script)
        cur.execute("UPDATE edgefleet_schema SET version = %s", (len(scripts),))
        cur.execute(TUNING)
        pg_tables = _pg_columns(cur)
        for table in tables:
            cols = _columns(source, table)
            if table not in pg_tables or set(cols) != set(pg_tables[table]):
                raise EdgefleetError(
                    f"table {table} has columns {sorted(cols)} on SQLite but "
                    f"{sorted(pg_tables.get(table, []))} on PostgreSQL; nothing was copied")
            names = ", ".join(f'"{c}"' for c in cols)
            count, digest = 0, 0
            with cur.copy(f'COPY "{table}" ({names}) FROM STDIN') as pipe:
                query = f'SELECT {names} FROM "{table}"'  # noqa: S608 - the schema's names
                for row in source.execute(query):
                    values = (body_in_row(row, cols, files) if table == "telemetry_segments"
                              else tuple(row))
                    pipe.write_row(values)
                    count += 1
                    digest = (digest + _row_digest(values)) % _DIGEST_MOD
            _check_table(target, table, names, count, digest)
            _reset_identity(cur, table)
            copied[table] = count
            if on_table is not None:
                on_table(table, count)
        dict_cur = target.cursor(row_factory=dict_row)
        dict_cur.execute("SELECT * FROM audit_events ORDER BY seq")
        if _verified_chain(_audit(dict_cur.fetchall()), "the copied") != chain:
            raise EdgefleetError("the copied audit chain differs from SQLite's (length or head "
                                 "hash); nothing was committed")
    return copied


def _refuse_a_fleet(cur: Any, where: str) -> None:
    """Refuse a database where any table holds a row (a fleet, or anything else)."""
    cur.execute("SELECT table_schema, table_name FROM information_schema.tables"
                " WHERE table_type = 'BASE TABLE' AND table_schema NOT IN"
                " ('pg_catalog', 'information_schema')")
    for schema, table in cur.fetchall():
        if table == "edgefleet_schema":
            continue
        cur.execute(f'SELECT EXISTS (SELECT 1 FROM "{schema}"."{table}")')  # noqa: S608
        if cur.fetchone()[0]:
            raise AlreadyExistsError(
                f"{where} is not empty (table {schema}.{table} has rows; it may hold a fleet "
                "already); migrate into a new database: CREATE DATABASE ...")


def _pg_columns(cur: Any) -> dict[str, list[str]]:
    cur.execute("SELECT table_name, column_name FROM information_schema.columns"
                " WHERE table_schema = current_schema()")
    out: dict[str, list[str]] = {}
    for table, column in cur.fetchall():
        out.setdefault(table, []).append(column)
    return out


def _check_table(target: Any, table: str, names: str, count: int, digest: int) -> None:
    """The copied table's row count and content digest equal the source's (read through a
    server-side cursor: a table of millions of rows is not held in memory)."""
    got_count, got = 0, 0
    with target.cursor(name="edgefleet_migrate_check") as cur:
        cur.itersize = 5000
        cur.execute(f'SELECT {names} FROM "{table}"')  # noqa: S608 - the schema's names
        for values in cur:
            got_count += 1
            got = (got + _row_digest(values)) % _DIGEST_MOD
    if (got_count, got) != (count, digest):
        raise EdgefleetError(
            f"table {table}: {count} rows on SQLite, {got_count} copied"
            f"{'' if got_count != count else ' with different values'}; nothing was committed")


def _reset_identity(cur: Any, table: str) -> None:
    """Identity columns continue after the copied ids (COPY gave them explicit values)."""
    cur.execute("SELECT column_name FROM information_schema.columns WHERE table_schema ="
                " current_schema() AND table_name = %s AND is_identity = 'YES'", (table,))
    for (column,) in cur.fetchall():
        top = f'SELECT MAX("{column}") FROM "{table}"'  # noqa: S608 - the schema's names
        cur.execute(f"SELECT setval(pg_get_serial_sequence(%s, %s), COALESCE(({top}), 0) + 1,"
                    " false)", (f'"{table}"', column))


def _row_digest(values: Sequence[Any]) -> int:
    """One row's hash, the same for the SQLite and PostgreSQL readings of the same values."""
    parts = []
    for value in values:
        v = bytes(value) if isinstance(value, memoryview | bytearray) else value
        if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
            v = int(v)  # a REAL column's 5.0 and a 5 are one value to both databases
        parts.append(f"{type(v).__name__}:{v!r}")
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode()).digest(), "big")
