"""SQLite helpers: durable connection settings and versioned migrations.

Every database of the project (control-plane registry, agent outbox and install state) opens
through ``connect`` (WAL, ``synchronous=FULL``, foreign keys on) and is brought to the current
schema by ``migrate`` with an ordered list of SQL scripts; ``PRAGMA user_version`` records how
many have been applied, so each runs exactly once, inside a transaction.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from pathlib import Path

__all__ = ["connect", "migrate"]

log = logging.getLogger(__name__)


def connect(path: Path | str, *, busy_timeout_ms: int = 5000) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def migrate(conn: sqlite3.Connection, migrations: Sequence[str]) -> int:
    """Apply the migrations not yet applied; return the schema version reached."""
    (current,) = conn.execute("PRAGMA user_version").fetchone()
    if current > len(migrations):
        raise RuntimeError(
            f"database schema version {current} is newer than this software "
            f"(knows {len(migrations)}); refusing to touch it"
        )
    for version in range(current + 1, len(migrations) + 1):
        log.info("applying schema migration %d", version)
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(migrations[version - 1]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return len(migrations)


def _statements(script: str) -> list[str]:
    """Split a script into complete statements (triggers contain ';' inside BEGIN...END)."""
    out: list[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                out.append(buf.strip())
            buf = ""
    if buf.strip():
        raise ValueError(f"incomplete SQL statement in migration: {buf.strip()[:80]!r}")
    return out
