"""Records of the control plane: what services and storage exchange (no protobuf, no I/O).

Every state is an enum (``enum.StrEnum``: stored and compared as its text); the transition
tables that move them live beside the rules that use them (``rollout_plan``, ``experiments``,
``retraining``)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = [
    "ArmRecord",
    "ArmStatsRecord",
    "AuditOutcome",
    "AuditRecord",
    "CertificateRecord",
    "DeviceRecord",
    "DeviceStatus",
    "DeviceView",
    "DriftWindowRecord",
    "ExperimentRecord",
    "ExperimentState",
    "InstalledModel",
    "JobState",
    "ModelVersionRecord",
    "ReleaseRecord",
    "RetrainJob",
    "RolloutRecord",
    "RolloutState",
    "TelemetryRecord",
]


class DeviceStatus(enum.Enum):
    ONLINE = "online"
    OFFLINE = "offline"
    REVOKED = "revoked"


class RolloutState(enum.StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled-back"
    SUPERSEDED = "superseded"


class ExperimentState(enum.StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"
    PROMOTED = "promoted"


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # published and started as a canary
    AWAITING_APPROVAL = "awaiting-approval"  # published; an operator starts the canary
    REJECTED = "rejected"  # not better than the champion by the policy's margin
    FAILED = "failed"


@dataclass(frozen=True)
class InstalledModel:
    """One model version as a device reports it (its words: bounded, not trusted)."""

    name: str
    version: int
    state: str  # the agent's install state (downloading, smoke-tested, committed, failed, ...)
    bundle_digest: str = ""
    reason: str = ""
    serving: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "state": self.state,
                "bundle_digest": self.bundle_digest, "reason": self.reason,
                "serving": self.serving}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> InstalledModel:
        """From what storage wrote (``to_json``)."""
        return cls(str(doc.get("name", "")), int(doc.get("version", 0)),
                   str(doc.get("state", "")), str(doc.get("bundle_digest", "")),
                   str(doc.get("reason", "")), bool(doc.get("serving", False)))


class AuditOutcome(enum.Enum):
    ALLOWED = "allowed"
    DENIED = "denied"
    FAILED = "failed"


@dataclass
class DeviceRecord:
    id: str
    labels: dict[str, str]
    enrolled_at: float
    last_seen: float | None = None
    agent_version: str = ""
    host: dict[str, Any] = field(default_factory=dict)
    models: list[InstalledModel] = field(default_factory=list)
    revoked_at: float | None = None
    cert_serial: str = ""
    cert_not_after: float = 0.0

    def status(self, now: float, offline_after_seconds: float,
               disconnected: bool = False) -> DeviceStatus:
        """``disconnected``: its MQTT will said so (before the heartbeats lapse)."""
        if self.revoked_at is not None:
            return DeviceStatus.REVOKED
        if (self.last_seen is not None and now - self.last_seen <= offline_after_seconds
                and not disconnected):
            return DeviceStatus.ONLINE
        return DeviceStatus.OFFLINE


@dataclass(frozen=True)
class DeviceView:
    record: DeviceRecord
    status: DeviceStatus
    # Reports refused from this device, "kind/reason" -> count (filled where shown in full).
    refused: dict[str, int] = field(default_factory=dict)
    # What detection flagged on it (clone-suspected, freeze, slow-retrieval).
    alerts: tuple[DeviceAlert, ...] = ()
    root_version: int = 0  # the root of trust version its last heartbeat reported


@dataclass(frozen=True)
class CertificateRecord:
    serial: str
    kind: str  # "device" | "operator"
    subject: str
    not_before: float
    not_after: float
    issued_at: float
    revoked_at: float | None = None
    issuer: str = ""  # the issuing CA's key id (pki.key_id); "" for before CA rotations


@dataclass(frozen=True)
class ModelVersionRecord:
    name: str
    version: int
    digest: str
    length: int
    created_at: float
    published_by: str
    publisher_key: str
    manifest: str  # JSON: the whole manifest, or a summary (``manifest_bytes`` says how big)
    manifest_bytes: int = 0


@dataclass(frozen=True)
class ArmRecord:
    model: str
    version: int
    weight: float
    shadow: bool = False


@dataclass(frozen=True)
class RolloutRecord:
    id: int
    model: str
    version: int
    selector: dict[str, str]
    state: RolloutState
    created_at: float
    created_by: str
    device_ids: tuple[str, ...]  # every device the rollout targets (its last step)
    steps: tuple[int, ...] = (100,)  # cumulative percentages
    step: int = 0  # index into steps
    step_started_at: float = 0.0
    bake_seconds: float = 0.0
    gates: tuple[str, ...] = ()
    on_failure: str = "pause"  # pause | rollback
    previous_version: int = 0  # what the devices had before (0: nothing)
    reason: str = ""
    history: tuple[str, ...] = ()
    device_timeout_seconds: float = 600.0


@dataclass(frozen=True)
class ReleaseRecord:
    device_id: str
    serial: int
    document: bytes
    signature: bytes
    issued_at: float
    expires_at: float
    content: str  # digest of the arms it carries, to tell a renewal from a change


class TelemetryRecord(NamedTuple):  # a tuple: cheap to build, a batch holds hundreds
    seq: int
    kind: str
    created_at: float
    payload: bytes


@dataclass(frozen=True)
class DriftWindowRecord:
    device_id: str
    model: str
    version: int
    start: float
    end: float
    rows: int
    score: float
    drifted: bool
    prediction_psi: float
    drifted_features: tuple[str, ...]
    # Each feature's PSI against the bundle's profile (kept for history and plots).
    feature_psi: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ArmStatsRecord:
    """A device's counters for one model version since the agent started serving it."""

    device_id: str
    model: str
    version: int
    requests: int
    errors: int
    p50_ms: float
    p95_ms: float
    labelled: int
    correct: int
    updated_at: float
    # A regression model's arm: sums of |error| and error^2 over the labelled rows (0 for a
    # classifier, whose evidence is ``correct``).
    abs_error_sum: float = 0.0
    sq_error_sum: float = 0.0


