"""Back up a control-plane home while it serves, and restore it into a new home.

``backup`` writes one gzip'd tar (0600): every file of the home except the database's live
files, job workdirs (``retrain/``) and scratch (``tmp/``), plus a consistent copy of the
database made with SQLite's online backup API (so the control plane keeps serving) and, after
it, copies of the telemetry segment files (``control_plane/storage/segment_files.py``), plus
``BACKUP.json``: when, the SHA-256 and size of every member, and the audit chain's head.

``restore`` unpacks an archive into a home that does not exist yet (or is empty), refusing any
member that is not a plain file or directory inside it (tar's ``data`` filter), checks every
member against ``BACKUP.json`` and the restored audit chain, and only then moves the home into
place; on any failure nothing is left behind. The archive holds the fleet CA key, the release
key and the bundle encryption key: keep it encrypted and offline.

Agents need nothing after a restore: they report the release they hold, and a control plane
restored from an older backup re-issues releases above it (``control_plane/releases.py``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import sqlite3
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from control_plane.config import ControlPlaneConfig
from control_plane.domain.audit_chain import verify_chain
from control_plane.storage import open_store
from control_plane.storage.segment_files import SegmentFiles, segment_dir
from fleetcore import strict_json
from fleetcore.errors import AlreadyExistsError, InvalidInputError

__all__ = ["BACKUP_MANIFEST", "BackupSummary", "backup", "restore"]

BACKUP_MANIFEST = "BACKUP.json"
FORMAT = "edgefleet.backup/v1"
SKIPPED_DIRS = ("retrain", "tmp")
MAX_MANIFEST_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class BackupSummary:
    path: Path
    files: int
    bytes: int
    audit_entries: int
    audit_head: str


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _audit_head(database: Path) -> tuple[int, str]:
    store = open_store(database)
    try:
        chain = store.audit_chain()
    finally:
        store.close()
    verdict = verify_chain(chain)
    if not verdict.ok:
        raise InvalidInputError(f"the audit chain is broken at entry {verdict.first_bad_seq}: "
                                f"{verdict.reason}")
    return len(chain), chain[-1].hash if chain else ""


def _members(home: Path, database: Path) -> list[Path]:
    live = {database, database.with_name(database.name + "-wal"),
            database.with_name(database.name + "-shm")}
    segments = segment_dir(database)  # appended to while it serves: copied apart
    out = []
    for path in sorted(home.rglob("*")):
        rel = path.relative_to(home)
        if rel.parts[0] in SKIPPED_DIRS or path in live or path.is_relative_to(segments):
            continue
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise InvalidInputError(f"{path} is not a plain file or directory; not backed up")
        out.append(path)
    return out


def backup(home: Path, out: Path, *, now: dt.datetime | None = None) -> BackupSummary:
    """Write a consistent archive of ``home`` to ``out`` (see the module doc)."""
    home = Path(home).resolve()
    cfg = ControlPlaneConfig.load(home)
    if cfg.database_url:
        raise InvalidInputError("this home's database is a PostgreSQL server; back the home up "
                                "with its files and the database with pg_dump (control-plane "
                                "backup copies SQLite homes only)")
    database = cfg.database.resolve()
    if not database.is_relative_to(home):
        raise InvalidInputError(f"the database {database} is outside the home; back it up "
                                "with the database's own tools")
    out = Path(out).resolve()
    if out.is_relative_to(home):
        raise InvalidInputError("write the backup outside the home it backs up")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".edgefleet-backup-") as tmp:
        db_copy = Path(tmp) / database.name
        source = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
        target = sqlite3.connect(db_copy)
        try:
            source.backup(target)  # a consistent snapshot while the control plane writes
        finally:
            target.close()
            source.close()
        # The telemetry segment files after the snapshot: they only grow, so every segment
        # the snapshot's rows point at is in the copies.
        segments = segment_dir(database)
        seg_copy = Path(tmp) / "segments"
        live_segments = SegmentFiles(segments)
        try:
            live_segments.snapshot(seg_copy)
        finally:
            live_segments.close()
        entries, head = _audit_head(db_copy)
        files: dict[str, dict[str, Any]] = {}
        members = [(p, str(p.relative_to(home))) for p in _members(home, database)]
        members.append((db_copy, str(database.relative_to(home))))
        if any(seg_copy.iterdir()):
            seg_name = segments.relative_to(home)
            members.append((seg_copy, str(seg_name)))
            members += [(p, str(seg_name / p.name)) for p in sorted(seg_copy.iterdir())]
        for path, name in members:
            if path.is_file():
                files[name] = {"sha256": _sha256(path), "size": path.stat().st_size}
        manifest = {
            "format": FORMAT,
            "created": (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "database": str(database.relative_to(home)),
            "audit": {"entries": entries, "head": head},
            "files": files,
        }
        manifest_path = Path(tmp) / BACKUP_MANIFEST
        manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        partial = Path(tmp) / "backup.tar.gz"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            tar.add(manifest_path, arcname=BACKUP_MANIFEST, recursive=False)
            for path, name in members:
                tar.add(path, arcname=name, recursive=False)
        os.replace(partial, out)
    size = sum(f["size"] for f in files.values())
    return BackupSummary(out, len(files), size, entries, head)


def restore(archive: Path, home: Path) -> BackupSummary:
    """Unpack ``archive`` into the new home ``home`` after checking it (see the module doc)."""
    home = Path(home).resolve()
    if home.exists() and any(home.iterdir()):
        raise AlreadyExistsError(f"{home} is not empty: restore into a new home")
    home.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home.parent, prefix=".edgefleet-restore-") as tmp:
        staging = Path(tmp) / "home"
        staging.mkdir(mode=0o700)
        try:
            with tarfile.open(archive, mode="r:gz") as tar:
                # The data filter refuses absolute names, "..", links out of the tree, devices
                # and other special files, and drops setuid/group-write bits.
                tar.extractall(staging, filter="data")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise InvalidInputError(f"{archive} is not a usable backup: {exc}") from None
        manifest = _load_manifest(staging)
        _check_files(staging, manifest)
        entries, head = _audit_head(staging / manifest["database"])
        if (entries, head) != (manifest["audit"]["entries"], manifest["audit"]["head"]):
            raise InvalidInputError("the restored audit chain does not match the backup's head")
        (staging / BACKUP_MANIFEST).unlink()
        (staging / "tmp").mkdir(mode=0o700, exist_ok=True)
        if home.exists():
            home.rmdir()
        shutil.move(staging, home)
    files = manifest["files"]
    return BackupSummary(home, len(files), sum(f["size"] for f in files.values()), entries,
                         head)


def _load_manifest(staging: Path) -> dict[str, Any]:
    path = staging / BACKUP_MANIFEST
    if not path.is_file() or path.stat().st_size > MAX_MANIFEST_BYTES:
        raise InvalidInputError(f"the archive has no usable {BACKUP_MANIFEST}")
    doc = strict_json.loads(path.read_bytes(), what=BACKUP_MANIFEST, max_bytes=MAX_MANIFEST_BYTES)
    if (not isinstance(doc, dict) or doc.get("format") != FORMAT
            or not isinstance(doc.get("files"), dict) or not isinstance(doc.get("audit"), dict)
            or not isinstance(doc.get("database"), str)):
        raise InvalidInputError(f"{BACKUP_MANIFEST} is not an {FORMAT} manifest")
    return doc


def _check_files(staging: Path, manifest: dict[str, Any]) -> None:
    on_disk = {str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file()}
    listed = set(manifest["files"]) | {BACKUP_MANIFEST}
    if on_disk != listed:
        raise InvalidInputError(f"the archive's files differ from its manifest: unlisted "
                                f"{sorted(on_disk - listed)[:5]}, missing "
                                f"{sorted(listed - on_disk)[:5]}")
    for name, entry in manifest["files"].items():
        path = staging / name
        if (not isinstance(entry, dict) or path.stat().st_size != entry.get("size")
                or _sha256(path) != entry.get("sha256")):
            raise InvalidInputError(f"{name} does not match the backup's manifest")
