"""An SQLite store keeps telemetry segment bodies in append-only files beside the database
(control_plane/storage/segment_files.py): written and made durable before the rows that point
at them commit, read back after a restart, left alone by a failed transaction, refused loudly
when missing or cut short, deleted once retention has rolled up every row that used them, and
carried by backups."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from control_plane.domain.record_columns import TelemetryWrite
from control_plane.domain.records import TelemetryRecord
from control_plane.ops.backup import backup, restore
from control_plane.ops.home import init_home
from control_plane.storage import segment_files
from control_plane.storage.segment_files import SegmentFiles, segment_dir
from control_plane.storage.sqlite import SqliteStore
from fleetcore.errors import InvalidInputError
from tests.test_store_contract import _device


def _records(first: int, n: int) -> list[TelemetryRecord]:
    return [TelemetryRecord(s, "error", float(s), b"payload %d " % s + b"x" * 80)
            for s in range(first, first + n)]


def _write(device: str, records: list[TelemetryRecord], now: float) -> TelemetryWrite:
    return TelemetryWrite(device, records, {}, now, 0, 0)


def _rows(db: Path) -> list[tuple[bytes, Any, Any, Any]]:
    with sqlite3.connect(db) as conn:
        return [(bytes(r[0]), r[1], r[2], r[3]) for r in conn.execute(
            "SELECT body, body_file, body_offset, body_length FROM telemetry_segments"
            " ORDER BY received_at, last_seq")]


def test_bodies_go_to_the_files_and_come_back_after_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "cp.db"
    store = SqliteStore(db)
    _device(store)
    store.ingest_telemetry_many([_write("dev-1", _records(1, 500), 100.0),
                                 _write("dev-1", _records(501, 500), 100.0)])
    store.ingest_telemetry("dev-1", _records(1001, 10), {}, 101.0, 0, 0)
    store.close()
    rows = _rows(db)
    assert [r[0] for r in rows] == [b"", b"", b""]  # nothing of the bodies in the rows
    # One group, one file, back to back; the next group after it.
    assert [r[1] for r in rows] == [1, 1, 1]
    assert rows[0][2] == 0 and rows[1][2] == rows[0][3] and rows[2][2] == rows[1][2] + rows[1][3]
    assert (segment_dir(db) / "00000001.seg").stat().st_size == sum(r[3] for r in rows)
    again = SqliteStore(db)
    assert again.telemetry_records("dev-1") == _records(1, 1010)
    # A resend is still recognised from the files: stored once.
    again.ingest_telemetry("dev-1", _records(995, 20), {}, 102.0, 0, 0)
    assert again.telemetry_records("dev-1") == _records(1, 1014)
    again.close()


def test_a_failed_group_leaves_nothing_pointed_at_and_the_next_one_lands_after_it(
        tmp_path: Path) -> None:
    db = tmp_path / "cp.db"
    store = SqliteStore(db)
    _device(store)
    store.ingest_telemetry("dev-1", _records(1, 5), {}, 100.0, 0, 0)
    before = _rows(db)
    # A group whose second write cannot be stored (a kind without a stored code): the whole
    # transaction rolls back, and its first segment, staged, is never written.
    size = (segment_dir(db) / "00000001.seg").stat().st_size
    with pytest.raises(InvalidInputError, match="cannot be stored"):
        store.ingest_telemetry_many([_write("dev-1", _records(6, 5), 101.0),
                                     _write("dev-1", [TelemetryRecord(20, "weather", 1.0, b"")],
                                            101.0)])
    assert _rows(db) == before
    assert (segment_dir(db) / "00000001.seg").stat().st_size == size
    # Bytes written by a group whose commit never happened (a crash in between) are skipped.
    path = segment_dir(db) / "00000001.seg"
    with path.open("ab") as f:
        f.write(b"orphan bytes of a group that never committed")
    orphan_end = path.stat().st_size
    store.close()
    store = SqliteStore(db)
    store.ingest_telemetry("dev-1", _records(6, 5), {}, 102.0, 0, 0)
    assert _rows(db)[-1][2] == orphan_end
    assert store.telemetry_records("dev-1") == _records(1, 10)
    store.close()


def test_two_stores_on_one_database_append_after_each_other(tmp_path: Path) -> None:
    db = tmp_path / "cp.db"
    first, second = SqliteStore(db), SqliteStore(db)  # e.g. a command beside the server
    _device(first)
    for i, store in enumerate([first, second, first, second]):
        store.ingest_telemetry("dev-1", _records(1 + 100 * i, 100), {}, 100.0 + i, 0, 0)
    assert first.telemetry_records("dev-1") == second.telemetry_records("dev-1") == _records(
        1, 400)
    first.close()
    second.close()


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_missing_or_cut_file_is_refused_by_name(tmp_path: Path, damage: str) -> None:
    db = tmp_path / "cp.db"
    store = SqliteStore(db)
    _device(store)
    store.ingest_telemetry("dev-1", _records(1, 50), {}, 100.0, 0, 0)
    store.close()
    path = segment_dir(db) / "00000001.seg"
    if damage == "missing":
        path.unlink()
    else:
        os.truncate(path, path.stat().st_size - 1)
    store = SqliteStore(db)
    with pytest.raises(InvalidInputError, match=f"00000001.seg.*{damage}|{damage}.*00000001"):
        store.telemetry_records("dev-1")
    store.close()


@pytest.mark.parametrize(("offset", "length"), [(0, 10**15), (-1, 10), (10**15, 1)])
def test_a_damaged_row_is_refused_before_anything_is_allocated(
        tmp_path: Path, offset: int, length: int) -> None:
    db = tmp_path / "cp.db"
    store = SqliteStore(db)
    _device(store)
    store.ingest_telemetry("dev-1", _records(1, 50), {}, 100.0, 0, 0)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE telemetry_segments SET body_offset = ?, body_length = ?",
                     (offset, length))
    with pytest.raises(InvalidInputError, match=r"truncated|cannot be in a segment file"):
        store.telemetry_records("dev-1")
    store.close()


def test_retention_deletes_a_file_once_no_row_points_at_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(segment_files, "MAX_FILE_BYTES", 20_000)  # a file a batch or so
    db = tmp_path / "cp.db"
    store = SqliteStore(db)
    _device(store)
    for i in range(4):  # four groups, ~52 KB each: four files
        store.ingest_telemetry("dev-1", _records(1 + 500 * i, 500), {}, 100.0 + i, 0, 0)
    files = SegmentFiles(segment_dir(db))
    assert files.numbers() == [1, 2, 3, 4]
    assert store.expire_telemetry(raw_before=101.5, drift_before=0.0) == 1000
    assert files.numbers() == [3, 4]  # the first two groups' files went with their rows
    assert store.telemetry_records("dev-1") == _records(1001, 1000)
    # The file appended to stays, even once nothing points at it.
    assert store.expire_telemetry(raw_before=200.0, drift_before=0.0) == 1000
    assert files.numbers() == [4]
    assert store.telemetry_rollup("dev-1")["error"][0] == 2000
    store.ingest_telemetry("dev-1", _records(2001, 5), {}, 300.0, 0, 0)
    assert store.telemetry_records("dev-1") == _records(2001, 5)
    store.close()


def test_a_backup_carries_the_segment_files(tmp_path: Path) -> None:
    home = tmp_path / "home"
    cfg = init_home(home)
    store = SqliteStore(cfg.database)
    _device(store)
    store.ingest_telemetry("dev-1", _records(1, 500), {}, 100.0, 0, 0)
    archive = tmp_path / "backup.tar.gz"
    backup(home, archive)  # while the store is open, as when the control plane serves
    store.ingest_telemetry("dev-1", _records(501, 500), {}, 101.0, 0, 0)  # after: not in it
    store.close()
    restored = tmp_path / "restored"
    restore(archive, restored)
    again = SqliteStore(restored / cfg.database.relative_to(home))
    assert again.telemetry_records("dev-1") == _records(1, 500)
    again.close()
