"""Storage behind an interface: services see ``Store``; ``open_store`` picks the implementation.

SQLite (WAL, synchronous=FULL, versioned migrations) is the embedded default. PostgreSQL
(``postgresql://...``, control_plane/storage/postgres.py) follows the same migrations behind the
same interface, for control planes that outgrow one machine.
"""

from __future__ import annotations

from pathlib import Path

from control_plane.storage.base import Store
from control_plane.storage.sqlite import SqliteStore

__all__ = ["SqliteStore", "Store", "is_url", "open_store"]

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_url(location: str | Path) -> bool:
    """Whether a configured database is a URL (a server) rather than a SQLite file."""
    return "://" in str(location)


def open_store(url: str | Path) -> Store:
    """``sqlite:///abs/path.db`` or a bare path opens SQLite; ``postgresql://USER@HOST:PORT/DB``
    (libpq's URL, ``postgres://`` too) opens PostgreSQL."""
    text = str(url)
    if text.startswith("sqlite:///"):
        return SqliteStore(Path(text[len("sqlite://"):]))
    if text.startswith(POSTGRES_SCHEMES):
        # Imported here: a SQLite-only install need not have psycopg.
        from control_plane.storage.postgres import PostgresStore  # noqa: PLC0415

        return PostgresStore(text)
    if is_url(text):
        raise ValueError(f"unsupported store URL {text!r}; expected sqlite:///PATH or "
                         "postgresql://USER@HOST:PORT/DB")
    return SqliteStore(Path(text))
