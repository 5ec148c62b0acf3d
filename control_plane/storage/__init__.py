"""Storage behind an interface: services see ``Store``; ``open_store`` picks the implementation.

SQLite (WAL, synchronous=FULL, versioned migrations) is the embedded default. A PostgreSQL
implementation for several stateless control-plane replicas plugs in behind the same interface.
"""

from __future__ import annotations

from pathlib import Path

from control_plane.storage.base import Store
from control_plane.storage.sqlite import SqliteStore

__all__ = ["SqliteStore", "Store", "open_store"]


def open_store(url: str | Path) -> Store:
    """``sqlite:///abs/path.db``, or a bare path, opens SQLite."""
    text = str(url)
    if text.startswith("sqlite:///"):
        return SqliteStore(Path(text[len("sqlite://"):]))
    if "://" in text:
        raise ValueError(f"unsupported store URL {text!r}; expected sqlite:///PATH")
    return SqliteStore(Path(text))
