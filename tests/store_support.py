"""The storage contract's fixtures: every storage test runs on SQLite and on PostgreSQL.

``store_url`` is a fresh database per test: a SQLite file under tmp_path, or a PostgreSQL
database created with a random name on the local server (127.0.0.1:5432, trust auth, user
postgres) and dropped afterwards. Import the fixtures a test module uses from here.
"""

from __future__ import annotations

import contextlib
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from control_plane.domain import telemetry_segment
from control_plane.domain.records import TelemetryRecord
from control_plane.storage import Store, open_store
from control_plane.storage.segment_files import SegmentFiles, segment_dir

BACKENDS = ("sqlite", "postgresql")
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test"


@pytest.fixture
def pg_database() -> Iterator[str]:
    """postgresql://postgres@127.0.0.1:5432/<a new database> (dropped afterwards)."""
    import psycopg  # noqa: PLC0415 - only the tests that use PostgreSQL

    name = f"ef_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    url: str = request.getfixturevalue("pg_database")
    return url


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    opened = open_store(store_url)
    try:
        yield opened
    finally:
        opened.close()


def raw_telemetry(db: Path) -> list[tuple[str, TelemetryRecord]]:
    """Every raw record an SQLite control-plane database keeps, as (device, record), read from
    the file directly (for a process the test does not own): rows of ``telemetry`` and the
    records of each segment."""
    with contextlib.closing(sqlite3.connect(db, timeout=30.0)) as conn:
        out = [(d, TelemetryRecord(s, k, at, bytes(p))) for d, s, k, at, p in conn.execute(
            "SELECT device_id, seq, kind, created_at, payload FROM telemetry")]
        files = SegmentFiles(segment_dir(Path(db)))
        try:
            for device_id, in_row, number, offset, length in conn.execute(
                    "SELECT device_id, body, body_file, body_offset, body_length"
                    " FROM telemetry_segments"):
                body = (bytes(in_row) if number is None  # else in the store's segment files
                        else files.read(number, offset, length))
                out.extend((device_id, r) for r in telemetry_segment.decode(body))
        finally:
            files.close()
    return sorted(out, key=lambda item: (item[0], item[1].seq))
