from edgefleet.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeviceStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEVICE_STATUS_UNSPECIFIED: _ClassVar[DeviceStatus]
    DEVICE_STATUS_ONLINE: _ClassVar[DeviceStatus]
    DEVICE_STATUS_OFFLINE: _ClassVar[DeviceStatus]
    DEVICE_STATUS_REVOKED: _ClassVar[DeviceStatus]
DEVICE_STATUS_UNSPECIFIED: DeviceStatus
DEVICE_STATUS_ONLINE: DeviceStatus
DEVICE_STATUS_OFFLINE: DeviceStatus
DEVICE_STATUS_REVOKED: DeviceStatus

class DriftPolicy(_message.Message):
    __slots__ = ("model", "pipeline", "threshold", "device_fraction", "windows", "canary_weight", "approval", "sample_rate", "margin")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    CANARY_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    model: str
    pipeline: str
    threshold: float
    device_fraction: float
    windows: int
    canary_weight: float
    approval: bool
    sample_rate: float
    margin: float
    def __init__(self, model: _Optional[str] = ..., pipeline: _Optional[str] = ..., threshold: _Optional[float] = ..., device_fraction: _Optional[float] = ..., windows: _Optional[int] = ..., canary_weight: _Optional[float] = ..., approval: _Optional[bool] = ..., sample_rate: _Optional[float] = ..., margin: _Optional[float] = ...) -> None: ...

class ListRetrainJobsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class RetrainJob(_message.Message):
    __slots__ = ("id", "model", "state", "reason", "version", "created_at", "finished_at", "detail")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    id: int
    model: str
    state: str
    reason: str
    version: int
    created_at: float
    finished_at: float
    detail: str
    def __init__(self, id: _Optional[int] = ..., model: _Optional[str] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., version: _Optional[int] = ..., created_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., detail: _Optional[str] = ...) -> None: ...

