"""Helpers for the ingest tests: a database of its own on the real PostgreSQL / MariaDB of
this machine (created and dropped per test), pipeline files, and a byte scan of a folder."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetcore import tomlfile

PG = "127.0.0.1:5432"
MARIA = "127.0.0.1:3306"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """postgresql://root@127.0.0.1:5432/<a new database> (dropped afterwards)."""
    import psycopg  # noqa: PLC0415 - only the tests that use PostgreSQL

    name = f"ef_{uuid.uuid4().hex[:12]}"
    with psycopg.connect("host=127.0.0.1 port=5432 user=root dbname=test",
                         autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://root@{PG}/{name}"
    finally:
        with psycopg.connect("host=127.0.0.1 port=5432 user=root dbname=test",
                             autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def maria_url() -> Iterator[str]:
    """mysql://root@127.0.0.1:3306/<a new database> (dropped afterwards)."""
    import pymysql  # noqa: PLC0415

    name = f"ef_{uuid.uuid4().hex[:12]}"
    conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", password="",
                           autocommit=True)
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}`")
    try:
        yield f"mysql://root@{MARIA}/{name}"
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


def write_pipeline(base: Path, data: dict[str, Any], *, regions: list[str] | None = None,
                   name: str = "pipeline.toml", **sections: dict[str, Any]) -> Path:
    """A pipeline with ``data`` and a small fast model; the store allows ``regions``."""
    base.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "data": {"region": "eu-west", **data},
        "store": {"path": "store", "allowed_regions": regions or ["eu-west"]},
        "model": {"kind": "mlp", "hidden": [16]},
        "train": {"epochs": 5, "batch_size": 32, "seed": 0},
        "export": {"formats": ["onnx"], "check_rows": 8},
        "bundle": {"name": "ingest-test", "version": 1},
        **sections,
    }
    path = base / name
    tomlfile.write(path, doc)
    return path


def files_containing(root: Path, needle: bytes) -> list[Path]:
    """Every file under ``root`` whose bytes hold ``needle``."""
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]