@dataclass(frozen=True)
class ExperimentRecord:
    model: str
    champion: int
    challenger: int
    weight: float
    state: ExperimentState
    selector: dict[str, str]
    device_ids: tuple[str, ...]
    created_at: float
    created_by: str
    decision: str = ""  # "", promote, stop (made once; see domain.experiments)
    p_value: float | None = None
    decision_reason: str = ""
    decided_at: float | None = None


@dataclass(frozen=True)
class SampleRecord:
    """Labelled rows a device contributed (its PII columns pseudonymized on the device)."""

    device_id: str
    model: str
    version: int  # the model version that served the rows
    features: list[list[float]]
    labels: list[int] | list[float]  # class ids, or a regression model's finite targets
    pii: dict[str, list[str]]  # column -> hex HMAC per row (columns the manifest drops: absent)
    region: str = ""  # the device's region label, set when the sample is vetted


@dataclass(frozen=True)
class SampleRefusal:
    """A sample the control plane refused; only counted, never stored (per model and region
    with its reason, and per device in ``report_refusals`` under ``category``)."""

    model: str
    region: str
    reason: str
    device_id: str = ""
    category: str = "sample-refused"  # a fixed category (``domain.telemetry.REFUSALS``)


@dataclass(frozen=True)
class SampleSummary:
    model: str
    region: str
    stored: int  # stored samples (rows), all jobs
    unused: int  # rows not yet used by a retraining job
    devices: int
    refused: dict[str, int]  # reason -> records refused


@dataclass(frozen=True)
class ReportRefusal:
    """A device's report the control plane refused (counted per device, never stored):
    ``reason`` is a fixed category (``domain.telemetry.REFUSALS``), so the counters stay few."""

    device_id: str
    kind: str
    reason: str
    count: int = 1


Derived = DriftWindowRecord | ArmStatsRecord | SampleRecord | SampleRefusal | ReportRefusal


@dataclass(frozen=True)
class RetrainJob:
    id: int
    model: str
    state: JobState
    reason: str
    version: int  # the version the job's bundle gets
    created_at: float
    finished_at: float | None = None
    detail: str = ""


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    time: float
    actor: str
    action: str
    target: str
    outcome: str
    detail: str  # canonical JSON
    prev_hash: str
    hash: str
    role: str = ""  # the operator's role when the actor is an operator


@dataclass(frozen=True)
class DeviceAlert:
    """What detection flagged on a device (docs/security.md, "Detection"): ``kind`` is
    clone-suspected (by the control plane) or a delivery problem the device reported (freeze,
    slow-retrieval); ``detail`` a JSON object."""

    device_id: str
    kind: str
    detail: str
    since: float
    updated_at: float


@dataclass(frozen=True)
class OperatorRecord:
    name: str
    role: str
    created_at: float
    created_by: str
    revoked_at: float | None = None
    certificate_serials: tuple[str, ...] = ()
