"""SQLite implementation of the control-plane store."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from control_plane.domain import telemetry_segment
from control_plane.domain.audit_chain import GENESIS_HASH, entry_hash
from control_plane.domain.history import DriftDay
from control_plane.domain.record_columns import (
    RecordColumns,
    Seqs,
    TelemetryWrite,
    as_columns,
)
from control_plane.domain.records import (
    ArmRecord,
    ArmStatsRecord,
    AuditRecord,
    CertificateRecord,
    Derived,
    DeviceAlert,
    DeviceRecord,
    DriftWindowRecord,
    ExperimentRecord,
    ExperimentState,
    InstalledModel,
    JobState,
    ModelVersionRecord,
    OperatorRecord,
    ReleaseRecord,
    ReportRefusal,
    RetrainJob,
    RolloutRecord,
    RolloutState,
    SampleRecord,
    SampleRefusal,
    SampleSummary,
    TelemetryRecord,
)
from control_plane.domain.retraining import DriftPolicy
from control_plane.storage.base import CorruptDatabaseError, Store
from control_plane.storage.migrations import MIGRATIONS
from control_plane.storage.segment_files import SegmentFiles, segment_dir
from fleetcore.errors import AlreadyExistsError, InvalidInputError, NotFoundError, TokenError
from fleetcore.sqlite import connect, migrate

__all__ = ["MIGRATIONS", "SqliteStore"]

# Expired history rolled up per UTC day (the same rows the DELETE after each removes).
_ROLL_UP_DRIFT = (
    "INSERT INTO drift_rollup(device_id, model, version, day, windows, drifted, rows, score_sum,"
    ' score_max) SELECT device_id, model, version, CAST("end" / 86400 AS INTEGER), COUNT(*),'
    " SUM(drifted), SUM(rows), SUM(score), MAX(score) FROM drift_windows WHERE rowid IN"
    " (SELECT rowid FROM drift_windows WHERE received_at < ? ORDER BY received_at, rowid"
    " LIMIT ?) GROUP BY 1, 2, 3, 4 ON CONFLICT(device_id, model, version, day) DO UPDATE SET"
    " windows = windows + excluded.windows, drifted = drifted + excluded.drifted,"
    " rows = rows + excluded.rows, score_sum = score_sum + excluded.score_sum,"
    " score_max = MAX(score_max, excluded.score_max)")
# Each arm's last snapshot of the day (SQLite takes the bare columns from the MAX(seq) row).
_ROLL_UP_ARMS = (
    "INSERT INTO arm_stats_rollup(device_id, model, version, day, seq, requests, errors,"
    " labelled, correct, abs_error_sum, p95_ms) SELECT device_id, model, version, day, MAX(seq),"
    " requests, errors, labelled, correct, abs_error_sum, p95_ms FROM (SELECT *,"
    " CAST(created_at / 86400 AS INTEGER) AS day FROM arm_stats_history WHERE rowid IN"
    " (SELECT rowid FROM arm_stats_history WHERE received_at < ? ORDER BY received_at, rowid"
    " LIMIT ?)) GROUP BY 1, 2, 3, 4 ON CONFLICT(device_id, model, version, day) DO UPDATE SET"
    " seq = excluded.seq, requests = excluded.requests, errors = excluded.errors,"
    " labelled = excluded.labelled, correct = excluded.correct,"
    " abs_error_sum = excluded.abs_error_sum, p95_ms = excluded.p95_ms"
    " WHERE excluded.seq > arm_stats_rollup.seq")


# The columns a segment's body is read from (SqliteStore._segment_body).
_SEGMENT_BODY = "body, body_file, body_offset, body_length"
# Batches whose stored seqs one query reads (4 parameters each; SQLite allows 32,766).
_STORED_CHUNK = 500

# Sealed blobs are kept in rows of at most this many bytes.
BLOB_PART = 4 * 1024 * 1024

# DO NOTHING: a window resent after its raw row expired is already here.
_INSERT_DRIFT_WINDOW = (
    'INSERT INTO drift_windows(device_id, seq, model, version, start,'
    ' "end", rows, score, drifted, prediction_psi, drifted_features, received_at,'
    " feature_psi) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING")
# Every snapshot is history (kept as long as drift windows, then rolled up daily).
_INSERT_ARM_HISTORY = (
    "INSERT INTO arm_stats_history(device_id, seq, model, version, requests,"
    " errors, p50_ms, p95_ms, labelled, correct, abs_error_sum, sq_error_sum,"
    " created_at, received_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT DO NOTHING")
# Counters are cumulative per agent run: keep the newest snapshot (highest seq).
_UPSERT_ARM_STATS = (
    "INSERT INTO arm_stats(device_id, model, version, requests, errors, p50_ms, p95_ms,"
    " labelled, correct, updated_at, seq, abs_error_sum, sq_error_sum)"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT(device_id, model, version) DO UPDATE SET requests=excluded.requests,"
    " errors=excluded.errors, p50_ms=excluded.p50_ms, p95_ms=excluded.p95_ms,"
    " labelled=excluded.labelled, correct=excluded.correct,"
    " abs_error_sum=excluded.abs_error_sum, sq_error_sum=excluded.sq_error_sum,"
    " updated_at=excluded.updated_at, seq=excluded.seq WHERE excluded.seq > arm_stats.seq")


def _drift_window_args(seq: int, row: DriftWindowRecord, now: float) -> tuple[Any, ...]:
    return (row.device_id, seq, row.model, row.version, row.start, row.end, row.rows,
            row.score, int(row.drifted), row.prediction_psi,
            _dump(list(row.drifted_features)), now, _dump(row.feature_psi))


def _arm_history_args(seq: int, row: ArmStatsRecord, now: float) -> tuple[Any, ...]:
    return (row.device_id, seq, row.model, row.version, row.requests, row.errors, row.p50_ms,
            row.p95_ms, row.labelled, row.correct, row.abs_error_sum, row.sq_error_sum,
            row.updated_at, now)


def _arm_stats_args(seq: int, row: ArmStatsRecord) -> tuple[Any, ...]:
    return (row.device_id, row.model, row.version, row.requests, row.errors, row.p50_ms,
            row.p95_ms, row.labelled, row.correct, row.updated_at, seq, row.abs_error_sum,
            row.sq_error_sum)


def _unseen(records: RecordColumns, stored: Seqs | None) -> RecordColumns:
    """``records`` less the seqs in ``stored`` and repeats within the batch (first kept)."""
    if not len(records):
        return records
    seqs = records.seqs
    increasing = bool((seqs[1:] > seqs[:-1]).all())  # hence no repeats
    if stored is None and increasing:
        return records  # the usual batch: all of it new
    # First occurrences of the seqs not stored before.
    first = np.zeros(len(seqs), dtype=np.bool_)
    first[np.unique(seqs, return_index=True)[1]] = True
    return records.select(first if stored is None else first & ~np.isin(seqs, stored))


class SqliteStore(Store):
    """The embedded default. Its SQL is shared with ``PostgresStore`` (a subclass): write new
    statements in the dialect both speak (``ON CONFLICT`` upserts, ``RETURNING``, aliased
    subqueries, ``?`` placeholders) or override the method in postgres.py."""

    _integrity_errors: tuple[type[Exception], ...] = (sqlite3.IntegrityError,)

    # Where segment bodies go (segment_files.py); None: in their rows (PostgreSQL).
    _segments: SegmentFiles | None = None

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._conn = _open_checked(self.path)
        self._lock = threading.RLock()
        migrate(self._conn, MIGRATIONS)
        self._segments = SegmentFiles(segment_dir(self.path))

    @contextmanager
    def _tx(self, devices: Sequence[str] | None = None, *,
            pipelined: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction. ``devices``: the write touches only these devices' rows
        and reads nothing of other devices (telemetry, heartbeats): PostgreSQL then lets it
        run beside other such writes; SQLite has one writer anyway. ``pipelined``: the
        transaction reads no statement's outcome (a row count) except rows it fetches, so
        PostgreSQL may send its statements together, a round trip for all those up to each
        fetch (SQLite runs in-process: nothing to gain)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    # --- tokens ---
    def add_token(
        self,
        token_hash: str,
        labels: Mapping[str, str],
        created_at: float,
        expires_at: float,
        created_by: str,
    ) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO enrollment_tokens(token_hash, labels, created_at, expires_at,"
                " created_by) VALUES (?, ?, ?, ?, ?)",
                (token_hash, _dump(dict(labels)), created_at, expires_at, created_by),
            )

    def enroll(
        self,
        token_hash: str,
        now: float,
        device: DeviceRecord,
        certificate: CertificateRecord,
    ) -> DeviceRecord:
        with self._tx() as c:
            labels = {**device.labels, **_usable_token(c, token_hash, now)}
            c.execute(
                "UPDATE enrollment_tokens SET used_at = ?, used_by = ? WHERE token_hash = ?",
                (now, device.id, token_hash),
            )
            c.execute(
                "INSERT INTO devices(id, labels, enrolled_at, agent_version, host, cert_serial,"
                " cert_not_after) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    device.id,
                    _dump(labels),
                    device.enrolled_at,
                    device.agent_version,
                    _dump(device.host),
                    certificate.serial,
                    certificate.not_after,
                ),
            )
            self._insert_certificate(c, certificate)
        enrolled = self.get_device(device.id)
        assert enrolled is not None
        return enrolled

    def token_labels(self, token_hash: str, now: float) -> dict[str, str]:
        with self._lock:
            return _usable_token(self._conn, token_hash, now)

    # --- devices ---
    def get_device(self, device_id: str) -> DeviceRecord | None:
        rows = self._query("SELECT * FROM devices WHERE id = ?", (device_id,))
        return _device(rows[0]) if rows else None

    def list_devices(self) -> list[DeviceRecord]:
        return [_device(r) for r in self._query("SELECT * FROM devices ORDER BY id")]

    def record_heartbeat(
        self,
        device_id: str,
        now: float,
        agent_version: str,
        host: Mapping[str, Any],
        models: Sequence[InstalledModel],
    ) -> None:
        with self._tx() as c:
            cur = c.execute(
                "UPDATE devices SET last_seen = ?, agent_version = ?, host = ?, models = ?"
                " WHERE id = ?",
                (now, agent_version, _dump(dict(host)), _models_json(models), device_id),
            )
            if cur.rowcount != 1:
                raise NotFoundError(f"no device {device_id!r}")

    def record_heartbeats(
        self, beats: Sequence[tuple[str, float, str, Mapping[str, Any], Sequence[InstalledModel]]]
    ) -> list[Exception | None]:
        errors: list[Exception | None] = [None] * len(beats)
        # One commit (one fsync) for all of them; rows updated in device order, so that two
        # such transactions (on two replicas) never wait on each other's rows in a cycle.
        order = sorted(range(len(beats)), key=lambda i: beats[i][0])
        with self._tx(devices=[beat[0] for beat in beats]) as c:
            for i in order:
                device_id, now, agent_version, host, models = beats[i]
                cur = c.execute(
                    "UPDATE devices SET last_seen = ?, agent_version = ?, host = ?, models = ?"
                    " WHERE id = ?",
                    (now, agent_version, _dump(dict(host)), _models_json(models), device_id),
                )
                if cur.rowcount != 1:
                    errors[i] = NotFoundError(f"no device {device_id!r}")
        return errors

    def revoke_device(self, device_id: str, now: float) -> DeviceRecord:
        with self._tx() as c:
            cur = c.execute(
                "UPDATE devices SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?",
                (now, device_id),
            )
            if cur.rowcount != 1:
                raise NotFoundError(f"no device {device_id!r}")
            c.execute(
                "UPDATE certificates SET revoked_at = COALESCE(revoked_at, ?)"
                " WHERE kind = 'device' AND subject = ?",
                (now, device_id),
            )
        revoked = self.get_device(device_id)
        assert revoked is not None
        return revoked

    # --- certificates ---
    def add_certificate(self, cert: CertificateRecord, *, current_for_device: bool) -> None:
        with self._tx() as c:
            self._insert_certificate(c, cert)
            if current_for_device:
                c.execute(
                    "UPDATE devices SET cert_serial = ?, cert_not_after = ? WHERE id = ?",
                    (cert.serial, cert.not_after, cert.subject),
                )

    @staticmethod
    def _insert_certificate(c: sqlite3.Connection, cert: CertificateRecord) -> None:
        c.execute(
            "INSERT INTO certificates(serial, kind, subject, not_before, not_after, issued_at,"
            " revoked_at, issuer) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                cert.serial,
                cert.kind,
                cert.subject,
                cert.not_before,
                cert.not_after,
                cert.issued_at,
                cert.revoked_at,
                cert.issuer,
            ),
        )

    def revoked_certificates(self, now: float) -> list[CertificateRecord]:
        rows = self._query("SELECT serial FROM certificates WHERE revoked_at IS NOT NULL "
                           "AND not_after > ? ORDER BY serial", (now,))
        found = (self.get_certificate(r["serial"]) for r in rows)
        return [c for c in found if c is not None]

    def get_certificate(self, serial: str) -> CertificateRecord | None:
        rows = self._query("SELECT * FROM certificates WHERE serial = ?", (serial,))
        if not rows:
            return None
        r = rows[0]
        return CertificateRecord(
            serial=r["serial"],
            kind=r["kind"],
            subject=r["subject"],
            not_before=r["not_before"],
            not_after=r["not_after"],
            issued_at=r["issued_at"],
            revoked_at=r["revoked_at"],
            issuer=r["issuer"],
        )

    def current_certificates_not_from(self, issuer: str, now: float) -> list[CertificateRecord]:
        # A device's current certificate (of a device not revoked), an operator's latest one.
        rows = self._query(
            "SELECT serial FROM certificates c WHERE revoked_at IS NULL AND not_after > ? "
            "AND issuer != ? AND ((kind = 'device' AND serial IN (SELECT cert_serial FROM "
            "devices WHERE revoked_at IS NULL)) OR (kind = 'operator' AND issued_at = (SELECT "
            "MAX(issued_at) FROM certificates o WHERE o.kind = 'operator' AND o.subject = "
            "c.subject))) ORDER BY kind, subject", (now, issuer))
        found = (self.get_certificate(r["serial"]) for r in rows)
        return [c for c in found if c is not None]

    # --- operators ---
    def add_operator(self, name: str, role: str, now: float, created_by: str) -> None:
        try:
            with self._tx() as c:
                c.execute(
                    "INSERT INTO operators(name, role, created_at, created_by) VALUES (?,?,?,?)",
                    (name, role, now, created_by),
                )
        except self._integrity_errors:
            raise AlreadyExistsError(f"operator {name!r} exists already") from None

    def get_operator(self, name: str) -> tuple[str, float] | None:
        rows = self._query("SELECT role, created_at FROM operators WHERE name = ?", (name,))
        return (rows[0]["role"], rows[0]["created_at"]) if rows else None

    def list_operators(self) -> list[OperatorRecord]:
        serials: dict[str, list[str]] = {}
        for r in self._query("SELECT subject, serial FROM certificates WHERE kind = 'operator'"
                             " ORDER BY issued_at, serial"):
            serials.setdefault(r["subject"], []).append(r["serial"])
        return [OperatorRecord(r["name"], r["role"], r["created_at"], r["created_by"],
                               r["revoked_at"], tuple(serials.get(r["name"], ())))
                for r in self._query("SELECT * FROM operators ORDER BY name")]

    def revoke_operator(self, name: str, now: float) -> OperatorRecord:
        with self._tx() as c:
            cur = c.execute("UPDATE operators SET revoked_at = COALESCE(revoked_at, ?)"
                            " WHERE name = ?", (now, name))
            if cur.rowcount != 1:
                raise NotFoundError(f"no operator {name!r}")
            c.execute("UPDATE certificates SET revoked_at = COALESCE(revoked_at, ?)"
                      " WHERE kind = 'operator' AND subject = ?", (now, name))
        return next(o for o in self.list_operators() if o.name == name)

    def operator_revoked(self, name: str) -> bool:
        rows = self._query("SELECT revoked_at FROM operators WHERE name = ?", (name,))
        return bool(rows) and rows[0]["revoked_at"] is not None

    # --- detection ---
    def flag_device(self, device_id: str, kind: str, detail: str, now: float) -> bool:
        with self._tx() as c:
            new = c.execute("SELECT 1 FROM device_alerts WHERE device_id = ? AND kind = ?",
                            (device_id, kind)).fetchone() is None
            c.execute("INSERT INTO device_alerts(device_id, kind, detail, since, updated_at)"
                      " VALUES (?,?,?,?,?) ON CONFLICT(device_id, kind) DO UPDATE SET"
                      " detail = excluded.detail, updated_at = excluded.updated_at",
                      (device_id, kind, detail, now, now))
        return new

    def clear_device_alerts(self, device_id: str, kinds: Sequence[str]) -> None:
        with self._tx() as c:
            c.executemany("DELETE FROM device_alerts WHERE device_id = ? AND kind = ?",
                          [(device_id, k) for k in kinds])

    def device_alerts(self, device_id: str = "") -> list[DeviceAlert]:
        rows = self._query("SELECT * FROM device_alerts WHERE ? IN ('', device_id)"
                           " ORDER BY device_id, kind", (device_id,))
        return [DeviceAlert(r["device_id"], r["kind"], r["detail"], r["since"], r["updated_at"])
                for r in rows]

    # --- audit ---
    def append_audit(
        self, now: float, actor: str, action: str, target: str, outcome: str, detail: str,
        role: str = "",
    ) -> AuditRecord:
        with self._tx() as c:
            last = c.execute(
                "SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            seq = (last["seq"] + 1) if last else 1
            prev = last["hash"] if last else GENESIS_HASH
            digest = entry_hash(prev, seq, now, actor, role, action, target, outcome, detail)
            c.execute(
                "INSERT INTO audit_events(seq, time, actor, action, target, outcome, detail,"
                " prev_hash, hash, role) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (seq, now, actor, action, target, outcome, detail, prev, digest, role),
            )
        return AuditRecord(seq, now, actor, action, target, outcome, detail, prev, digest, role)

    def audit_chain(self) -> list[AuditRecord]:
        rows = self._query("SELECT * FROM audit_events ORDER BY rowid")
        return [_audit_record(r) for r in rows]

    def list_audit(self, limit: int) -> list[AuditRecord]:
        rows = self._query(
            "SELECT * FROM (SELECT * FROM audit_events ORDER BY seq DESC LIMIT ?) AS newest"
            " ORDER BY seq",
            (limit,),
        )
        return [_audit_record(r) for r in rows]

    # --- model registry ---
    def add_model_version(self, record: ModelVersionRecord) -> None:
        with self._tx() as c:
            row = c.execute(
                "SELECT digest FROM model_versions WHERE name = ? AND version = ?",
                (record.name, record.version),
            ).fetchone()
            if row is not None:
                if row["digest"] == record.digest:
                    return  # publishing the same bundle again changes nothing
                raise AlreadyExistsError(
                    f"model {record.name} version {record.version} exists with another bundle "
                    f"({row['digest']}); publish a new version"
                )
            c.execute(
                "INSERT INTO model_versions(name, version, digest, length, created_at,"
                " published_by, publisher_key, manifest) VALUES (?,?,?,?,?,?,?,?)",
                (record.name, record.version, record.digest, record.length, record.created_at,
                 record.published_by, record.publisher_key, record.manifest),
            )

    def set_version_signers(self, name: str, version: int, keyids: Sequence[str]) -> None:
        with self._tx() as c:
            c.execute("UPDATE model_versions SET signer_keyids = ? WHERE name = ? AND version = ?",
                      (" ".join(keyids), name, version))

    def version_signers(self) -> dict[tuple[str, int], tuple[str, ...]]:
        rows = self._query("SELECT name, version, signer_keyids FROM model_versions"
                           " WHERE signer_keyids <> ''", ())
        return {(r["name"], int(r["version"])): tuple(r["signer_keyids"].split()) for r in rows}

    def get_model_version(self, name: str, version: int) -> ModelVersionRecord | None:
        rows = self._query(
            "SELECT * FROM model_versions WHERE name = ? AND version = ?", (name, version)
        )
        return _model_version(rows[0]) if rows else None

    def list_model_versions(self, name: str | None = None) -> list[ModelVersionRecord]:
        # A summary of each manifest, made here: a manifest may hold megabytes of lineage.
        rows = self._query(
            "SELECT name, version, digest, length, created_at, published_by, publisher_key,"
            " json_object('name', json_extract(manifest, '$.name'),"
            " 'version', json_extract(manifest, '$.version'),"
            " 'created', json_extract(manifest, '$.created'),"
            " 'task', COALESCE(json_extract(manifest, '$.task'), 'classification'),"
            " 'metrics', json_extract(manifest, '$.metrics'),"
            " 'compression', json_extract(manifest, '$.compression'),"
            " 'runtime', json_extract(manifest, '$.runtime')) AS manifest,"
            " length(manifest) AS manifest_bytes FROM model_versions"
            " WHERE (? = '' OR name = ?) ORDER BY name, version", (name or "", name or ""))
        return [_model_version(r) for r in rows]

    # --- rollouts ---
    def start_rollout(
        self,
        model: str,
        version: int,
        selector: Mapping[str, str],
        device_ids: list[str],
        now: float,
        created_by: str,
        *,
        first_step: list[str] | None = None,
        steps: tuple[int, ...] = (100,),
        bake_seconds: float = 0.0,
        gates: tuple[str, ...] = (),
        on_failure: str = "pause",
        device_timeout_seconds: float = 600.0,
    ) -> RolloutRecord:
        with self._tx() as c:
            prev = c.execute("SELECT version FROM rollouts WHERE model = ? ORDER BY id DESC"
                             " LIMIT 1", (model,)).fetchone()
            c.execute(
                "UPDATE rollouts SET state = 'superseded' WHERE model = ?"
                " AND state IN ('running', 'paused')",
                (model,),
            )
            cur = c.execute(
                "INSERT INTO rollouts(model, version, selector, state, created_at, created_by,"
                " device_ids, steps, step, step_started_at, bake_seconds, gates, on_failure,"
                " previous_version, device_timeout_seconds, history)"
                " VALUES (?, ?, ?, 'running', ?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (model, version, _dump(dict(selector)), now, created_by, _dump(device_ids),
                 _dump(list(steps)), now, bake_seconds, _dump(list(gates)), on_failure,
                 prev["version"] if prev else 0, device_timeout_seconds,
                 _dump([f"step 1 of {len(steps)}: {steps[0]}% of {len(device_ids)} devices"])),
            )
            rollout_id = int(cur.fetchone()["id"])
            self._assign(c, model, version, device_ids if first_step is None else first_step)
        record = self._rollout_by_id(rollout_id)
        assert record is not None
        return record

    @staticmethod
    def _assign(c: sqlite3.Connection, model: str, version: int, device_ids: list[str]) -> None:
        for device_id in device_ids:
            c.execute("DELETE FROM device_arms WHERE device_id = ? AND model = ?",
                      (device_id, model))
            if version:
                c.execute(
                    "INSERT INTO device_arms(device_id, model, version, weight, shadow)"
                    " VALUES (?, ?, ?, 1.0, 0)",
                    (device_id, model, version),
                )

    def assign_version(self, model: str, version: int, device_ids: list[str]) -> None:
        with self._tx() as c:
            self._assign(c, model, version, device_ids)

    def update_rollout(self, rollout_id: int, **fields: Any) -> None:
        allowed = {"state", "step", "step_started_at", "reason", "history"}
        if not set(fields) <= allowed:
            raise ValueError(f"cannot update {sorted(set(fields) - allowed)}")
        values = {k: _dump(list(v)) if k == "history" else v for k, v in fields.items()}
        sets = ", ".join(f"{k} = ?" for k in values)
        with self._tx() as c:
            c.execute(f"UPDATE rollouts SET {sets} WHERE id = ?",  # noqa: S608 (fixed names)
                      (*values.values(), rollout_id))

    def running_rollouts(self) -> list[RolloutRecord]:
        rows = self._query("SELECT * FROM rollouts WHERE state = 'running' ORDER BY id")
        return [_rollout(r) for r in rows]

    def _rollout_by_id(self, rollout_id: int) -> RolloutRecord | None:
        rows = self._query("SELECT * FROM rollouts WHERE id = ?", (rollout_id,))
        return _rollout(rows[0]) if rows else None

    def get_rollout(self, model: str) -> RolloutRecord | None:
        rows = self._query(
            "SELECT * FROM rollouts WHERE model = ? ORDER BY id DESC LIMIT 1", (model,)
        )
        return _rollout(rows[0]) if rows else None

    def device_arms(self, device_id: str) -> list[ArmRecord]:
        rows = self._query(
            "SELECT model, version, weight, shadow FROM device_arms WHERE device_id = ?"
            " ORDER BY model, version",
            (device_id,),
        )
        return [ArmRecord(r["model"], r["version"], r["weight"], bool(r["shadow"])) for r in rows]

    # --- releases ---
    def get_release(self, device_id: str) -> ReleaseRecord | None:
        rows = self._query("SELECT * FROM releases WHERE device_id = ?", (device_id,))
        if not rows:
            return None
        r = rows[0]
        return ReleaseRecord(r["device_id"], r["serial"], bytes(r["document"]),
                             bytes(r["signature"]), r["issued_at"], r["expires_at"], r["content"])

    def put_release(self, record: ReleaseRecord) -> None:
        with self._tx() as c:
            row = c.execute("SELECT serial FROM releases WHERE device_id = ?",
                            (record.device_id,)).fetchone()
            if row is not None and row["serial"] >= record.serial:
                raise AlreadyExistsError(
                    f"release serial {record.serial} for {record.device_id} is not newer than "
                    f"{row['serial']}"
                )
            c.execute(
                "INSERT INTO releases(device_id, serial, document, signature,"
                " issued_at, expires_at, content) VALUES (?,?,?,?,?,?,?)"
                " ON CONFLICT(device_id) DO UPDATE SET serial = excluded.serial,"
                " document = excluded.document, signature = excluded.signature,"
                " issued_at = excluded.issued_at, expires_at = excluded.expires_at,"
                " content = excluded.content",
                (record.device_id, record.serial, record.document, record.signature,
                 record.issued_at, record.expires_at, record.content),
            )

    # --- roots of trust ---
    def published_roots(self) -> list[tuple[int, bytes]]:
        rows = self._query("SELECT version, envelope FROM roots WHERE state = 'published' "
                           "ORDER BY version", ())
        return [(r["version"], bytes(r["envelope"])) for r in rows]

    def pending_root(self) -> tuple[int, bytes] | None:
        rows = self._query("SELECT version, envelope FROM roots WHERE state = 'pending' "
                           "ORDER BY version DESC LIMIT 1", ())
        return (rows[0]["version"], bytes(rows[0]["envelope"])) if rows else None

    def put_root(self, version: int, envelope: bytes, state: str, now: float) -> None:
        with self._tx() as c:
            row = c.execute("SELECT state FROM roots WHERE version = ?", (version,)).fetchone()
            if row is not None and row["state"] == "published":
                raise AlreadyExistsError(f"root version {version} is published already")
            c.execute("DELETE FROM roots WHERE state = 'pending' AND version <> ?", (version,))
            c.execute("INSERT INTO roots(version, envelope, state, created_at) VALUES (?,?,?,?)"
                      " ON CONFLICT(version) DO UPDATE SET envelope = excluded.envelope,"
                      " state = excluded.state, created_at = excluded.created_at",
                      (version, envelope, state, now))

    def set_device_root(self, device_id: str, version: int, now: float) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO device_roots(device_id, version, reported_at) VALUES (?,?,?)"
                      " ON CONFLICT(device_id) DO UPDATE SET version = excluded.version,"
                      " reported_at = excluded.reported_at", (device_id, version, now))

    def device_root(self, device_id: str) -> int:
        rows = self._query("SELECT version FROM device_roots WHERE device_id = ?", (device_id,))
        return int(rows[0]["version"]) if rows else 0

    # --- telemetry ---
    def ingest_telemetry(
        self,
        device_id: str,
        records: Sequence[TelemetryRecord] | RecordColumns,
        derived: dict[int, Derived],
        now: float,
        dropped: int,
        depth: int,
        refused: Sequence[ReportRefusal] = (),
    ) -> list[int]:
        self.ingest_telemetry_many(
            [TelemetryWrite(device_id, records, derived, now, dropped, depth, refused)])
        return as_columns(records).seq_list()

    def ingest_telemetry_many(self, writes: Sequence[TelemetryWrite]) -> None:
        with self._tx(devices=[w.device_id for w in writes], pipelined=True) as c:
            try:
                self._write_telemetry(c, writes)
                if self._segments is not None:  # durable before the rows pointing at them are
                    self._segments.flush()
            except BaseException:
                if self._segments is not None:
                    self._segments.discard()
                raise

    def _write_telemetry(self, c: sqlite3.Connection, writes: Sequence[TelemetryWrite]) -> None:
        """A group's writes in a few statements however many batches it holds (on PostgreSQL
        each statement is a round trip): what the batches stored before is read in one query,
        the records not stored before (writers are serialized, so nothing lands in between) go
        in as one segment row a batch (control_plane/domain/telemetry_segment.py) with one
        ``executemany``, then their derived rows, a statement per table, and each device's
        outbox status. The group is taken in order: a batch sent twice in one group (a
        redelivery) is stored once, as a batch sent again later is."""
        columns = [as_columns(w.records) for w in writes]
        before = self._stored_seqs(c, [(w.device_id, cols) for w, cols in zip(writes, columns,
                                                                              strict=True)])
        segments: list[tuple[Any, ...]] = []
        derived: dict[float, list[tuple[int, Derived]]] = {}
        status: dict[str, tuple[str, int, int, float]] = {}
        # Each device's segments of this group so far: (first seq, last seq, seqs).
        in_group: dict[str, list[tuple[int, int, Seqs]]] = {}
        for w, records, stored in zip(writes, columns, before, strict=True):
            earlier = in_group.setdefault(w.device_id, [])
            if earlier and len(records):  # only those overlapping this batch's range
                lo, hi = int(records.seqs.min()), int(records.seqs.max())
                overlap = [seqs for first, last, seqs in earlier if last >= lo and first <= hi]
            else:
                overlap = []
            new = _unseen(records, np.concatenate([np.array(stored, dtype=np.uint64), *overlap])
                          if stored or overlap else None)
            if len(new):
                first, last = int(new.seqs.min()), int(new.seqs.max())
                earlier.append((first, last, new.seqs))
                body = telemetry_segment.encode(new)
                place: tuple[int | None, ...] = (None, None, None)
                if self._segments is not None:  # the bytes in a segment file, the row says where
                    body, place = b"", self._segments.stage(body)
                segments.append((w.device_id, first, last, len(new), w.now, body, *place))
                if w.derived:
                    kept = set(new.seq_list())
                    derived.setdefault(w.now, []).extend(
                        (seq, row) for seq, row in w.derived.items() if seq in kept)
            if w.refused:
                derived.setdefault(w.now, []).extend((0, refusal) for refusal in w.refused)
            status[w.device_id] = (w.device_id, w.dropped, w.depth, w.now)  # the last one's
        if segments:
            c.executemany("INSERT INTO telemetry_segments(device_id, first_seq, last_seq,"
                          " records, received_at, body, body_file, body_offset, body_length)"
                          " VALUES (?,?,?,?,?,?,?,?,?)", segments)
        for now, rows in derived.items():
            self._insert_derived_many(c, rows, now)
        if status:
            c.executemany(
                "INSERT INTO telemetry_status(device_id, dropped, depth, updated_at)"
                " VALUES (?,?,?,?) ON CONFLICT(device_id) DO UPDATE SET"
                " dropped = excluded.dropped, depth = excluded.depth,"
                " updated_at = excluded.updated_at", list(status.values()))

    def _segment_body(self, row: Sequence[Any]) -> bytes:
        """A segment's body from its (body, body_file, body_offset, body_length)."""
        body, number, offset, length = row[0], row[1], row[2], row[3]  # a PostgreSQL row: a dict
        if number is None:
            return bytes(body)
        if self._segments is None:
            raise InvalidInputError("a telemetry segment's body is in a segment file, which "
                                    "this store does not have")
        with self._lock:
            return self._segments.read(int(number), int(offset), int(length))

    def _stored_seqs(self, c: sqlite3.Connection,
                     batches: Sequence[tuple[str, RecordColumns]]) -> list[list[int]]:
        """For each (device, batch), the seqs in the batch's range that the device stored
        before: one query for the whole group (a chunk of ``_STORED_CHUNK`` batches). A
        resent batch finds the segments whose seq range overlaps its own (the primary key on
        (device, last_seq) makes that a short range scan: a fresh batch lies past them all)
        and the rows kept per record before segments existed."""
        out: list[list[int]] = [[] for _ in batches]
        wanted = [(i, device_id, int(records.seqs.min()), int(records.seqs.max()))
                  for i, (device_id, records) in enumerate(batches) if len(records)]
        for at in range(0, len(wanted), _STORED_CHUNK):
            sql, args = self._stored_query(wanted[at:at + _STORED_CHUNK])
            rows = c.execute(sql, args).fetchall()
            for row in rows:
                seqs = out[int(row[0])]
                if row[5] is not None:
                    seqs.append(int(row[5]))
                else:
                    seqs.extend(telemetry_segment.seqs_of(
                        self._segment_body((row[1], row[2], row[3], row[4]))))
        return out

    @staticmethod
    def _stored_query(chunk: Sequence[tuple[int, str, int, int]]) -> tuple[str, list[Any]]:
        """``_stored_seqs``'s query for the batches (i, device, lo, hi) of ``chunk`` and its
        parameters; its rows are (i, body, body_file, body_offset, body_length, seq). Here the
        batches are a VALUES list (SQLite compiles a statement in-process) that drives the
        joins: CROSS JOIN keeps it the outer loop, so each batch is a range scan of a primary
        key, never a scan of the table. PostgreSQL overrides this."""
        values = ",".join(["(?,?,?,?)"] * len(chunk))
        return (f"WITH q(i, d, lo, hi) AS (VALUES {values})"  # noqa: S608 - placeholders only
                " SELECT q.i, s.body, s.body_file, s.body_offset, s.body_length, NULL AS seq"
                " FROM q CROSS JOIN telemetry_segments AS s"
                " WHERE s.device_id = q.d AND s.last_seq >= q.lo AND s.first_seq <= q.hi"
                " UNION ALL SELECT q.i, NULL, NULL, NULL, NULL, t.seq"
                " FROM q CROSS JOIN telemetry AS t"
                " WHERE t.device_id = q.d AND t.seq BETWEEN q.lo AND q.hi",
                [v for row in chunk for v in row])

    def telemetry_records(self, device_id: str) -> list[TelemetryRecord]:
        rows = self._query("SELECT seq, kind, created_at, payload FROM telemetry"
                           " WHERE device_id = ?", (device_id,))
        out = [TelemetryRecord(int(r[0]), r[1], float(r[2]), bytes(r[3])) for r in rows]
        for r in self._query(f"SELECT {_SEGMENT_BODY} FROM telemetry_segments"  # noqa: S608
                             " WHERE device_id = ?", (device_id,)):
            out.extend(telemetry_segment.decode(self._segment_body(r)))
        return sorted(out, key=lambda r: r.seq)

    def _expire_segments(self, c: sqlite3.Connection, raw_before: float, limit: int) -> int:
        """Roll segments received before ``raw_before`` up into ``telemetry_rollup`` and
        delete them, oldest first, until about ``limit`` records; return the records."""
        taken: list[tuple[str, int, float]] = []
        total = 0
        for row in c.execute(  # rows by position: PostgreSQL's are dicts too
                "SELECT device_id, last_seq, received_at, records FROM telemetry_segments"
                " WHERE received_at < ? ORDER BY received_at, device_id, last_seq LIMIT ?",
                (raw_before, limit)).fetchall():
            taken.append((row[0], int(row[1]), float(row[2])))
            total += int(row[3])
            if total >= limit:
                break
        rollup: dict[tuple[str, str, int], list[int]] = {}
        for device_id, last_seq, received_at in taken:  # one body in memory at a time
            day = int(received_at // 86400)
            row = c.execute(f"SELECT {_SEGMENT_BODY} FROM telemetry_segments"  # noqa: S608
                            " WHERE device_id = ? AND last_seq = ?",
                            (device_id, last_seq)).fetchone()
            for r in telemetry_segment.decode(self._segment_body(row)):
                tally = rollup.setdefault((device_id, r.kind, day), [0, 0])
                tally[0] += 1
                tally[1] += len(r.payload)
        c.executemany(
            "INSERT INTO telemetry_rollup(device_id, kind, day, records, bytes) VALUES"
            " (?,?,?,?,?) ON CONFLICT(device_id, kind, day) DO UPDATE SET"
            " records = telemetry_rollup.records + excluded.records,"
            " bytes = telemetry_rollup.bytes + excluded.bytes",
            [(*key, n, size) for key, (n, size) in sorted(rollup.items())])
        c.executemany("DELETE FROM telemetry_segments WHERE device_id = ? AND last_seq = ?",
                      [(device_id, last_seq) for device_id, last_seq, _ in taken])
        return total

    def count_refusals(self, refused: Sequence[ReportRefusal], now: float) -> None:
        with self._tx(devices=[r.device_id for r in refused]) as c:
            self._insert_derived_many(c, [(0, refusal) for refusal in refused], now)

    def expire_telemetry(self, raw_before: float, drift_before: float,
                         limit: int = 10_000) -> int:
        removed = 0
        with self._tx() as c:
            c.execute(
                "INSERT INTO telemetry_rollup(device_id, kind, day, records, bytes)"
                " SELECT device_id, kind, CAST(received_at / 86400 AS INTEGER), COUNT(*),"
                " SUM(length(payload)) FROM telemetry WHERE rowid IN (SELECT rowid FROM telemetry"
                " WHERE received_at < ? ORDER BY received_at, rowid LIMIT ?)"
                " GROUP BY 1, 2, 3 ON CONFLICT(device_id, kind, day) DO UPDATE SET"
                " records = records + excluded.records, bytes = bytes + excluded.bytes",
                (raw_before, limit))
            removed += c.execute(
                "DELETE FROM telemetry WHERE rowid IN (SELECT rowid FROM telemetry"
                " WHERE received_at < ? ORDER BY received_at, rowid LIMIT ?)",
                (raw_before, limit)).rowcount
            removed += self._expire_segments(c, raw_before, limit)
            # History past its retention: a daily roll-up per device and arm, then deleted.
            c.execute(_ROLL_UP_DRIFT, (drift_before, limit))
            removed += c.execute(
                "DELETE FROM drift_windows WHERE rowid IN (SELECT rowid FROM drift_windows"
                " WHERE received_at < ? ORDER BY received_at, rowid LIMIT ?)",
                (drift_before, limit)).rowcount
            c.execute(_ROLL_UP_ARMS, (drift_before, limit))
            removed += c.execute(
                "DELETE FROM arm_stats_history WHERE rowid IN (SELECT rowid FROM"
                " arm_stats_history WHERE received_at < ? ORDER BY received_at, rowid LIMIT ?)",
                (drift_before, limit)).rowcount
        self._remove_segment_files()
        return removed

    def _remove_segment_files(self) -> None:
        """Delete the segment files no row points at any more (after their rows expired)."""
        with self._lock:
            files = self._segments
            if files is None:
                return
            files.remove_unreferenced(lambda number: self._conn.execute(
                "SELECT 1 FROM telemetry_segments WHERE body_file = ? LIMIT 1",
                (number,)).fetchone() is not None)

    def telemetry_rollup(self, device_id: str) -> dict[str, tuple[int, int]]:
        rows = self._query("SELECT kind, SUM(records) AS n, SUM(bytes) AS b FROM"
                           " telemetry_rollup WHERE device_id = ? GROUP BY kind", (device_id,))
        return {r["kind"]: (int(r["n"]), int(r["b"])) for r in rows}

    def telemetry_counts(self) -> dict[str, int]:
        out = {table: int(self._query(f"SELECT COUNT(*) FROM {table}")[0][0])  # noqa: S608
               for table in ("telemetry", "drift_windows", "samples", "telemetry_rollup")}
        # Raw records: those kept a row each (before segments) and those in segments.
        out["telemetry"] += int(self._query(
            "SELECT COALESCE(SUM(records), 0) FROM telemetry_segments")[0][0])
        return out

    @staticmethod
    def _insert_derived_many(c: sqlite3.Connection, rows: Sequence[tuple[int, Derived]],
                             now: float) -> None:
        """``_insert_derived`` for many rows: drift windows and arm statistics (what every
        batch carries) a statement per table, refusals one per counter; the rarer kinds one
        by one. Each table's rows
        keep their order, and no result depends on the order across tables."""
        windows = [(seq, r) for seq, r in rows if isinstance(r, DriftWindowRecord)]
        arms = [(seq, r) for seq, r in rows if isinstance(r, ArmStatsRecord)]
        if windows:
            c.executemany(_INSERT_DRIFT_WINDOW, [_drift_window_args(seq, r, now)
                                                 for seq, r in windows])
        if arms:
            c.executemany(_INSERT_ARM_HISTORY, [_arm_history_args(seq, r, now)
                                                for seq, r in arms])
            # Each arm's newest snapshot only: the upsert keeps the highest seq anyway, and a
            # backlog of one arm's snapshots would rewrite its row once per snapshot (on
            # PostgreSQL a dead row version each).
            newest: dict[tuple[str, str, int], tuple[int, ArmStatsRecord]] = {}
            for seq, snap in arms:
                arm = (snap.device_id, snap.model, snap.version)
                if arm not in newest or seq > newest[arm][0]:
                    newest[arm] = (seq, snap)
            c.executemany(_UPSERT_ARM_STATS, [_arm_stats_args(seq, snap)
                                              for seq, snap in newest.values()])
        # Refusal counters: one upsert per (device, kind, reason), however many were refused.
        refused: dict[tuple[str, str, str], int] = {}
        for _, r in rows:
            if isinstance(r, ReportRefusal):
                key = (r.device_id, r.kind, r.reason)
                refused[key] = refused.get(key, 0) + r.count
        for (device_id, kind, reason), count in refused.items():
            SqliteStore._insert_derived(c, 0, ReportRefusal(device_id, kind, reason, count), now)
        for seq, r in rows:
            if not isinstance(r, DriftWindowRecord | ArmStatsRecord | ReportRefusal):
                SqliteStore._insert_derived(c, seq, r, now)

    @staticmethod
    def _insert_derived(c: sqlite3.Connection, seq: int, row: Derived, now: float) -> None:
        if isinstance(row, SampleRecord):
            c.execute(
                "INSERT INTO samples(device_id, seq, model, version, region,"
                " received_at, features, labels, pii) VALUES (?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT DO NOTHING",
                (row.device_id, seq, row.model, row.version, row.region, now,
                 _dump(row.features), _dump(row.labels), _dump(row.pii)),
            )
            return
        if isinstance(row, ReportRefusal):
            c.execute(
                "INSERT INTO report_refusals(device_id, kind, reason, count, last_at)"
                " VALUES (?,?,?,?,?) ON CONFLICT(device_id, kind, reason)"
                " DO UPDATE SET count = report_refusals.count + excluded.count,"
                " last_at = excluded.last_at",
                (row.device_id, row.kind[:64], row.reason, row.count, now),
            )
            return
        if isinstance(row, SampleRefusal):
            c.execute(
                "INSERT INTO sample_refusals(model, region, reason, count) VALUES (?,?,?,1)"
                " ON CONFLICT(model, region, reason)"
                " DO UPDATE SET count = sample_refusals.count + 1",
                (row.model, row.region, row.reason),
            )
            if row.device_id:
                SqliteStore._insert_derived(
                    c, seq, ReportRefusal(row.device_id, "sample", row.category), now)
            return
        if isinstance(row, DriftWindowRecord):
            c.execute(_INSERT_DRIFT_WINDOW, _drift_window_args(seq, row, now))
            return
        c.execute(_INSERT_ARM_HISTORY, _arm_history_args(seq, row, now))
        c.execute(_UPSERT_ARM_STATS, _arm_stats_args(seq, row))

    def latest_drift(self, model: str | None) -> list[DriftWindowRecord]:
        rows = self._query(
            "SELECT * FROM drift_windows d WHERE seq = (SELECT MAX(seq) FROM drift_windows e"
            " WHERE e.device_id = d.device_id AND e.model = d.model)"
            " AND (? = '' OR model = ?) ORDER BY model, device_id",
            (model or "", model or ""),
        )
        return [
            DriftWindowRecord(r["device_id"], r["model"], r["version"], r["start"], r["end"],
                              r["rows"], r["score"], bool(r["drifted"]), r["prediction_psi"],
                              tuple(json.loads(r["drifted_features"])))
            for r in rows
        ]

    def report_refusals(self, device_id: str) -> dict[str, int]:
        rows = self._query("SELECT kind, reason, count FROM report_refusals WHERE device_id = ?"
                           " ORDER BY kind, reason", (device_id,))
        return {f"{r['kind']}/{r['reason']}": r["count"] for r in rows}

    def arm_stats(self, model: str) -> list[ArmStatsRecord]:
        rows = self._query(
            "SELECT * FROM arm_stats WHERE model = ? ORDER BY version, device_id", (model,)
        )
        return [
            ArmStatsRecord(r["device_id"], r["model"], r["version"], r["requests"], r["errors"],
                           r["p50_ms"], r["p95_ms"], r["labelled"], r["correct"],
                           r["updated_at"], r["abs_error_sum"], r["sq_error_sum"])
            for r in rows
        ]

    # --- experiments ---
    def start_experiment(self, record: ExperimentRecord) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO experiments(model, champion, challenger, weight, state,"
                " selector, device_ids, created_at, created_by) VALUES (?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT(model) DO UPDATE SET champion = excluded.champion,"
                " challenger = excluded.challenger, weight = excluded.weight,"
                " state = excluded.state, selector = excluded.selector,"
                " device_ids = excluded.device_ids, created_at = excluded.created_at,"
                " created_by = excluded.created_by, decision = '', p_value = NULL,"
                " decision_reason = '', decided_at = NULL",
                (record.model, record.champion, record.challenger, record.weight, record.state,
                 _dump(record.selector), _dump(list(record.device_ids)), record.created_at,
                 record.created_by),
            )
            for device_id in record.device_ids:
                c.execute("DELETE FROM device_arms WHERE device_id = ? AND model = ?",
                          (device_id, record.model))
                for version, weight in ((record.champion, 1.0 - record.weight),
                                        (record.challenger, record.weight)):
                    c.execute(
                        "INSERT INTO device_arms(device_id, model, version, weight, shadow)"
                        " VALUES (?, ?, ?, ?, 0)", (device_id, record.model, version, weight),
                    )

    def stop_experiment(self, model: str, now: float) -> ExperimentRecord:
        with self._tx() as c:
            row = c.execute("SELECT * FROM experiments WHERE model = ? AND state = 'running'",
                            (model,)).fetchone()
            if row is None:
                raise NotFoundError(f"no running experiment for model {model!r}")
            exp = _experiment(row)
            c.execute("UPDATE experiments SET state = 'stopped' WHERE model = ?", (model,))
            for device_id in exp.device_ids:
                c.execute("DELETE FROM device_arms WHERE device_id = ? AND model = ?",
                          (device_id, model))
                c.execute(
                    "INSERT INTO device_arms(device_id, model, version, weight, shadow)"
                    " VALUES (?, ?, ?, 1.0, 0)", (device_id, model, exp.champion),
                )
        stopped = self.get_experiment(model)
        assert stopped is not None
        return stopped

    def record_decision(self, model: str, decision: str, p_value: float | None, reason: str,
                        now: float, state: ExperimentState) -> None:
        with self._tx() as c:
            c.execute(
                "UPDATE experiments SET decision = ?, p_value = ?, decision_reason = ?,"
                " decided_at = ?, state = ? WHERE model = ? AND state = 'running'",
                (decision, p_value, reason, now, state.value, model),
            )

    def get_experiment(self, model: str) -> ExperimentRecord | None:
        rows = self._query("SELECT * FROM experiments WHERE model = ?", (model,))
        return _experiment(rows[0]) if rows else None

    # --- retraining ---
    def set_policy(self, policy: DriftPolicy) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO drift_policies(model, pipeline, threshold,"
                " device_fraction, windows, canary_weight, auto_canary, sample_rate, margin)"
                " VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(model) DO UPDATE SET"
                " pipeline = excluded.pipeline, threshold = excluded.threshold,"
                " device_fraction = excluded.device_fraction, windows = excluded.windows,"
                " canary_weight = excluded.canary_weight, auto_canary = excluded.auto_canary,"
                " sample_rate = excluded.sample_rate, margin = excluded.margin",
                (policy.model, policy.pipeline, policy.threshold, policy.device_fraction,
                 policy.windows, policy.canary_weight, int(policy.auto_canary),
                 policy.sample_rate, policy.margin),
            )

    def get_policy(self, model: str) -> DriftPolicy | None:
        rows = self._query("SELECT * FROM drift_policies WHERE model = ?", (model,))
        if not rows:
            return None
        r = rows[0]
        return DriftPolicy(r["model"], r["pipeline"], r["threshold"], r["device_fraction"],
                           r["windows"], r["canary_weight"], bool(r["auto_canary"]),
                           r["sample_rate"], r["margin"])

    def recent_drift(self, model: str, per_device: int,
                     since: float = 0.0) -> dict[str, list[DriftWindowRecord]]:
        rows = self._query(
            "SELECT * FROM drift_windows WHERE model = ? AND received_at > ?"
            " AND device_id NOT IN (SELECT id FROM devices WHERE revoked_at IS NOT NULL)"
            " ORDER BY device_id, seq DESC", (model, since)
        )
        out: dict[str, list[DriftWindowRecord]] = {}
        for r in rows:
            windows = out.setdefault(r["device_id"], [])
            if len(windows) < per_device:
                windows.append(DriftWindowRecord(
                    r["device_id"], r["model"], r["version"], r["start"], r["end"], r["rows"],
                    r["score"], bool(r["drifted"]), r["prediction_psi"],
                    tuple(json.loads(r["drifted_features"]))))
        return out

    def add_job(self, model: str, reason: str, version: int, now: float) -> int:
        with self._tx() as c:
            cur = c.execute(
                "INSERT INTO retrain_jobs(model, state, reason, version, created_at)"
                " VALUES (?, 'queued', ?, ?, ?) RETURNING id", (model, reason, version, now),
            )
            return int(cur.fetchone()["id"])

    def update_job(self, job_id: int, state: JobState, now: float | None = None,
                   detail: str = "") -> None:
        with self._tx() as c:
            c.execute("UPDATE retrain_jobs SET state = ?, finished_at = COALESCE(?, finished_at),"
                      " detail = ? WHERE id = ?", (state, now, detail, job_id))

    def jobs(self, model: str | None = None,
             states: tuple[JobState, ...] = ()) -> list[RetrainJob]:
        rows = self._query("SELECT * FROM retrain_jobs ORDER BY id DESC")
        return [RetrainJob(r["id"], r["model"], JobState(r["state"]), r["reason"], r["version"],
                           r["created_at"], r["finished_at"], r["detail"])
                for r in rows if (not model or r["model"] == model)
                and (not states or r["state"] in states)]

    def take_samples(self, model: str, job_id: int) -> list[SampleRecord]:
        with self._tx() as c:
            c.execute("UPDATE samples SET job_id = ? WHERE model = ? AND job_id IS NULL"
                      " AND device_id NOT IN (SELECT id FROM devices WHERE revoked_at IS NOT"
                      " NULL)", (job_id, model))
            rows = c.execute("SELECT * FROM samples WHERE model = ? AND job_id = ?"
                             " ORDER BY device_id, seq", (model, job_id)).fetchall()
        return [SampleRecord(r["device_id"], r["model"], r["version"], json.loads(r["features"]),
                             json.loads(r["labels"]), json.loads(r["pii"]), r["region"])
                for r in rows]

    def unused_sample_regions(self, model: str) -> list[str]:
        rows = self._query("SELECT DISTINCT region FROM samples WHERE model = ?"
                           " AND job_id IS NULL ORDER BY region", (model,))
        return [r["region"] for r in rows]

    def refuse_samples(self, model: str, reasons: Mapping[str, str], category: str,
                       now: float) -> int:
        refused = 0
        with self._tx() as c:
            for region, reason in reasons.items():
                rows = c.execute("SELECT device_id, COUNT(*) AS n FROM samples WHERE model = ?"
                                 " AND region = ? AND job_id IS NULL GROUP BY device_id",
                                 (model, region)).fetchall()
                for r in rows:
                    self._insert_derived(c, 0, ReportRefusal(r["device_id"], "sample", category,
                                                             r["n"]), now)
                    refused += r["n"]
                if rows:
                    c.execute(
                        "INSERT INTO sample_refusals(model, region, reason, count)"
                        " VALUES (?,?,?,?) ON CONFLICT(model, region, reason)"
                        " DO UPDATE SET count = sample_refusals.count + excluded.count",
                        (model, region or "-", reason, sum(r["n"] for r in rows)))
                c.execute("DELETE FROM samples WHERE model = ? AND region = ?"
                          " AND job_id IS NULL", (model, region))
        return refused

    def release_samples(self, job_id: int) -> None:
        with self._tx() as c:
            c.execute("UPDATE samples SET job_id = NULL WHERE job_id = ?", (job_id,))

    def sample_summary(self, model: str | None = None) -> list[SampleSummary]:
        stored = self._query(
            "SELECT model, region, SUM(json_array_length(labels)) AS n,"
            " SUM(CASE WHEN job_id IS NULL THEN json_array_length(labels) ELSE 0 END) AS unused,"
            " COUNT(DISTINCT device_id) AS devices FROM samples"
            " WHERE (? = '' OR model = ?) GROUP BY model, region", (model or "", model or ""))
        out = {(r["model"], r["region"]): [r["n"], r["unused"], r["devices"], {}]
               for r in stored}
        for r in self._query("SELECT * FROM sample_refusals WHERE (? = '' OR model = ?)",
                             (model or "", model or "")):
            entry = out.setdefault((r["model"], r["region"]), [0, 0, 0, {}])
            entry[3][r["reason"]] = r["count"]
        return [SampleSummary(m, reg, int(n), int(u), int(d), dict(refused))
                for (m, reg), (n, u, d, refused) in sorted(out.items())]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            if self._segments is not None:
                self._segments.close()

    # --- blobs kept in the database (used where replicas share it: PostgreSQL) ---
    def put_blob(self, digest: str, sealed: bytes) -> None:
        parts = [sealed[i:i + BLOB_PART] for i in range(0, len(sealed), BLOB_PART)] or [b""]
        with self._tx() as c:
            c.execute("DELETE FROM blob_parts WHERE digest = ?", (digest,))
            c.executemany("INSERT INTO blob_parts(digest, part, data) VALUES (?, ?, ?)",
                          [(digest, i, part) for i, part in enumerate(parts)])

    def get_blob(self, digest: str) -> bytes | None:
        rows = self._query("SELECT data FROM blob_parts WHERE digest = ? ORDER BY part",
                           (digest,))
        return b"".join(bytes(r["data"]) for r in rows) if rows else None

    def blob_digests(self) -> list[str]:
        return [r["digest"] for r in
                self._query("SELECT DISTINCT digest FROM blob_parts ORDER BY digest")]

    # --- observability: metrics and readiness ---
    def ping(self) -> None:
        self._query("SELECT 1")

    def all_arm_stats(self) -> list[ArmStatsRecord]:
        rows = self._query("SELECT * FROM arm_stats ORDER BY model, version, device_id")
        return [
            ArmStatsRecord(r["device_id"], r["model"], r["version"], r["requests"], r["errors"],
                           r["p50_ms"], r["p95_ms"], r["labelled"], r["correct"],
                           r["updated_at"], r["abs_error_sum"], r["sq_error_sum"])
            for r in rows
        ]

    def outbox_status(self) -> dict[str, tuple[int, int]]:
        rows = self._query("SELECT device_id, dropped, depth FROM telemetry_status")
        return {r["device_id"]: (int(r["dropped"]), int(r["depth"])) for r in rows}

    def refusal_totals(self) -> dict[str, int]:
        rows = self._query("SELECT device_id, SUM(count) AS n FROM report_refusals"
                           " GROUP BY device_id")
        return {r["device_id"]: int(r["n"]) for r in rows}

    def all_report_refusals(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for r in self._query("SELECT device_id, kind, reason, count FROM report_refusals"
                             " ORDER BY device_id, kind, reason"):
            out.setdefault(r["device_id"], {})[f"{r['kind']}/{r['reason']}"] = r["count"]
        return out

    # --- history ---
    def drift_history(self, model: str, device_id: str, since: float,
                      limit: int) -> tuple[list[DriftWindowRecord], bool]:
        rows = self._query(
            'SELECT * FROM drift_windows WHERE "end" >= ? AND (? = \'\' OR model = ?)'
            " AND (? = '' OR device_id = ?) ORDER BY \"end\" DESC, device_id LIMIT ?",
            (since, model, model, device_id, device_id, limit + 1))
        windows = [_drift_window(r) for r in rows[:limit]]
        windows.reverse()
        return windows, len(rows) > limit

    def drift_days(self, model: str, device_id: str, since: float) -> list[DriftDay]:
        rows = self._query(
            "SELECT * FROM drift_rollup WHERE day >= ? AND (? = '' OR model = ?)"
            " AND (? = '' OR device_id = ?) ORDER BY day, model, device_id, version",
            (int(since // 86400), model, model, device_id, device_id))
        return [DriftDay(r["device_id"], r["model"], r["version"], r["day"], r["windows"],
                         r["drifted"], r["rows"], r["score_sum"] / r["windows"],
                         r["score_max"]) for r in rows]

    def arm_history(self, model: str, since: float,
                    limit: int) -> tuple[list[ArmStatsRecord], bool]:
        rows = self._query(
            "SELECT * FROM (SELECT * FROM arm_stats_history WHERE model = ? AND created_at >= ?"
            " ORDER BY created_at DESC LIMIT ?) AS recent"
            " UNION ALL SELECT * FROM arm_stats_history h"
            " WHERE model = ? AND created_at < ? AND seq = (SELECT MAX(seq) FROM"
            " arm_stats_history e WHERE e.device_id = h.device_id AND e.model = h.model"
            " AND e.version = h.version AND e.created_at < ?)",
            (model, since, limit + 1, model, since, since))
        cut = sum(1 for r in rows if r["created_at"] >= since) > limit
        return [ArmStatsRecord(r["device_id"], r["model"], r["version"], r["requests"],
                               r["errors"], r["p50_ms"], r["p95_ms"], r["labelled"],
                               r["correct"], r["created_at"], r["abs_error_sum"],
                               r["sq_error_sum"]) for r in rows], cut


def _open_checked(path: Path) -> sqlite3.Connection:
    """Open the database after ``PRAGMA quick_check`` found it sound; a damaged one is refused
    with one line that says what to do (serving it could spread the damage, or lose writes)."""
    conn: sqlite3.Connection | None = None
    try:
        conn = connect(path)
        problems = [str(r[0]) for r in conn.execute("PRAGMA quick_check(5)").fetchall()]
    except sqlite3.DatabaseError as exc:
        problems = [str(exc)]
    if problems == ["ok"] and conn is not None:
        return conn
    if conn is not None:
        conn.close()
    found = "; ".join(p.replace("\n", " ") for p in problems)[:300]
    raise CorruptDatabaseError(
        f"database {path} failed its integrity check ({found}); refusing to serve it: restore "
        "the home from a backup (control-plane restore)")


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _models_json(models: Sequence[InstalledModel]) -> str:
    return _dump([m.to_json() for m in models])


def _drift_window(r: sqlite3.Row) -> DriftWindowRecord:
    return DriftWindowRecord(r["device_id"], r["model"], r["version"], r["start"], r["end"],
                             r["rows"], r["score"], bool(r["drifted"]), r["prediction_psi"],
                             tuple(json.loads(r["drifted_features"])),
                             json.loads(r["feature_psi"]))


def _audit_record(r: sqlite3.Row) -> AuditRecord:
    return AuditRecord(r["seq"], r["time"], r["actor"], r["action"], r["target"], r["outcome"],
                       r["detail"], r["prev_hash"], r["hash"], r["role"])


def _experiment(r: sqlite3.Row) -> ExperimentRecord:
    return ExperimentRecord(r["model"], r["champion"], r["challenger"], r["weight"],
                            ExperimentState(r["state"]),
                            json.loads(r["selector"]), tuple(json.loads(r["device_ids"])),
                            r["created_at"], r["created_by"], r["decision"], r["p_value"],
                            r["decision_reason"], r["decided_at"])


def _model_version(r: sqlite3.Row) -> ModelVersionRecord:
    manifest = r["manifest"]
    size = r["manifest_bytes"] if "manifest_bytes" in r.keys() else len(manifest)  # noqa: SIM118
    return ModelVersionRecord(r["name"], r["version"], r["digest"], r["length"], r["created_at"],
                              r["published_by"], r["publisher_key"], manifest, size)


def _rollout(r: sqlite3.Row) -> RolloutRecord:
    return RolloutRecord(
        r["id"], r["model"], r["version"], json.loads(r["selector"]), RolloutState(r["state"]),
        r["created_at"], r["created_by"], tuple(json.loads(r["device_ids"])),
        tuple(json.loads(r["steps"])), r["step"], r["step_started_at"], r["bake_seconds"],
        tuple(json.loads(r["gates"])), r["on_failure"], r["previous_version"], r["reason"],
        tuple(json.loads(r["history"])), r["device_timeout_seconds"],
    )


def _device(r: sqlite3.Row) -> DeviceRecord:
    return DeviceRecord(
        id=r["id"],
        labels=json.loads(r["labels"]),
        enrolled_at=r["enrolled_at"],
        last_seen=r["last_seen"],
        agent_version=r["agent_version"],
        host=json.loads(r["host"]),
        models=[InstalledModel.from_json(m) for m in json.loads(r["models"])],
        revoked_at=r["revoked_at"],
        cert_serial=r["cert_serial"],
        cert_not_after=r["cert_not_after"],
    )


def _usable_token(c: sqlite3.Connection, token_hash: str, now: float) -> dict[str, str]:
    """The labels of an unused, unexpired enrollment token; TokenError otherwise."""
    row = c.execute("SELECT labels, expires_at, used_at FROM enrollment_tokens"
                    " WHERE token_hash = ?", (token_hash,)).fetchone()
    if row is None:
        raise TokenError("enrollment token is unknown")
    if row["used_at"] is not None:
        raise TokenError("enrollment token has already been used")
    if now >= row["expires_at"]:
        raise TokenError("enrollment token has expired")
    labels: dict[str, str] = json.loads(row["labels"])
    return labels