class SampleSummary(_message.Message):
    __slots__ = ("model", "region", "stored", "unused", "devices", "refused")
    class RefusedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    UNUSED_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    model: str
    region: str
    stored: int
    unused: int
    devices: int
    refused: _containers.ScalarMap[str, int]
    def __init__(self, model: _Optional[str] = ..., region: _Optional[str] = ..., stored: _Optional[int] = ..., unused: _Optional[int] = ..., devices: _Optional[int] = ..., refused: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ListRetrainJobsResponse(_message.Message):
    __slots__ = ("jobs", "samples")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[RetrainJob]
    samples: _containers.RepeatedCompositeFieldContainer[SampleSummary]
    def __init__(self, jobs: _Optional[_Iterable[_Union[RetrainJob, _Mapping]]] = ..., samples: _Optional[_Iterable[_Union[SampleSummary, _Mapping]]] = ...) -> None: ...

class VerifyAuditRequest(_message.Message):
    __slots__ = ("checkpoint",)
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    checkpoint: AuditCheckpoint
    def __init__(self, checkpoint: _Optional[_Union[AuditCheckpoint, _Mapping]] = ...) -> None: ...

class AuditVerification(_message.Message):
    __slots__ = ("ok", "entries", "first_bad_seq", "reason", "checkpoint_checked", "checkpoint_ok", "checkpoint_reason")
    OK_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    FIRST_BAD_SEQ_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_CHECKED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_OK_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_REASON_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    entries: int
    first_bad_seq: int
    reason: str
    checkpoint_checked: bool
    checkpoint_ok: bool
    checkpoint_reason: str
    def __init__(self, ok: _Optional[bool] = ..., entries: _Optional[int] = ..., first_bad_seq: _Optional[int] = ..., reason: _Optional[str] = ..., checkpoint_checked: _Optional[bool] = ..., checkpoint_ok: _Optional[bool] = ..., checkpoint_reason: _Optional[str] = ...) -> None: ...

class CheckpointAuditRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AuditCheckpoint(_message.Message):
    __slots__ = ("document", "signature")
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    document: bytes
    signature: bytes
    def __init__(self, document: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class StartExperimentRequest(_message.Message):
    __slots__ = ("model", "challenger", "weight", "selector")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CHALLENGER_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    model: str
    challenger: int
    weight: float
    selector: _containers.ScalarMap[str, str]
    def __init__(self, model: _Optional[str] = ..., challenger: _Optional[int] = ..., weight: _Optional[float] = ..., selector: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetExperimentRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ArmResult(_message.Message):
    __slots__ = ("version", "role", "weight", "requests", "errors", "p50_ms", "p95_ms", "labelled", "correct", "devices", "accuracy_low", "accuracy_high", "task", "mae", "mae_low", "mae_high")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P95_MS_FIELD_NUMBER: _ClassVar[int]
    LABELLED_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_LOW_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_HIGH_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    MAE_FIELD_NUMBER: _ClassVar[int]
    MAE_LOW_FIELD_NUMBER: _ClassVar[int]
    MAE_HIGH_FIELD_NUMBER: _ClassVar[int]
    version: int
    role: str
    weight: float
    requests: int
    errors: int
    p50_ms: float
    p95_ms: float
    labelled: int
    correct: int
    devices: int
    accuracy_low: float
    accuracy_high: float
    task: str
    mae: float
    mae_low: float
    mae_high: float
    def __init__(self, version: _Optional[int] = ..., role: _Optional[str] = ..., weight: _Optional[float] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., p50_ms: _Optional[float] = ..., p95_ms: _Optional[float] = ..., labelled: _Optional[int] = ..., correct: _Optional[int] = ..., devices: _Optional[int] = ..., accuracy_low: _Optional[float] = ..., accuracy_high: _Optional[float] = ..., task: _Optional[str] = ..., mae: _Optional[float] = ..., mae_low: _Optional[float] = ..., mae_high: _Optional[float] = ...) -> None: ...

class Experiment(_message.Message):
    __slots__ = ("model", "champion", "challenger", "weight", "state", "selector", "device_ids", "arms", "created_at", "decision", "p_value", "test", "decision_reason", "min_samples", "task")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CHAMPION_FIELD_NUMBER: _ClassVar[int]
    CHALLENGER_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    DEVICE_IDS_FIELD_NUMBER: _ClassVar[int]
    ARMS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    TEST_FIELD_NUMBER: _ClassVar[int]
    DECISION_REASON_FIELD_NUMBER: _ClassVar[int]
    MIN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    model: str
    champion: int
    challenger: int
    weight: float
    state: str
    selector: _containers.ScalarMap[str, str]
    device_ids: _containers.RepeatedScalarFieldContainer[str]
    arms: _containers.RepeatedCompositeFieldContainer[ArmResult]
    created_at: float
    decision: str
    p_value: float
    test: str
    decision_reason: str
    min_samples: int
    task: str
    def __init__(self, model: _Optional[str] = ..., champion: _Optional[int] = ..., challenger: _Optional[int] = ..., weight: _Optional[float] = ..., state: _Optional[str] = ..., selector: _Optional[_Mapping[str, str]] = ..., device_ids: _Optional[_Iterable[str]] = ..., arms: _Optional[_Iterable[_Union[ArmResult, _Mapping]]] = ..., created_at: _Optional[float] = ..., decision: _Optional[str] = ..., p_value: _Optional[float] = ..., test: _Optional[str] = ..., decision_reason: _Optional[str] = ..., min_samples: _Optional[int] = ..., task: _Optional[str] = ...) -> None: ...

class GetDriftRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class DriftWindowReport(_message.Message):
    __slots__ = ("device_id", "model", "version", "start", "end", "rows", "score", "drifted", "prediction_psi", "drifted_features", "feature_psi")
    class FeaturePsiEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DRIFTED_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_PSI_FIELD_NUMBER: _ClassVar[int]
    DRIFTED_FEATURES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_PSI_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    model: str
    version: int
    start: float
    end: float
    rows: int
    score: float
    drifted: bool
    prediction_psi: float
    drifted_features: _containers.RepeatedScalarFieldContainer[str]
    feature_psi: _containers.ScalarMap[str, float]
    def __init__(self, device_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., start: _Optional[float] = ..., end: _Optional[float] = ..., rows: _Optional[int] = ..., score: _Optional[float] = ..., drifted: _Optional[bool] = ..., prediction_psi: _Optional[float] = ..., drifted_features: _Optional[_Iterable[str]] = ..., feature_psi: _Optional[_Mapping[str, float]] = ...) -> None: ...

class DriftModelSummary(_message.Message):
    __slots__ = ("model", "devices", "drifted_devices", "mean_score")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    DRIFTED_DEVICES_FIELD_NUMBER: _ClassVar[int]
    MEAN_SCORE_FIELD_NUMBER: _ClassVar[int]
    model: str
    devices: int
    drifted_devices: int
    mean_score: float
    def __init__(self, model: _Optional[str] = ..., devices: _Optional[int] = ..., drifted_devices: _Optional[int] = ..., mean_score: _Optional[float] = ...) -> None: ...

class DriftReport(_message.Message):
    __slots__ = ("latest", "fleet")
    LATEST_FIELD_NUMBER: _ClassVar[int]
    FLEET_FIELD_NUMBER: _ClassVar[int]
    latest: _containers.RepeatedCompositeFieldContainer[DriftWindowReport]
    fleet: _containers.RepeatedCompositeFieldContainer[DriftModelSummary]
    def __init__(self, latest: _Optional[_Iterable[_Union[DriftWindowReport, _Mapping]]] = ..., fleet: _Optional[_Iterable[_Union[DriftModelSummary, _Mapping]]] = ...) -> None: ...

class PublishModelChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("name", "version", "digest", "length", "created_at", "published_by", "publisher_key", "manifest_json", "manifest_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_BY_FIELD_NUMBER: _ClassVar[int]
    PUBLISHER_KEY_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    digest: str
    length: int
    created_at: float
    published_by: str
    publisher_key: str
    manifest_json: str
    manifest_bytes: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., digest: _Optional[str] = ..., length: _Optional[int] = ..., created_at: _Optional[float] = ..., published_by: _Optional[str] = ..., publisher_key: _Optional[str] = ..., manifest_json: _Optional[str] = ..., manifest_bytes: _Optional[int] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ...) -> None: ...

class StartRolloutRequest(_message.Message):
    __slots__ = ("model", "version", "selector", "steps", "bake_seconds", "gates", "on_failure")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BAKE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GATES_FIELD_NUMBER: _ClassVar[int]
    ON_FAILURE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    selector: _containers.ScalarMap[str, str]
    steps: _containers.RepeatedScalarFieldContainer[int]
    bake_seconds: float
    gates: _containers.RepeatedScalarFieldContainer[str]
    on_failure: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., selector: _Optional[_Mapping[str, str]] = ..., steps: _Optional[_Iterable[int]] = ..., bake_seconds: _Optional[float] = ..., gates: _Optional[_Iterable[str]] = ..., on_failure: _Optional[str] = ...) -> None: ...

class RolloutActionRequest(_message.Message):
    __slots__ = ("model", "action")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    model: str
    action: str
    def __init__(self, model: _Optional[str] = ..., action: _Optional[str] = ...) -> None: ...

class GetRolloutRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class RolloutDevice(_message.Message):
    __slots__ = ("device_id", "desired_version", "reported_version", "reported_state", "reason", "release_serial", "step")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    DESIRED_VERSION_FIELD_NUMBER: _ClassVar[int]
    REPORTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    REPORTED_STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RELEASE_SERIAL_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    desired_version: int
    reported_version: int
    reported_state: str
    reason: str
    release_serial: int
    step: int
    def __init__(self, device_id: _Optional[str] = ..., desired_version: _Optional[int] = ..., reported_version: _Optional[int] = ..., reported_state: _Optional[str] = ..., reason: _Optional[str] = ..., release_serial: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class Rollout(_message.Message):
    __slots__ = ("model", "version", "selector", "state", "created_at", "created_by", "devices", "steps", "step", "bake_seconds", "gates", "on_failure", "previous_version", "reason", "history", "task", "quality")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    BAKE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GATES_FIELD_NUMBER: _ClassVar[int]
    ON_FAILURE_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    selector: _containers.ScalarMap[str, str]
    state: str
    created_at: float
    created_by: str
    devices: _containers.RepeatedCompositeFieldContainer[RolloutDevice]
    steps: _containers.RepeatedScalarFieldContainer[int]
    step: int
    bake_seconds: float
    gates: _containers.RepeatedScalarFieldContainer[str]
    on_failure: str
    previous_version: int
    reason: str
    history: _containers.RepeatedScalarFieldContainer[str]
    task: str
    quality: _containers.RepeatedCompositeFieldContainer[VersionQuality]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., selector: _Optional[_Mapping[str, str]] = ..., state: _Optional[str] = ..., created_at: _Optional[float] = ..., created_by: _Optional[str] = ..., devices: _Optional[_Iterable[_Union[RolloutDevice, _Mapping]]] = ..., steps: _Optional[_Iterable[int]] = ..., step: _Optional[int] = ..., bake_seconds: _Optional[float] = ..., gates: _Optional[_Iterable[str]] = ..., on_failure: _Optional[str] = ..., previous_version: _Optional[int] = ..., reason: _Optional[str] = ..., history: _Optional[_Iterable[str]] = ..., task: _Optional[str] = ..., quality: _Optional[_Iterable[_Union[VersionQuality, _Mapping]]] = ...) -> None: ...

class VersionQuality(_message.Message):
    __slots__ = ("version", "labelled", "accuracy", "accuracy_low", "accuracy_high", "mae", "mae_low", "mae_high")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELLED_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_LOW_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_HIGH_FIELD_NUMBER: _ClassVar[int]
    MAE_FIELD_NUMBER: _ClassVar[int]
    MAE_LOW_FIELD_NUMBER: _ClassVar[int]
    MAE_HIGH_FIELD_NUMBER: _ClassVar[int]
    version: int
    labelled: int
    accuracy: float
    accuracy_low: float
    accuracy_high: float
    mae: float
    mae_low: float
    mae_high: float
    def __init__(self, version: _Optional[int] = ..., labelled: _Optional[int] = ..., accuracy: _Optional[float] = ..., accuracy_low: _Optional[float] = ..., accuracy_high: _Optional[float] = ..., mae: _Optional[float] = ..., mae_low: _Optional[float] = ..., mae_high: _Optional[float] = ...) -> None: ...

class CreateEnrollmentTokenRequest(_message.Message):
    __slots__ = ("ttl_seconds", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ttl_seconds: int
    labels: _containers.ScalarMap[str, str]
    def __init__(self, ttl_seconds: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CreateEnrollmentTokenResponse(_message.Message):
    __slots__ = ("token", "expires_at")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    token: str
    expires_at: float
    def __init__(self, token: _Optional[str] = ..., expires_at: _Optional[float] = ...) -> None: ...

class Device(_message.Message):
    __slots__ = ("id", "labels", "status", "enrolled_at", "last_seen", "agent_version", "host", "models", "certificate_serial", "certificate_expires_at", "revoked_at", "transport", "refused_reports", "alerts", "root_version")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class RefusedReportsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ENROLLED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_SERIAL_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    REFUSED_REPORTS_FIELD_NUMBER: _ClassVar[int]
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    ROOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    id: str
    labels: _containers.ScalarMap[str, str]
    status: DeviceStatus
    enrolled_at: float
    last_seen: float
    agent_version: str
    host: _common_pb2.HostFacts
    models: _containers.RepeatedCompositeFieldContainer[_common_pb2.InstalledModel]
    certificate_serial: str
    certificate_expires_at: float
    revoked_at: float
    transport: str
    refused_reports: _containers.ScalarMap[str, int]
    alerts: _containers.RepeatedCompositeFieldContainer[DeviceAlert]
    root_version: int
    def __init__(self, id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., status: _Optional[_Union[DeviceStatus, str]] = ..., enrolled_at: _Optional[float] = ..., last_seen: _Optional[float] = ..., agent_version: _Optional[str] = ..., host: _Optional[_Union[_common_pb2.HostFacts, _Mapping]] = ..., models: _Optional[_Iterable[_Union[_common_pb2.InstalledModel, _Mapping]]] = ..., certificate_serial: _Optional[str] = ..., certificate_expires_at: _Optional[float] = ..., revoked_at: _Optional[float] = ..., transport: _Optional[str] = ..., refused_reports: _Optional[_Mapping[str, int]] = ..., alerts: _Optional[_Iterable[_Union[DeviceAlert, _Mapping]]] = ..., root_version: _Optional[int] = ...) -> None: ...

class DeviceAlert(_message.Message):
    __slots__ = ("kind", "detail", "since", "updated_at")
    KIND_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    kind: str
    detail: str
    since: float
    updated_at: float
    def __init__(self, kind: _Optional[str] = ..., detail: _Optional[str] = ..., since: _Optional[float] = ..., updated_at: _Optional[float] = ...) -> None: ...

class ListDevicesRequest(_message.Message):
    __slots__ = ("selector",)
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    selector: _containers.ScalarMap[str, str]
    def __init__(self, selector: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ListDevicesResponse(_message.Message):
    __slots__ = ("devices",)
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    def __init__(self, devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ...) -> None: ...

class GetDeviceRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class RevokeDeviceRequest(_message.Message):
    __slots__ = ("id", "reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    reason: str
    def __init__(self, id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CreateOperatorRequest(_message.Message):
    __slots__ = ("name", "role", "csr_pem")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    csr_pem: bytes
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., csr_pem: _Optional[bytes] = ...) -> None: ...

class CreateOperatorResponse(_message.Message):
    __slots__ = ("certificate_pem", "ca_pem")
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    certificate_pem: bytes
    ca_pem: bytes
    def __init__(self, certificate_pem: _Optional[bytes] = ..., ca_pem: _Optional[bytes] = ...) -> None: ...

class Operator(_message.Message):
    __slots__ = ("name", "role", "created_at", "created_by", "revoked_at", "certificate_serials")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_SERIALS_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    created_at: float
    created_by: str
    revoked_at: float
    certificate_serials: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., created_at: _Optional[float] = ..., created_by: _Optional[str] = ..., revoked_at: _Optional[float] = ..., certificate_serials: _Optional[_Iterable[str]] = ...) -> None: ...

class ListOperatorsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListOperatorsResponse(_message.Message):
    __slots__ = ("operators",)
    OPERATORS_FIELD_NUMBER: _ClassVar[int]
    operators: _containers.RepeatedCompositeFieldContainer[Operator]
    def __init__(self, operators: _Optional[_Iterable[_Union[Operator, _Mapping]]] = ...) -> None: ...

class RevokeOperatorRequest(_message.Message):
    __slots__ = ("name", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    reason: str
    def __init__(self, name: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ListAuditEventsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("seq", "time", "actor", "action", "target", "outcome", "detail", "role")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    time: float
    actor: str
    action: str
    target: str
    outcome: str
    detail: str
    role: str
    def __init__(self, seq: _Optional[int] = ..., time: _Optional[float] = ..., actor: _Optional[str] = ..., action: _Optional[str] = ..., target: _Optional[str] = ..., outcome: _Optional[str] = ..., detail: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...

class ListAuditEventsResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[AuditEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[AuditEvent, _Mapping]]] = ...) -> None: ...

class GetDriftHistoryRequest(_message.Message):
    __slots__ = ("model", "device_id", "since", "limit")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    model: str
    device_id: str
    since: float
    limit: int
    def __init__(self, model: _Optional[str] = ..., device_id: _Optional[str] = ..., since: _Optional[float] = ..., limit: _Optional[int] = ...) -> None: ...

class DriftDay(_message.Message):
    __slots__ = ("device_id", "model", "version", "day", "windows", "drifted", "rows", "mean_score", "max_score")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DAY_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    DRIFTED_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    MEAN_SCORE_FIELD_NUMBER: _ClassVar[int]
    MAX_SCORE_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    model: str
    version: int
    day: int
    windows: int
    drifted: int
    rows: int
    mean_score: float
    max_score: float
    def __init__(self, device_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., day: _Optional[int] = ..., windows: _Optional[int] = ..., drifted: _Optional[int] = ..., rows: _Optional[int] = ..., mean_score: _Optional[float] = ..., max_score: _Optional[float] = ...) -> None: ...

class DriftHistory(_message.Message):
    __slots__ = ("since", "windows", "days", "truncated")
    SINCE_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    DAYS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    since: float
    windows: _containers.RepeatedCompositeFieldContainer[DriftWindowReport]
    days: _containers.RepeatedCompositeFieldContainer[DriftDay]
    truncated: bool
    def __init__(self, since: _Optional[float] = ..., windows: _Optional[_Iterable[_Union[DriftWindowReport, _Mapping]]] = ..., days: _Optional[_Iterable[_Union[DriftDay, _Mapping]]] = ..., truncated: _Optional[bool] = ...) -> None: ...

class GetArmHistoryRequest(_message.Message):
    __slots__ = ("model", "since", "step_seconds")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    since: float
    step_seconds: float
    def __init__(self, model: _Optional[str] = ..., since: _Optional[float] = ..., step_seconds: _Optional[float] = ...) -> None: ...

class ArmPoint(_message.Message):
    __slots__ = ("time", "version", "requests", "errors", "labelled", "correct", "abs_error_sum", "p95_ms", "devices")
    TIME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    LABELLED_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    ABS_ERROR_SUM_FIELD_NUMBER: _ClassVar[int]
    P95_MS_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    time: float
    version: int
    requests: int
    errors: int
    labelled: int
    correct: int
    abs_error_sum: float
    p95_ms: float
    devices: int
    def __init__(self, time: _Optional[float] = ..., version: _Optional[int] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., labelled: _Optional[int] = ..., correct: _Optional[int] = ..., abs_error_sum: _Optional[float] = ..., p95_ms: _Optional[float] = ..., devices: _Optional[int] = ...) -> None: ...

class ArmHistory(_message.Message):
    __slots__ = ("model", "since", "step_seconds", "points")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    since: float
    step_seconds: float
    points: _containers.RepeatedCompositeFieldContainer[ArmPoint]
    def __init__(self, model: _Optional[str] = ..., since: _Optional[float] = ..., step_seconds: _Optional[float] = ..., points: _Optional[_Iterable[_Union[ArmPoint, _Mapping]]] = ...) -> None: ...

class Publisher(_message.Message):
    __slots__ = ("keyid", "public_key_pem")
    KEYID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    keyid: str
    public_key_pem: bytes
    def __init__(self, keyid: _Optional[str] = ..., public_key_pem: _Optional[bytes] = ...) -> None: ...

class ListPublishersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPublishersResponse(_message.Message):
    __slots__ = ("publishers", "threshold", "root_version", "pending_version", "changed_keyid", "change_root_version", "change_published", "rolled_back")
    PUBLISHERS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ROOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PENDING_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANGED_KEYID_FIELD_NUMBER: _ClassVar[int]
    CHANGE_ROOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANGE_PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_FIELD_NUMBER: _ClassVar[int]
    publishers: _containers.RepeatedCompositeFieldContainer[Publisher]
    threshold: int
    root_version: int
    pending_version: int
    changed_keyid: str
    change_root_version: int
    change_published: bool
    rolled_back: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, publishers: _Optional[_Iterable[_Union[Publisher, _Mapping]]] = ..., threshold: _Optional[int] = ..., root_version: _Optional[int] = ..., pending_version: _Optional[int] = ..., changed_keyid: _Optional[str] = ..., change_root_version: _Optional[int] = ..., change_published: _Optional[bool] = ..., rolled_back: _Optional[_Iterable[str]] = ...) -> None: ...

class AddPublisherRequest(_message.Message):
    __slots__ = ("public_key_pem", "threshold")
    PUBLIC_KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    public_key_pem: bytes
    threshold: int
    def __init__(self, public_key_pem: _Optional[bytes] = ..., threshold: _Optional[int] = ...) -> None: ...

class RevokePublisherRequest(_message.Message):
    __slots__ = ("keyid", "rollback", "threshold")
    KEYID_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    keyid: str
    rollback: bool
    threshold: int
    def __init__(self, keyid: _Optional[str] = ..., rollback: _Optional[bool] = ..., threshold: _Optional[int] = ...) -> None: ...
