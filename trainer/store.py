"""The trainer's feature store: immutable, content-addressed snapshots of ingested data.

Layout of a store directory (0700)::

    catalog.db        SQLite catalog: one row per snapshot (region, lineage, transform)
    data/<hex>.npz    the snapshot's arrays, uncompressed NumPy archive, no pickles
    store.key         32 random bytes (0600): the HMAC key that pseudonymizes PII
    policy.toml       allowed_regions = ["eu-west-1", ...]; "*" allows any region
                      (read and checked by fleetcore.regions, the one policy parser)

A snapshot's id is ``sha256:<hex>`` over a canonical encoding of everything a model could learn
from it (features, labels, pseudonymized PII, image shape) and of its region, transform settings
and parent; the ingest time and the source's name are lineage, not content, so re-ingesting the
same data returns the existing snapshot. ``get`` recomputes the id from the data file and the
catalog row, so an edited file or a relabelled region is refused rather than trained on.

PII columns are pseudonymized (fleetcore.pseudonym: HMAC-SHA256 under the store key, hex) or
dropped before anything is hashed or written: raw values never reach ``data/`` or the catalog.
Data files are stored uncompressed on purpose, so a leak would be visible to a byte scan (the
tests do one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import secrets
import sqlite3
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from fleetcore import regions, tomlfile
from fleetcore.errors import InvalidInputError, NotFoundError
from fleetcore.files import atomic_write, ensure_private_dir
from fleetcore.pseudonym import pseudonymize_all
from fleetcore.sqlite import connect, migrate
from trainer.sources import RawTable

__all__ = [
    "ANY_REGION",
    "FeatureStore",
    "PiiAction",
    "RegionNotAllowedError",
    "Snapshot",
]

log = logging.getLogger(__name__)

ANY_REGION = regions.ANY_REGION
KEY_BYTES = 32
_ID_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
_ID_DOMAIN = b"edgefleet.feature-store.snapshot.v1"

_MIGRATIONS = [
    """
    CREATE TABLE snapshots (
        id            TEXT PRIMARY KEY,
        region        TEXT NOT NULL,
        rows          INTEGER NOT NULL,
        source        TEXT NOT NULL,
        source_digest TEXT NOT NULL,
        ingested_at   TEXT NOT NULL,
        transform     TEXT NOT NULL,   -- JSON: {"pii": [names], "pii_action": "hmac"|"drop"}
        parent        TEXT REFERENCES snapshots(id)
    );
    CREATE INDEX snapshots_ingested_at ON snapshots(ingested_at);
    """,
    # 2: where rows came from beyond the source name: for device samples, each device and
    # the model version that served the rows (lineage, not content: not part of the id).
    """
    ALTER TABLE snapshots ADD COLUMN origin TEXT NOT NULL DEFAULT '{}';
    """,
    # 3: incremental and continuous ingest (trainer.ingest). A cursor records, per source
    # (a digest of the pipeline's [data] settings), the newest snapshot of its chain and how
    # far the source was read (watermark, files, stream positions); it is written in the same
    # transaction as that snapshot. The inbox holds stream rows that are durable but not yet in
    # a snapshot (PII already pseudonymized); inbox_seen the recent message keys, so that a
    # message redelivered after a crash is not staged twice.
    """
    CREATE TABLE cursors (
        source_key TEXT PRIMARY KEY,
        snapshot   TEXT NOT NULL REFERENCES snapshots(id),
        cursor     TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE inbox (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        source_key  TEXT NOT NULL,
        rows        TEXT NOT NULL,   -- JSON list of row objects
        position    INTEGER,         -- the stream's sequence number, where it has one
        received_at TEXT NOT NULL
    );
    CREATE INDEX inbox_source ON inbox(source_key, id);
    CREATE TABLE inbox_seen (
        source_key TEXT NOT NULL,
        key        TEXT NOT NULL,
        id         INTEGER NOT NULL,
        PRIMARY KEY (source_key, key)
    );
    CREATE INDEX inbox_seen_id ON inbox_seen(source_key, id);
    CREATE TABLE inbox_counts (
        source_key TEXT PRIMARY KEY,
        malformed  INTEGER NOT NULL DEFAULT 0,
        oversized  INTEGER NOT NULL DEFAULT 0
    );
    """,
]
SEEN_KEEP = 100_000  # message keys kept per source for redelivery checks


class RegionNotAllowedError(InvalidInputError):
    """A snapshot's region is outside the store's data-locality policy."""


class PiiAction(StrEnum):
    """What ingest does with a PII column."""

    HMAC = "hmac"  # replace each value by hex HMAC-SHA256 under the store key
    DROP = "drop"  # leave the column out of the snapshot


@dataclass(frozen=True, eq=False)  # eq=False: numpy arrays do not compare to a single bool
class Snapshot:
    """One immutable snapshot; arrays are read-only."""

    id: str  # "sha256:<hex>" content address
    region: str
    feature_names: list[str]
    X: np.ndarray  # float32 [n, features], raw values
    y: np.ndarray  # int64 class ids [n] (classification) or float64 values [n] (regression)
    labels: list[str]  # class names; empty for regression
    pii: dict[str, np.ndarray]  # hex HMAC strings (hmac mode); empty in drop mode
    pii_action: str  # a PiiAction value
    image_shape: tuple[int, int] | None
    schema: dict[str, Any]
    stats: dict[str, Any]
    lineage: dict[str, Any]
    target: str | None = None  # regression: the label column's name
    encoding: dict[str, Any] | None = None  # categorical vocabularies, imputed fill values

    @property
    def task(self) -> str:
        return "regression" if self.target is not None else "classification"


@dataclass(frozen=True)
class InboxBatch:
    """Rows staged from a stream and not yet in a snapshot."""

    rows: list[dict[str, Any]]
    upto: int  # the last inbox id included
    messages: int
    positions: tuple[int, int] | None  # first and last stream position, where there are any
    received: tuple[str, str]  # first and last receive time
    malformed: int
    oversized: int


# --- pure core: validation, pseudonymization, content id, schema and statistics -------------


@dataclass(frozen=True, eq=False)
class _Content:
    """Exactly what a snapshot id covers."""

    feature_names: list[str]
    X: np.ndarray
    y: np.ndarray
    labels: list[str]
    pii_names: list[str]  # every PII column, kept or dropped, in source order
    pii: dict[str, np.ndarray]  # pseudonymized values; empty when dropped
    image_shape: tuple[int, int] | None
    region: str
    pii_action: str
    parent: str | None
    target: str | None = None  # regression only
    encoding: dict[str, Any] | None = None

    def transform(self) -> dict[str, Any]:
        return {"pii": list(self.pii_names), "pii_action": self.pii_action}


def _check_id(snapshot_id: str) -> str:
    """Return the hex part of a well-formed id (it names a file, so nothing else gets through)."""
    m = _ID_RE.match(snapshot_id) if isinstance(snapshot_id, str) else None
    if m is None:
        raise InvalidInputError(f"snapshot id {snapshot_id!r}: expected 'sha256:<64 hex digits>'")
    return m.group(1)


def _check_table(table: RawTable) -> tuple[np.ndarray, np.ndarray]:
    """Validate a RawTable's shapes, dtypes and values; return X and y in canonical form."""
    X = np.asarray(table.X)
    y = np.asarray(table.y)
    if X.ndim != 2 or X.shape[1] != len(table.feature_names):
        raise InvalidInputError(
            f"X has shape {X.shape}; expected [rows, {len(table.feature_names)}]"
        )
    n = X.shape[0]
    if n == 0:
        raise InvalidInputError("the table has no rows")
    regression = table.target is not None
    if regression and table.labels:
        raise InvalidInputError("a regression table has a target and no class labels")
    if X.dtype.kind not in "fiu" or y.dtype.kind not in ("fiu" if regression else "iu"):
        raise InvalidInputError(f"X must be numeric and y {'numeric' if regression else 'integer'}"
                                f"; got {X.dtype} and {y.dtype}")
    if y.shape != (n,):
        raise InvalidInputError(f"y has shape {y.shape}; expected [{n}]")
    X = np.ascontiguousarray(X, dtype="<f4")
    if not np.isfinite(X).all():
        raise InvalidInputError("X holds NaN or infinite values")
    y = _check_labels(table, y)
    for what, names in (("column", [*table.feature_names, *table.pii]), ("label", table.labels)):
        if len(set(names)) != len(names) or not all(isinstance(s, str) and s for s in names):
            raise InvalidInputError(f"{what} names must be unique non-empty strings: {names}")
    for name, values in table.pii.items():
        if np.asarray(values).shape != (n,):
            raise InvalidInputError(f"PII column {name!r} does not have {n} values")
    if table.image_shape is not None:
        shape = tuple(table.image_shape)
        if len(shape) != 2 or int(shape[0]) * int(shape[1]) != X.shape[1]:
            raise InvalidInputError(
                f"image shape {table.image_shape} does not fit {X.shape[1]} features"
            )
    return X, np.ascontiguousarray(y, dtype="<f8" if regression else "<i8")


def _check_labels(table: RawTable, y: np.ndarray) -> np.ndarray:
    """Regression: finite values and a target name; classification: ids of known classes."""
    if table.target is not None:
        y = np.ascontiguousarray(y, dtype="<f8")
        if not np.isfinite(y).all():
            raise InvalidInputError("y holds NaN or infinite values")
        if not (isinstance(table.target, str) and table.target):
            raise InvalidInputError("the regression target needs a non-empty name")
    elif int(y.min()) < 0 or int(y.max()) >= len(table.labels):
        raise InvalidInputError(
            f"y holds class ids in [{int(y.min())}, {int(y.max())}]; "
            f"expected [0, {len(table.labels) - 1}]"
        )
    return y


def _image_shape(shape: Sequence[int] | None) -> tuple[int, int] | None:
    return (int(shape[0]), int(shape[1])) if shape else None


def _pseudonymize(key: bytes, values: np.ndarray) -> np.ndarray:
    """fleetcore.pseudonym over a column, as a fixed-width string array (no pickles)."""
    return np.array(pseudonymize_all(key, values.tolist()), dtype="<U64")


def _content_id(c: _Content) -> str:
    """SHA-256 over length-prefixed parts: a JSON header, then the raw array bytes."""
    header = {
        "feature_names": c.feature_names,
        "labels": c.labels,
        "image_shape": list(c.image_shape) if c.image_shape else None,
        "region": c.region,
        "transform": c.transform(),
        "parent": c.parent,
        "rows": int(c.X.shape[0]),
        "pii_kept": list(c.pii),
    }
    if c.target is not None:  # only then: classification ids stay what they were
        header["target"] = c.target
    if c.encoding:  # only then: snapshots without categories or imputation keep their ids
        header["encoding"] = c.encoding
    parts = [
        _ID_DOMAIN,
        json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(),
        np.ascontiguousarray(c.X, dtype="<f4").tobytes(),
        np.ascontiguousarray(c.y, dtype="<i8" if c.target is None else "<f8").tobytes(),
        *(json.dumps(c.pii[name].tolist(), ensure_ascii=False).encode() for name in c.pii),
    ]
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return "sha256:" + h.hexdigest()


def _schema(c: _Content) -> dict[str, Any]:
    return {
        "features": [{"name": n, "dtype": "float32", "pii": False} for n in c.feature_names],
        "pii": [{"name": n, "action": c.pii_action} for n in c.pii_names],
        "label": {"dtype": "int64", "classes": list(c.labels)} if c.target is None
        else {"dtype": "float64", "target": c.target},
        **({"encoding": c.encoding} if c.encoding else {}),
        "rows": int(c.X.shape[0]),
    }


def _stats(c: _Content) -> dict[str, Any]:
    # float64 accumulators, without a float64 copy of X
    fill = (c.encoding or {}).get("fill", {})
    mins, maxs = c.X.min(0), c.X.max(0)
    means, stds = c.X.mean(0, dtype=np.float64), c.X.std(0, dtype=np.float64)
    if c.target is None:
        counts = np.bincount(c.y, minlength=len(c.labels))
        labels: dict[str, Any] = {
            "class_counts": {label: int(counts[k]) for k, label in enumerate(c.labels)}}
    else:
        labels = {"target": {"min": float(c.y.min()), "max": float(c.y.max()),
                             "mean": float(c.y.mean()), "std": float(c.y.std())}}
    return {
        "features": {
            name: {
                "min": float(mins[i]),
                "max": float(maxs[i]),
                "mean": float(means[i]),
                "std": float(stds[i]),
                "missing": 0,  # missing values are refused or imputed before this point
                **({"imputed_with": fill[name]} if name in fill else {}),
            }
            for i, name in enumerate(c.feature_names)
        },
        **labels,
    }


def _extend(parent: Snapshot, new: _Content, window: int | None) -> _Content:
    """``parent``'s rows followed by ``new``'s (the last ``window`` of them, when set)."""
    if list(parent.feature_names) != list(new.feature_names) or parent.target != new.target \
            or set(parent.pii) != set(new.pii) or parent.pii_action != new.pii_action:
        raise InvalidInputError(
            f"the new rows do not fit snapshot {parent.id}: its features, label or PII columns "
            "differ; a changed table starts a new chain (change the pipeline's [data] settings "
            "or use a new store)")
    if new.target is None:
        missing = sorted(set(parent.labels) - set(new.labels))
        if missing:
            raise InvalidInputError(f"the new rows' classes lack {missing} of snapshot {parent.id}")
        remap = np.array([new.labels.index(c) for c in parent.labels], dtype=np.int64)
        parent_y = remap[parent.y] if len(parent.y) else parent.y.astype("<i8")
    else:
        parent_y = parent.y
    X = np.concatenate([parent.X, new.X]).astype("<f4")
    y = np.concatenate([parent_y, new.y]).astype(new.y.dtype)
    pii = {name: np.concatenate([parent.pii[name], new.pii[name]]).astype("<U64")
           for name in new.pii}
    if window is not None and len(y) > window:
        X, y = X[-window:], y[-window:]
        pii = {name: v[-window:] for name, v in pii.items()}
    return dataclasses.replace(new, X=np.ascontiguousarray(X), y=np.ascontiguousarray(y), pii=pii)


def _freeze(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def _to_snapshot(snapshot_id: str, c: _Content, lineage: dict[str, Any]) -> Snapshot:
    return Snapshot(
        id=snapshot_id,
        region=c.region,
        feature_names=list(c.feature_names),
        X=_freeze(c.X),
        y=_freeze(c.y),
        labels=list(c.labels),
        pii={name: _freeze(v) for name, v in c.pii.items()},
        pii_action=c.pii_action,
        image_shape=c.image_shape,
        schema=_schema(c),
        stats=_stats(c),
        lineage=lineage,
        target=c.target,
        encoding=c.encoding,
    )


def _encode_npz(c: _Content) -> bytes:
    # Strings go in as fixed-width unicode arrays so that loading never needs pickle; PII
    # columns are stored by position, their names in pii_kept (names are not safe zip members).
    arrays: dict[str, np.ndarray] = {
        "X": c.X,
        "y": c.y,
        "feature_names": np.array(c.feature_names, dtype=str),
        "labels": np.array(c.labels, dtype=str),
        "image_shape": np.array(c.image_shape or (), dtype="<i8"),
        "pii_kept": np.array(list(c.pii), dtype=str),
    }
    if c.target is not None:
        arrays["target"] = np.array([c.target], dtype=str)
    if c.encoding:
        arrays["encoding"] = np.array([json.dumps(c.encoding, sort_keys=True)], dtype=str)
    for k, name in enumerate(c.pii):
        arrays[f"pii_{k}"] = c.pii[name]
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays)
    return buf.getvalue()


def _decode_npz(data: Mapping[str, np.ndarray], row: sqlite3.Row) -> _Content:
    """Rebuild a snapshot's content from its data file and catalog row (dtypes checked)."""
    transform = json.loads(row["transform"])
    X, y = data["X"], data["y"]
    feature_names = [str(s) for s in data["feature_names"].tolist()]
    target = [str(s) for s in data["target"].tolist()] if "target" in data else None
    if target is not None and len(target) != 1:
        raise ValueError("the target name is not one string")
    want_y = "<i8" if target is None else "<f8"
    if X.dtype != np.dtype("<f4") or y.dtype != np.dtype(want_y):
        raise ValueError(f"arrays of {X.dtype} and {y.dtype}, expected float32 and {want_y}")
    if X.ndim != 2 or y.shape != (X.shape[0],) or X.shape[1] != len(feature_names):
        raise ValueError(f"arrays of shapes {X.shape} and {y.shape} do not fit together")
    shape = [int(v) for v in data["image_shape"].tolist()]
    kept = [str(s) for s in data["pii_kept"].tolist()]
    pii: dict[str, np.ndarray] = {}
    for k, name in enumerate(kept):
        values = data[f"pii_{k}"]
        if values.dtype.kind != "U" or values.shape != y.shape:
            raise ValueError(f"PII column {name!r} is not {y.shape[0]} strings")
        pii[name] = values
    encoding = None
    if "encoding" in data:
        (text,) = [str(s) for s in data["encoding"].tolist()]
        encoding = json.loads(text)
        if not isinstance(encoding, dict):
            raise ValueError("the encoding is not an object")
    return _Content(
        encoding=encoding,
        feature_names=feature_names,
        X=X,
        y=y,
        labels=[str(s) for s in data["labels"].tolist()],
        pii_names=[str(s) for s in transform["pii"]],
        pii=pii,
        image_shape=(shape[0], shape[1]) if len(shape) == 2 else None,
        region=row["region"],
        pii_action=str(transform["pii_action"]),
        parent=row["parent"],
        target=target[0] if target else None,
    )


def _lineage(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "source": row["source"],
        "source_digest": row["source_digest"],
        "ingested_at": row["ingested_at"],
        "transform": json.loads(row["transform"]),
        "parent": row["parent"],
        "origin": json.loads(row["origin"]),
    }


def _utc_iso(now: datetime) -> str:
    if now.tzinfo is None:
        raise InvalidInputError(f"ingest time {now!r} has no time zone")
    return now.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


# --- the shell: files, key, policy and catalog -------------------------------------------------


class FeatureStore:
    """A directory of snapshots with a SQLite catalog, an HMAC key and a region policy."""

    def __init__(self, path: Path, *, allowed_regions: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        self.data_dir = self.path / "data"
        self.key_path = self.path / "store.key"
        self.policy_path = self.path / regions.POLICY_FILE
        ensure_private_dir(self.path)
        ensure_private_dir(self.data_dir)
        self._allowed = self._load_or_create_policy(allowed_regions)
        self._conn = connect(self.path / "catalog.db")
        try:
            migrate(self._conn, _MIGRATIONS)
            self._key = self._load_or_create_key()
        except BaseException:
            self._conn.close()
            raise

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def allowed_regions(self) -> list[str]:
        return list(self._allowed)

    # -- policy and key --

    def _load_or_create_policy(self, requested: Sequence[str] | None) -> list[str]:
        wanted = (
            None if requested is None else regions.check_regions(list(requested), "allowed_regions")
        )
        if not self.policy_path.exists():
            policy = wanted if wanted is not None else [ANY_REGION]
            tomlfile.write(self.policy_path, {"allowed_regions": policy})
            return policy
        policy = regions.read_policy_file(self.policy_path)
        if wanted is not None and sorted(set(wanted)) != sorted(set(policy)):
            raise InvalidInputError(
                f"store {self.path} allows regions {policy}, not {wanted}; the policy belongs "
                f"to the store's owner: edit {self.policy_path} to change it"
            )
        return policy

    def _load_or_create_key(self) -> bytes:
        try:
            key = self.key_path.read_bytes()
        except FileNotFoundError:
            (count,) = self._conn.execute("SELECT COUNT(*) FROM snapshots").fetchone()
            if count:
                # A new key would pseudonymize the same people differently from then on.
                raise InvalidInputError(
                    f"{self.key_path} is missing but the store holds {count} snapshot(s); "
                    "restore the key file rather than creating a new one"
                ) from None
            return _create_key(self.key_path)
        if len(key) != KEY_BYTES:
            raise InvalidInputError(
                f"{self.key_path}: {len(key)} bytes; expected a {KEY_BYTES}-byte key"
            )
        return key

    # -- snapshots --

    def ingest(
        self,
        table: RawTable,
        *,
        region: str,
        pii_action: str = "hmac",
        parent: str | None = None,
        now: datetime | None = None,
        origin: Mapping[str, Any] | None = None,
        extend: bool = False,
        window: int | None = None,
        cursor: tuple[str, Mapping[str, Any]] | None = None,
        inbox: tuple[str, int] | None = None,
    ) -> Snapshot:
        """Store ``table`` as a snapshot (or return the identical one stored before).

        ``origin``: lineage beyond the source name (for device samples: which devices, on
        which model versions; for ingested sources: the query digest, watermark or stream
        range, row counts); JSON-ready, kept in the catalog, not part of the id.

        ``extend``: the snapshot holds ``parent``'s rows followed by ``table``'s (an
        incremental read), keeping only the last ``window`` rows when set. ``cursor`` =
        (source key, position) and ``inbox`` = (source key, last inbox id consumed) are
        recorded in the same transaction as the snapshot: a crash leaves both or neither."""
        ingested_at = _utc_iso(now if now is not None else datetime.now(UTC))
        regions.check_region(region, "region")
        try:
            action = PiiAction(pii_action)
        except ValueError:
            raise InvalidInputError(
                f"pii_action {pii_action!r}: expected one of {[a.value for a in PiiAction]}"
            ) from None
        if parent is not None:
            _check_id(parent)
            if self._row(parent) is None:
                raise NotFoundError(f"parent snapshot {parent} is not in store {self.path}")
        if extend and parent is None:
            raise InvalidInputError("an extending snapshot needs a parent")
        X, y = _check_table(table)
        # PII is transformed first: nothing below ever sees a raw value.
        pii = (
            {name: (np.asarray(v, dtype="<U64") if table.pii_pseudonymized
                    else _pseudonymize(self._key, np.asarray(v)))
             for name, v in table.pii.items()}
            if action is PiiAction.HMAC
            else {}
        )
        content = _Content(
            feature_names=list(table.feature_names),
            X=X,
            y=y,
            labels=list(table.labels),
            pii_names=list(table.pii),
            pii=pii,
            image_shape=_image_shape(table.image_shape),
            region=region,
            pii_action=action.value,
            parent=parent,
            target=table.target,
            encoding=table.encoding or None,
        )
        if extend:
            assert parent is not None
            content = _extend(self.get(parent), content, window)
        snapshot_id = _content_id(content)
        hex_id = _check_id(snapshot_id)
        exists = self._row(snapshot_id) is not None
        if not exists:
            atomic_write(self.data_dir / f"{hex_id}.npz", _encode_npz(content), mode=0o600)
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            # ON CONFLICT: a concurrent ingest of the same data wrote the same bytes; first
            # row wins.
            self._conn.execute(
                "INSERT INTO snapshots (id, region, rows, source, source_digest, ingested_at,"
                " transform, parent, origin) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(id) DO NOTHING",
                (snapshot_id, region, int(content.X.shape[0]), table.source,
                 table.source_digest, ingested_at,
                 json.dumps(content.transform(), sort_keys=True), parent,
                 json.dumps(dict(origin or {}), sort_keys=True, default=str)),
            )
            if cursor is not None:
                self._conn.execute(
                    "INSERT INTO cursors (source_key, snapshot, cursor, updated_at)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT(source_key) DO UPDATE SET"
                    " snapshot = excluded.snapshot, cursor = excluded.cursor,"
                    " updated_at = excluded.updated_at",
                    (cursor[0], snapshot_id, json.dumps(dict(cursor[1]), sort_keys=True,
                                                        default=str), ingested_at))
            if inbox is not None:
                self._conn.execute("DELETE FROM inbox WHERE source_key = ? AND id <= ?", inbox)
                self._conn.execute("DELETE FROM inbox_counts WHERE source_key = ?",
                                   (inbox[0],))
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        if exists:
            log.info("snapshot %s exists already; not rewriting it", snapshot_id)
        else:
            log.info("ingested %s as snapshot %s (%d rows)", table.source, snapshot_id,
                     content.X.shape[0])
        return self.get(snapshot_id)

    # -- incremental state: cursors and the stream inbox --

    def cursor(self, source_key: str) -> tuple[str, dict[str, Any]] | None:
        """(newest snapshot, position) of the source's chain, or None before its first."""
        row = self._conn.execute("SELECT snapshot, cursor FROM cursors WHERE source_key = ?",
                                 (source_key,)).fetchone()
        return None if row is None else (row["snapshot"], json.loads(row["cursor"]))

    def stage(self, source_key: str,
              messages: Sequence[tuple[str | None, bool, int | None, list[dict[str, Any]]]],
              *, malformed: int = 0, oversized: int = 0, now: datetime | None = None) -> int:
        """Make stream rows durable in one transaction; returns how many messages were new.

        Each message is (key, check, position, rows): ``key`` is remembered for every message;
        with ``check``, a message whose key was staged before (a redelivery after a crash) is
        left out. Rows must carry pseudonymized PII only (trainer.ingest.follow does that
        before calling)."""
        received = _utc_iso(now if now is not None else datetime.now(UTC))
        added = 0
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            for key, check, position, rows in messages:
                if key is not None and check and self._conn.execute(
                        "SELECT 1 FROM inbox_seen WHERE source_key = ? AND key = ?",
                        (source_key, key)).fetchone():
                    continue
                cur = self._conn.execute(
                    "INSERT INTO inbox (source_key, rows, position, received_at)"
                    " VALUES (?, ?, ?, ?)",
                    (source_key, json.dumps(rows, ensure_ascii=False, separators=(",", ":")),
                     position, received))
                if key is not None:
                    self._conn.execute("INSERT OR REPLACE INTO inbox_seen (source_key, key, id)"
                                       " VALUES (?, ?, ?)", (source_key, key, cur.lastrowid))
                added += 1
            if malformed or oversized:
                self._conn.execute(
                    "INSERT INTO inbox_counts (source_key, malformed, oversized) VALUES (?,?,?)"
                    " ON CONFLICT(source_key) DO UPDATE SET malformed = malformed +"
                    " excluded.malformed, oversized = oversized + excluded.oversized",
                    (source_key, malformed, oversized))
            self._conn.execute(
                "DELETE FROM inbox_seen WHERE source_key = ? AND id <= (SELECT MAX(id) FROM"
                " inbox_seen WHERE source_key = ?) - ?", (source_key, source_key, SEEN_KEEP))
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        return added

    def inbox_rows(self, source_key: str) -> int:
        (n,) = self._conn.execute("SELECT COUNT(*) FROM inbox WHERE source_key = ?",
                                  (source_key,)).fetchone()
        return int(n)

    def inbox(self, source_key: str) -> InboxBatch | None:
        """Everything staged for the source and not yet in a snapshot (None when empty)."""
        rows: list[dict[str, Any]] = []
        found = self._conn.execute(
            "SELECT id, rows, position, received_at FROM inbox WHERE source_key = ?"
            " ORDER BY id", (source_key,)).fetchall()
        counts = self._conn.execute(
            "SELECT malformed, oversized FROM inbox_counts WHERE source_key = ?",
            (source_key,)).fetchone()
        if not found:
            return None
        positions = [r["position"] for r in found if r["position"] is not None]
        for r in found:
            rows.extend(json.loads(r["rows"]))
        return InboxBatch(rows=rows, upto=int(found[-1]["id"]), messages=len(found),
                          positions=(min(positions), max(positions)) if positions else None,
                          received=(found[0]["received_at"], found[-1]["received_at"]),
                          malformed=int(counts["malformed"]) if counts else 0,
                          oversized=int(counts["oversized"]) if counts else 0)

    def pseudonymize(self, values: Sequence[object]) -> list[str]:
        """The store's HMAC of each value (what a snapshot keeps of a PII column)."""
        return pseudonymize_all(self._key, list(values))

    def chain(self, snapshot_id: str, limit: int = 1000) -> list[dict[str, Any]]:
        """The snapshot and its ancestors, newest first, with their lineage."""
        out: list[dict[str, Any]] = []
        current: str | None = snapshot_id
        while current is not None and len(out) < limit:
            row = self._row(current)
            if row is None:
                break
            out.append({"id": row["id"], "rows": row["rows"], "region": row["region"],
                        **_lineage(row)})
            current = row["parent"]
        return out

    def get(self, snapshot_id: str) -> Snapshot:
        """Load a snapshot, refusing one whose data no longer matches its id."""
        hex_id = _check_id(snapshot_id)
        row = self._row(snapshot_id)
        if row is None:
            raise NotFoundError(f"snapshot {snapshot_id} is not in store {self.path}")
        path = self.data_dir / f"{hex_id}.npz"
        try:
            with np.load(path, allow_pickle=False) as npz:
                content = _decode_npz(npz, row)
        except FileNotFoundError:
            raise InvalidInputError(
                f"snapshot {snapshot_id}: data file {path} is missing"
            ) from None
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
            raise InvalidInputError(
                f"snapshot {snapshot_id} data does not match its id (unreadable: {exc})"
            ) from None
        if _content_id(content) != snapshot_id:
            raise InvalidInputError(
                f"snapshot {snapshot_id} data does not match its id: {path} or its catalog row "
                "was modified"
            )
        return _to_snapshot(snapshot_id, content, _lineage(row))

    def list(self) -> list[dict[str, Any]]:
        """Catalog rows, oldest first: id, region, rows, created, source, parent."""
        rows = self._conn.execute(
            "SELECT id, region, rows, ingested_at, source, parent FROM snapshots"
            " ORDER BY ingested_at, id"
        ).fetchall()
        return [
            {
                "id": r["id"],
                "region": r["region"],
                "rows": r["rows"],
                "created": r["ingested_at"],
                "source": r["source"],
                "parent": r["parent"],
            }
            for r in rows
        ]

    def check_region(self, snapshot: Snapshot) -> None:
        """Refuse a snapshot whose region the store's policy does not allow."""
        if regions.allows(self._allowed, snapshot.region):
            return
        allowed = ", ".join(repr(r) for r in self._allowed)
        raise RegionNotAllowedError(
            f"snapshot {snapshot.id} is in region {snapshot.region!r}; the policy of store "
            f"{self.path} allows {'only ' + allowed if allowed else 'no region'} "
            f"(see {self.policy_path})"
        )

    def _row(self, snapshot_id: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._conn.execute(
            "SELECT * FROM snapshots WHERE id = ?", (snapshot_id,)
        ).fetchone()
        return row


def _create_key(path: Path) -> bytes:
    """Write a fresh key, 0600 from the start, without ever replacing an existing one.

    The key goes to a temp file that is fsynced and then hard-linked into place: a crash leaves
    no key or a whole key, and two stores opening at once agree on whichever linked first.
    """
    key = secrets.token_bytes(KEY_BYTES)
    fd, tmp = tempfile.mkstemp(prefix=".store.key.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            key = path.read_bytes()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return key
