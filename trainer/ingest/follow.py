"""``trainer ingest --follow``: consume a stream continuously into the feature store.

The loop, per batch of messages fetched from the stream (trainer.ingest.streams):

1. each message is parsed with the strict JSON loader (a row object or a list of them) and
   checked against the pipeline's table (types, label, missing values); a message that fails
   is **counted and skipped**, never fatal (the count goes into the next snapshot's lineage);
2. PII columns are pseudonymized with the store's key, then the rows are **staged** in the
   store's inbox in one SQLite transaction (durable: WAL, synchronous=FULL);
3. only then are the messages **acknowledged** to the broker;
4. every ``snapshot_rows`` staged rows or ``snapshot_seconds`` seconds, the staged rows become
   a snapshot (parent: the previous one) in the same transaction that empties the inbox.

Killed at any point, nothing is lost (a message not yet staged was not acknowledged, so the
broker delivers it again) and nothing is doubled (a redelivered message that was staged is
recognised by its key: the JetStream sequence number, or for MQTT the digest of a payload the
broker marks as a redelivery). SIGTERM stops the loop after the current batch, cuts a snapshot
of what is staged and exits 0.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetcore import strict_json
from fleetcore.errors import InvalidInputError
from trainer.config import DataSettings
from trainer.ingest import urls
from trainer.ingest.batch import cut_inbox, source_key, spec_of
from trainer.ingest.table import Encoding, build_table, columns_from_rows
from trainer.store import FeatureStore

__all__ = ["FollowStats", "check_rows", "follow", "parse_message"]

FETCH_MAX = 500  # messages per fetch
MAX_ROWS_PER_MESSAGE = 10_000


@dataclass
class FollowStats:
    messages: int = 0
    rows: int = 0
    malformed: int = 0
    duplicates: int = 0
    snapshots: int = 0


def parse_message(payload: bytes, *, where: str, max_columns: int) -> list[dict[str, Any]]:
    """A message's rows (one JSON object, or a list of them); InvalidInputError otherwise."""
    doc = strict_json.loads(payload, what=where, max_bytes=max(1, len(payload)))
    rows = doc if isinstance(doc, list) else [doc]
    if not rows or len(rows) > MAX_ROWS_PER_MESSAGE:
        raise InvalidInputError(f"{where}: 1..{MAX_ROWS_PER_MESSAGE} rows per message")
    for row in rows:
        if not isinstance(row, dict) or not row or len(row) > max_columns:
            raise InvalidInputError(f"{where}: a row is not an object of 1..{max_columns} "
                                    "column values")
    return rows


def check_rows(d: DataSettings, rows: list[dict[str, Any]], where: str) -> None:
    """The rows would build a table (types, label, missing values where refused)."""
    spec = spec_of(d)
    columns = columns_from_rows(rows, where=where, max_columns=d.max_columns)
    # missing values in a column with a strategy are fine here: 0 stands in for the fill
    fill = {c: 0.0 for c in columns if spec.strategy(c) != "none"}
    build_table(columns, spec, where=where, source="check", source_digest="",
                prior=Encoding(fill=fill))


