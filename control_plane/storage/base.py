"""The storage interface of the control plane."""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from control_plane.domain.history import DriftDay
from control_plane.domain.record_columns import RecordColumns, TelemetryWrite
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
    SampleRecord,
    SampleSummary,
    TelemetryRecord,
)
from control_plane.domain.retraining import DriftPolicy
from fleetcore.errors import EdgefleetError, NotFoundError

__all__ = ["CorruptDatabaseError", "Store"]


class CorruptDatabaseError(EdgefleetError):
    """The database failed its integrity check at start: the control plane does not serve it."""


class Store(abc.ABC):
    """Everything the services persist. Implementations serialize their own writes."""

    # Whether telemetry writes may run in a worker thread while the event loop goes on: true
    # where they wait on a server (PostgreSQL: the loop answers heartbeats meanwhile, and
    # different devices' writes proceed side by side); SQLite's one connection would only
    # make the loop wait for its lock instead.
    writes_off_loop = False

    # --- enrollment tokens ---
    @abc.abstractmethod
    def add_token(
        self,
        token_hash: str,
        labels: Mapping[str, str],
        created_at: float,
        expires_at: float,
        created_by: str,
    ) -> None: ...

    @abc.abstractmethod
    def enroll(
        self,
        token_hash: str,
        now: float,
        device: DeviceRecord,
        certificate: CertificateRecord,
    ) -> DeviceRecord:
        """Atomically consume the token and register the device with its first certificate.

        The token's labels override the device's requested ones. Raises ``TokenError`` (and
        stores nothing) when the token is unknown, used or expired.
        """

    # --- devices ---
    @abc.abstractmethod
    def get_device(self, device_id: str) -> DeviceRecord | None: ...

    @abc.abstractmethod
    def list_devices(self) -> list[DeviceRecord]: ...

    @abc.abstractmethod
    def record_heartbeat(
        self,
        device_id: str,
        now: float,
        agent_version: str,
        host: Mapping[str, Any],
        models: Sequence[InstalledModel],
    ) -> None: ...

    def record_heartbeats(
        self, beats: Sequence[tuple[str, float, str, Mapping[str, Any], Sequence[InstalledModel]]]
    ) -> list[Exception | None]:
        """Record several heartbeats (arguments of ``record_heartbeat``), in one transaction
        where the store can; one error (or None) per heartbeat, in order."""
        errors: list[Exception | None] = []
        for beat in beats:
            try:
                self.record_heartbeat(*beat)
                errors.append(None)
            except NotFoundError as exc:
                errors.append(exc)
        return errors

    @abc.abstractmethod
    def revoke_device(self, device_id: str, now: float) -> DeviceRecord:
        """Mark the device and every certificate issued to it revoked."""

    # --- certificates ---
    @abc.abstractmethod
    def add_certificate(self, cert: CertificateRecord, *, current_for_device: bool) -> None: ...

    @abc.abstractmethod
    def get_certificate(self, serial: str) -> CertificateRecord | None: ...

    @abc.abstractmethod
    def current_certificates_not_from(self, issuer: str, now: float) -> list[CertificateRecord]:
        """Unrevoked, unexpired certificates in use (each device's current one, each operator's
        latest) that the CA ``issuer`` (pki.key_id) did not issue."""

    @abc.abstractmethod
    def revoked_certificates(self, now: float) -> list[CertificateRecord]:
        """Revoked certificates that have not expired at ``now`` (what a CRL must list)."""

    # --- operators ---
    @abc.abstractmethod
    def add_operator(self, name: str, role: str, now: float, created_by: str) -> None: ...

    @abc.abstractmethod
    def get_operator(self, name: str) -> tuple[str, float] | None:
        """(role, created_at) of the operator, or None."""

    @abc.abstractmethod
    def list_operators(self) -> list[OperatorRecord]:
        """Every operator, by name, with the serials of the certificates issued to it."""

    @abc.abstractmethod
    def revoke_operator(self, name: str, now: float) -> OperatorRecord:
        """Mark the operator and every certificate issued to it revoked (NotFoundError if
        there is no such operator); revoking twice keeps the first time."""

    @abc.abstractmethod
    def operator_revoked(self, name: str) -> bool: ...

    # --- detection (docs/security.md, "Detection") ---
    @abc.abstractmethod
    def flag_device(self, device_id: str, kind: str, detail: str, now: float) -> bool:
        """Set the device's alert of ``kind`` (``since`` kept when it was set already); True
        when it is new."""

    @abc.abstractmethod
    def clear_device_alerts(self, device_id: str, kinds: Sequence[str]) -> None: ...

    @abc.abstractmethod
    def device_alerts(self, device_id: str = "") -> list[DeviceAlert]:
        """The alerts of one device (or of every device where empty), by device and kind."""

    # --- audit ---
    @abc.abstractmethod
    def append_audit(
        self, now: float, actor: str, action: str, target: str, outcome: str, detail: str,
        role: str = "",
    ) -> AuditRecord: ...

    @abc.abstractmethod
    def audit_chain(self) -> list[AuditRecord]:
        """Every entry in storage order (what verification walks)."""

    @abc.abstractmethod
    def list_audit(self, limit: int) -> list[AuditRecord]:
        """The newest ``limit`` events, oldest first."""

    # --- model registry ---
    @abc.abstractmethod
    def add_model_version(self, record: ModelVersionRecord) -> None:
        """Raise AlreadyExistsError when (name, version) exists with another digest."""

    @abc.abstractmethod
    def get_model_version(self, name: str, version: int) -> ModelVersionRecord | None: ...

    @abc.abstractmethod
    def list_model_versions(self, name: str | None = None) -> list[ModelVersionRecord]:
        """Every version (of one model, or of all), each with a summary of its manifest
        (name, version, created, metrics, compression, runtime); ``get_model_version`` has the
        whole manifest."""

    # --- rollouts and device arms ---
    @abc.abstractmethod
    def set_version_signers(self, name: str, version: int, keyids: Sequence[str]) -> None:
        """Record which publisher keys (ids) signed a published version."""

    @abc.abstractmethod
    def version_signers(self) -> dict[tuple[str, int], tuple[str, ...]]:
        """{(model, version): signer key ids} of every version published with them known."""

    @abc.abstractmethod
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
        """Supersede the model's running rollout and give the first step's devices
        (``first_step``, default all) the version."""

    @abc.abstractmethod
    def assign_version(self, model: str, version: int, device_ids: list[str]) -> None:
        """Give these devices one arm of ``model``: ``version`` (0: none)."""

    @abc.abstractmethod
    def update_rollout(self, rollout_id: int, **fields: Any) -> None:
        """Change state, step, step_started_at, reason or history."""

    @abc.abstractmethod
    def running_rollouts(self) -> list[RolloutRecord]: ...

    @abc.abstractmethod
    def get_rollout(self, model: str) -> RolloutRecord | None:
        """The model's newest rollout."""

    @abc.abstractmethod
    def device_arms(self, device_id: str) -> list[ArmRecord]: ...

    # --- release documents ---
    @abc.abstractmethod
    def get_release(self, device_id: str) -> ReleaseRecord | None: ...

    @abc.abstractmethod
    def put_release(self, record: ReleaseRecord) -> None:
        """Store a device's new release; its serial must exceed the stored one."""

    # --- roots of trust (fleetcore/root.py envelopes) ---
    @abc.abstractmethod
    def published_roots(self) -> list[tuple[int, bytes]]:
        """Every published root as (version, envelope), oldest first."""

    @abc.abstractmethod
    def pending_root(self) -> tuple[int, bytes] | None:
        """The staged next root waiting for signatures, if any."""

    @abc.abstractmethod
    def put_root(self, version: int, envelope: bytes, state: str, now: float) -> None:
        """Store (or replace the pending) root ``version``; a published one is never replaced."""

    @abc.abstractmethod
    def set_device_root(self, device_id: str, version: int, now: float) -> None: ...

    @abc.abstractmethod
    def device_root(self, device_id: str) -> int:
        """The root version the device last reported (0: none)."""

    # --- telemetry ---
    @abc.abstractmethod
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
        """Store the records not seen before (dedup on (device, seq)) and, for those only,
        their derived rows; count ``refused`` (records not stored) for the device; return
        every seq of ``records`` (stored now or before)."""

    @abc.abstractmethod
    def ingest_telemetry_many(self, writes: Sequence[TelemetryWrite]) -> None:
        """``ingest_telemetry`` for each of ``writes``, all in one transaction: all stored or
        none (group commit: the MQTT bridge acknowledges them only after it returns)."""

    @abc.abstractmethod
    def count_refusals(self, refused: Sequence[ReportRefusal], now: float) -> None:
        """Count refusals of records that are not stored (a batch over its quota)."""

    @abc.abstractmethod
    def expire_telemetry(self, raw_before: float, drift_before: float,
                         limit: int = 10_000) -> int:
        """Roll raw telemetry received before ``raw_before`` up into per (device, kind, UTC
        day) counts of records and bytes, and delete it; delete drift windows received before
        ``drift_before``; at most ``limit`` rows of each per call. Return the rows deleted."""

    @abc.abstractmethod
    def telemetry_rollup(self, device_id: str) -> dict[str, tuple[int, int]]:
        """Per kind: (records, bytes) rolled up for the device (expired raw telemetry)."""

    @abc.abstractmethod
    def telemetry_records(self, device_id: str) -> list[TelemetryRecord]:
        """The device's raw records still kept (not yet past retention), by seq."""

    @abc.abstractmethod
    def telemetry_counts(self) -> dict[str, int]:
        """Row counts of the telemetry tables (for operators and tests)."""

    @abc.abstractmethod
    def latest_drift(self, model: str | None) -> list[DriftWindowRecord]:
        """The newest window per device and model."""

    @abc.abstractmethod
    def token_labels(self, token_hash: str, now: float) -> dict[str, str]:
        """The labels an unused, unexpired token grants; TokenError otherwise (reads only)."""

    @abc.abstractmethod
    def report_refusals(self, device_id: str) -> dict[str, int]:
        """How many of the device's reports were refused, by "kind/reason"."""

    @abc.abstractmethod
    def arm_stats(self, model: str) -> list[ArmStatsRecord]:
        """The newest counters per device and version of ``model``."""

    # --- experiments ---
    @abc.abstractmethod
    def start_experiment(self, record: ExperimentRecord) -> None:
        """Record the experiment and give its devices the champion/challenger arms."""

    @abc.abstractmethod
    def stop_experiment(self, model: str, now: float) -> ExperimentRecord:
        """Stop the running experiment and put its devices back on the champion only."""

    @abc.abstractmethod
    def get_experiment(self, model: str) -> ExperimentRecord | None: ...

    @abc.abstractmethod
    def record_decision(self, model: str, decision: str, p_value: float | None, reason: str,
                        now: float, state: ExperimentState) -> None:
        """Record a running experiment's decision and the state it moves to."""

    # --- retraining ---
    @abc.abstractmethod
    def set_policy(self, policy: DriftPolicy) -> None: ...

    @abc.abstractmethod
    def get_policy(self, model: str) -> DriftPolicy | None: ...

    @abc.abstractmethod
    def recent_drift(self, model: str, per_device: int,
                     since: float = 0.0) -> dict[str, list[DriftWindowRecord]]:
        """Each device's newest ``per_device`` windows for ``model`` received after ``since``,
        newest first; revoked devices' windows are left out."""

    @abc.abstractmethod
    def add_job(self, model: str, reason: str, version: int, now: float) -> int: ...

    @abc.abstractmethod
    def update_job(self, job_id: int, state: JobState, now: float | None = None,
                   detail: str = "") -> None: ...

    @abc.abstractmethod
    def jobs(self, model: str | None = None,
             states: tuple[JobState, ...] = ()) -> list[RetrainJob]:
        """Newest first."""

    @abc.abstractmethod
    def take_samples(self, model: str, job_id: int) -> list[SampleRecord]:
        """Assign the model's unused samples, except revoked devices', to ``job_id``; return
        every sample it holds."""

    @abc.abstractmethod
    def unused_sample_regions(self, model: str) -> list[str]:
        """The regions of the model's samples no job has used."""

    @abc.abstractmethod
    def refuse_samples(self, model: str, reasons: Mapping[str, str], category: str,
                       now: float) -> int:
        """Delete the model's unused samples of each region in ``reasons`` and count them
        refused (per model and region with the reason; per device under ``category``)."""

    @abc.abstractmethod
    def release_samples(self, job_id: int) -> None:
        """Give a failed job's samples back to the next job."""

    @abc.abstractmethod
    def sample_summary(self, model: str | None = None) -> list[SampleSummary]: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    # --- observability: metrics and readiness ---
    @abc.abstractmethod
    def ping(self) -> None:
        """A trivial read: raises when the database cannot answer (readiness)."""

    @abc.abstractmethod
    def all_arm_stats(self) -> list[ArmStatsRecord]:
        """Every device's newest counters of every arm (model, version)."""

    @abc.abstractmethod
    def outbox_status(self) -> dict[str, tuple[int, int]]:
        """Device id -> (records its outbox dropped, records waiting in it), as last sent."""

    @abc.abstractmethod
    def refusal_totals(self) -> dict[str, int]:
        """Device id -> reports refused from it, all kinds and reasons."""

    @abc.abstractmethod
    def all_report_refusals(self) -> dict[str, dict[str, int]]:
        """Device id -> its refused reports, "kind/reason" -> count (``report_refusals`` of
        every device in one read)."""

    # --- history ---
    @abc.abstractmethod
    def drift_history(self, model: str, device_id: str, since: float,
                      limit: int) -> tuple[list[DriftWindowRecord], bool]:
        """Drift windows that ended at or after ``since`` (of one model and device, or every
        one where empty), oldest first: the newest ``limit``, and whether more were left out."""

    @abc.abstractmethod
    def drift_days(self, model: str, device_id: str, since: float) -> list[DriftDay]:
        """Daily roll-ups of expired drift windows from ``since``'s day on, oldest first."""

    @abc.abstractmethod
    def arm_history(self, model: str, since: float,
                    limit: int) -> tuple[list[ArmStatsRecord], bool]:
        """The model's arm snapshots taken from ``since`` on, with each device's newest one
        before it (where the series starts); more than ``limit`` taken from ``since`` on:
        ``True`` (the caller refuses such a range)."""

    # --- replicas (several control planes on one database; docs/architecture.md) ---
    def try_lead(self, name: str) -> bool:
        """Whether this process holds (or just took) the leadership called ``name``: exactly
        one process on the database holds it, until it closes the store or dies. One process
        on its own database (SQLite) always leads."""
        return True

    def publish_change(self, what: str) -> None:
        """Tell the other processes on the database that ``what`` changed (a device id whose
        release changed, or ``"roots"``). A no-op where only one process uses the database."""
        del what  # nobody else to tell

    def listen_changes(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call ``callback(what)`` (from another thread) for every change another process
        published; ``"*"`` when some may have been missed (a lost connection). Returns a
        function that stops listening. A no-op where only one process uses the database."""
        return lambda: None

    def shares_blobs(self) -> bool:
        """Whether bundle blobs are kept in the database (several replicas read them)."""
        return False

    @abc.abstractmethod
    def put_blob(self, digest: str, sealed: bytes) -> None:
        """Keep a sealed (encrypted) blob, replacing one of the same digest (a reseal)."""

    @abc.abstractmethod
    def get_blob(self, digest: str) -> bytes | None: ...

    @abc.abstractmethod
    def blob_digests(self) -> list[str]:
        """The digests of the blobs kept in the database."""

