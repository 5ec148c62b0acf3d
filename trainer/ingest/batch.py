"""One ingest of a pipeline's source into the feature store, incremental where it can be.

A source's rows form a **chain** of snapshots in the store, keyed by a digest of the
pipeline's ``[data]`` settings (``source_key``): the store's cursor for that key names the
newest snapshot and how far the source was read. An incremental read (a SQL or HTTP
watermark, a Parquet folder's file list, a stream's staged messages) makes a snapshot that
holds the parent's rows followed by the new ones (the last ``window`` rows, when set), with
the parent recorded; a full read (no watermark) makes a snapshot of what it read, and an
unchanged source gives back the snapshot it gave before. The cursor is written in the same
transaction as the snapshot, so a crash leaves the chain where it was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fleetcore.errors import InvalidInputError
from trainer.config import DataSettings
from trainer.ingest import urls
from trainer.ingest.base import Batch, digest_of
from trainer.ingest.table import Encoding, TableSpec, build_table, columns_from_rows
from trainer.sources import RawTable
from trainer.store import FeatureStore, Snapshot

__all__ = ["INCREMENTAL", "ingest_source", "source_key", "spec_of", "table_from_columns"]

# source kinds whose reads continue where the last one stopped
INCREMENTAL = ("parquet", "stream")
# [data] keys that define a chain: change one and the rows no longer fit the old snapshots
_CHAIN_KEYS = ("source", "task", "label", "pii", "pii_action", "region", "features",
               "categorical", "timestamp", "impute", "window", "query", "table", "watermark",
               "records", "stream")


def source_key(d: DataSettings) -> str:
    return digest_of({k: getattr(d, k) for k in _CHAIN_KEYS})


def spec_of(d: DataSettings) -> TableSpec:
    assert d.label is not None
    return TableSpec(task=d.task, label=d.label, pii=tuple(d.pii),
                     features=tuple(d.features) if d.features else None,
                     categorical=tuple(d.categorical), timestamp=d.timestamp,
                     exclude=(d.watermark,) if d.watermark and d.watermark != d.timestamp
                     and not (d.features and d.watermark in d.features) else (),
                     impute={str(k): str(v) for k, v in d.impute.items()})


def needed_columns(d: DataSettings) -> list[str] | None:
    """The columns a reader must fetch (None: all of them)."""
    if not d.features:
        return None
    extra = [d.label, *d.pii, *d.categorical, d.timestamp, d.watermark]
    return list(dict.fromkeys([*d.features, *(c for c in extra if c)]))


def _is_incremental(kind: str, d: DataSettings) -> bool:
    return kind in INCREMENTAL or d.watermark is not None


def read(d: DataSettings, base_dir: Path, cursor: dict[str, Any] | None) -> Batch:
    kind = urls.check_source(d.source)
    if kind == "sql":
        from trainer.ingest.sql import read_sql
        return read_sql(d.source, query=d.query, table=d.table, watermark=d.watermark,
                        password_env=d.password_env, cursor=cursor, max_rows=d.max_rows,
                        max_bytes=d.max_bytes, max_columns=d.max_columns,
                        timeout_s=d.timeout_s)
    if kind == "parquet":
        from trainer.ingest.parquet import read_parquet
        path = Path(d.source.partition(":")[2])
        return read_parquet(path if path.is_absolute() else (base_dir / path).resolve(),
                            needed=needed_columns(d), cursor=cursor, max_rows=d.max_rows,
                            max_bytes=d.max_bytes, max_columns=d.max_columns,
                            max_files=d.max_pages)
    if kind == "http":
        from trainer.ingest.http import read_http
        return read_http(d.source, records=d.records, next_path=d.next,
                         page_param=d.page_param, page_start=d.page_start,
                         headers={str(k): str(v) for k, v in d.headers.items()},
                         watermark=d.watermark, watermark_param=d.watermark_param,
                         cursor=cursor, max_rows=d.max_rows, max_bytes=d.max_bytes,
                         max_columns=d.max_columns, timeout_s=d.timeout_s,
                         max_pages=d.max_pages)
    raise InvalidInputError(f"data source {urls.redact(d.source)!r}: a {kind} source is not "
                            "read in batches here")


def table_from_columns(d: DataSettings, columns: Mapping[str, Any], *, where: str, digest: str,
                       parent: Snapshot | None, pseudonymized: bool = False) -> RawTable:
    """The RawTable of new rows, encoded to extend ``parent`` (rows ordered by timestamp)."""
    prior = Encoding.from_json(parent.encoding) if parent is not None else None
    table, _, stamps = build_table(columns, spec_of(d), where=where, source=urls.redact(
        d.source), source_digest=digest, prior=prior,
        prior_labels=parent.labels if parent is not None else ())
    if stamps is not None and len(stamps) > 1:
        order = np.argsort(stamps, kind="stable")
        table = dataclasses.replace(table, X=table.X[order], y=table.y[order],
                                    pii={k: v[order] for k, v in table.pii.items()})
    return dataclasses.replace(table, pii_pseudonymized=pseudonymized)


def ingest_source(store: FeatureStore, d: DataSettings, base_dir: Path,
                  progress: Callable[[str], None]) -> Snapshot:
    """Read what is new in the source and record it (see the module docstring)."""
    kind = urls.check_source(d.source)
    key = source_key(d)
    where = f"data source {urls.redact(d.source)}"
    found = store.cursor(key)
    parent = store.get(found[0]) if found else None
    if kind == "stream":
        snap = cut_inbox(store, d, key)
        if snap is not None:
            return snap
        if parent is None:
            raise InvalidInputError(f"{where}: no rows yet; run `trainer ingest --follow "
                                    "PIPELINE.toml --workdir DIR` to consume the stream")
        progress(f"[ingest] no new stream rows; snapshot {parent.id} stays current")
        return parent
    incremental = _is_incremental(kind, d)
    batch = read(d, base_dir, found[1] if (found and incremental) else None)
    if parent is not None and (batch.rows == 0 or (not incremental and found is not None
                                                   and found[1].get("digest") == batch.digest)):
        progress(f"[ingest] no new rows in {urls.redact(d.source)}; snapshot {parent.id} "
                 "stays current")
        return parent
    if batch.rows == 0:
        raise InvalidInputError(f"{where}: no rows")
    table = table_from_columns(d, batch.columns, where=where, digest=batch.digest,
                               parent=parent if incremental else None)
    now = datetime.now(UTC)
    origin = {**batch.lineage, "source": urls.redact(d.source), "rows_new": batch.rows,
              "ingest_time": now.isoformat()}
    cursor = batch.cursor if incremental else {"digest": batch.digest}
    return store.ingest(table, region=d.region, pii_action=d.pii_action,
                        parent=parent.id if parent is not None else None,
                        extend=incremental and parent is not None, window=d.window,
                        cursor=(key, cursor), origin=origin, now=now)


def cut_inbox(store: FeatureStore, d: DataSettings, key: str) -> Snapshot | None:
    """A snapshot of the stream rows staged since the last one (None when there are none)."""
    batch = store.inbox(key)
    if batch is None:
        return None
    found = store.cursor(key)
    parent = store.get(found[0]) if found else None
    where = f"data source {urls.redact(d.source)}"
    columns = columns_from_rows(batch.rows, where=where, max_columns=d.max_columns)
    digest = digest_of(key, batch.upto, batch.messages, batch.positions)
    table = table_from_columns(d, columns, where=where, digest=digest, parent=parent,
                               pseudonymized=True)
    now = datetime.now(UTC)
    position = {"messages": batch.messages + int((found[1] if found else {}).get("messages", 0))}
    if batch.positions is not None:
        position["position"] = batch.positions[1]
    origin = {"kind": "stream", "source": urls.redact(d.source), "rows_new": len(batch.rows),
              "messages": batch.messages, "malformed": batch.malformed,
              "oversized": batch.oversized, "received": list(batch.received),
              "positions": list(batch.positions) if batch.positions else None,
              "ingest_time": now.isoformat()}
    return store.ingest(table, region=d.region, pii_action=d.pii_action,
                        parent=parent.id if parent else None, extend=parent is not None,
                        window=d.window, cursor=(key, position), inbox=(key, batch.upto),
                        origin=origin, now=now)