def _pseudonymized(store: FeatureStore, d: DataSettings,
                   rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not d.pii:
        return rows
    out = []
    for original in rows:
        row = dict(original)
        for name in d.pii:
            value = row.get(name)
            if d.pii_action == "drop" or value is None:
                row[name] = ""
            else:
                (row[name],) = store.pseudonymize([value])
        out.append(row)
    return out


def stream_settings(d: DataSettings, base_dir: Path) -> dict[str, Any]:
    def path(p: str | None) -> str | None:
        return None if p is None else str(p if Path(p).is_absolute() else base_dir / p)
    return {"tls_ca": path(d.tls_ca), "tls_cert": path(d.tls_cert), "tls_key": path(d.tls_key),
            "username": d.username, "password_env": d.password_env, "stream": d.stream,
            "ack_wait_seconds": d.ack_wait_s}


def follow(store: FeatureStore, d: DataSettings, base_dir: Path, stop: threading.Event,
           progress: Callable[[str], None]) -> FollowStats:
    """Consume ``d.source`` until ``stop`` is set (see the module docstring)."""
    from trainer.ingest.streams import open_stream

    if urls.check_source(d.source) != "stream":
        raise InvalidInputError(f"data source {urls.redact(d.source)!r} is not a stream; "
                                "--follow reads mqtt(s):// and nats:// sources")
    key = source_key(d)
    where = f"data source {urls.redact(d.source)}"
    name = "edgefleet-ingest-" + key.removeprefix("sha256:")[:16]
    source = open_stream(d.source, name=name, settings=stream_settings(d, base_dir))
    stats = FollowStats()
    source.open()
    progress(f"[follow] consuming {source.url} (cut every {d.snapshot_rows} rows or "
             f"{d.snapshot_seconds:g} s)")
    last_cut = time.monotonic()
    oversized_seen = 0
    try:
        while not stop.is_set():
            wait = max(0.05, min(1.0, d.snapshot_seconds - (time.monotonic() - last_cut)))
            messages = source.fetch(FETCH_MAX, wait)
            if messages:
                oversized_seen = _stage(store, d, key, source, messages, stats, oversized_seen,
                                        where, progress)
            pending = store.inbox_rows(key)
            if not pending:  # the clock runs from the first staged row
                last_cut = time.monotonic()
            elif pending >= d.snapshot_rows or \
                    time.monotonic() - last_cut >= d.snapshot_seconds:
                _cut(store, d, key, stats, progress)
                last_cut = time.monotonic()
        if store.inbox_rows(key):
            _cut(store, d, key, stats, progress)
    finally:
        source.close()
    progress(f"[follow] stopped: {stats.messages} messages, {stats.rows} rows, "
             f"{stats.malformed} malformed, {stats.duplicates} redelivered duplicates, "
             f"{stats.snapshots} snapshots")
    return stats


def _stage(store: FeatureStore, d: DataSettings, key: str, source: Any, messages: list[Any],
           stats: FollowStats, oversized_seen: int, where: str,
           progress: Callable[[str], None]) -> int:
    """Parse, check and stage one fetch's messages, then acknowledge them; returns the
    source's count of oversized messages so far."""
    parsed: list[tuple[Any, list[dict[str, Any]]]] = []
    malformed = 0
    for m in messages:
        try:
            parsed.append((m, parse_message(m.payload, where=f"{where} message",
                                            max_columns=d.max_columns)))
        except InvalidInputError as exc:
            malformed += 1
            progress(f"[follow] skipped a malformed message: {exc}")
    try:  # the whole fetch at once; only when that fails, message by message
        if parsed:
            check_rows(d, [row for _, rows in parsed for row in rows], f"{where} message")
    except InvalidInputError:
        good = []
        for m, rows in parsed:
            try:
                check_rows(d, rows, f"{where} message")
            except InvalidInputError as exc:
                malformed += 1
                progress(f"[follow] skipped a malformed message: {exc}")
            else:
                good.append((m, rows))
        parsed = good
    staged: list[tuple[str | None, bool, int | None, list[dict[str, Any]]]] = []
    for m, rows in parsed:
        if m.position is not None:
            mkey, check = f"seq:{m.position}", True
        else:
            mkey, check = "sha256:" + hashlib.sha256(m.payload).hexdigest(), m.redelivered
        staged.append((mkey, check, m.position, _pseudonymized(store, d, rows)))
    oversized = int(getattr(source, "oversized", 0))
    added = store.stage(key, staged, malformed=malformed, oversized=oversized - oversized_seen)
    source.ack(messages)  # only now: the rows are durable
    stats.messages += len(messages)
    stats.malformed += malformed
    stats.duplicates += len(staged) - added
    stats.rows += sum(len(r) for _, _, _, r in staged)
    return oversized


def _cut(store: FeatureStore, d: DataSettings, key: str, stats: FollowStats,
         progress: Callable[[str], None]) -> None:
    snap = cut_inbox(store, d, key)
    if snap is not None:
        stats.snapshots += 1
        origin = snap.lineage.get("origin") or {}
        progress(f"[follow] snapshot {snap.id} ({len(snap.y)} rows, {origin.get('rows_new')} "
                 f"new, {origin.get('malformed')} malformed)")
