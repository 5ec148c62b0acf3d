from edgefleet.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TelemetryRecord(_message.Message):
    __slots__ = ("seq", "kind", "created_at", "payload")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    seq: int
    kind: str
    created_at: float
    payload: bytes
    def __init__(self, seq: _Optional[int] = ..., kind: _Optional[str] = ..., created_at: _Optional[float] = ..., payload: _Optional[bytes] = ...) -> None: ...

class TelemetryColumns(_message.Message):
    __slots__ = ("seqs", "created_at", "kinds", "kind_index", "payload_sizes", "payloads")
    SEQS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    KIND_INDEX_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZES_FIELD_NUMBER: _ClassVar[int]
    PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    seqs: bytes
    created_at: bytes
    kinds: _containers.RepeatedScalarFieldContainer[str]
    kind_index: bytes
    payload_sizes: bytes
    payloads: bytes
    def __init__(self, seqs: _Optional[bytes] = ..., created_at: _Optional[bytes] = ..., kinds: _Optional[_Iterable[str]] = ..., kind_index: _Optional[bytes] = ..., payload_sizes: _Optional[bytes] = ..., payloads: _Optional[bytes] = ...) -> None: ...

class TelemetryBatch(_message.Message):
    __slots__ = ("records", "dropped", "depth", "columns", "ack_runs")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    ACK_RUNS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[TelemetryRecord]
    dropped: int
    depth: int
    columns: TelemetryColumns
    ack_runs: bool
    def __init__(self, records: _Optional[_Iterable[_Union[TelemetryRecord, _Mapping]]] = ..., dropped: _Optional[int] = ..., depth: _Optional[int] = ..., columns: _Optional[_Union[TelemetryColumns, _Mapping]] = ..., ack_runs: _Optional[bool] = ...) -> None: ...

class TelemetryAck(_message.Message):
    __slots__ = ("acked", "runs")
    ACKED_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    acked: _containers.RepeatedScalarFieldContainer[int]
    runs: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, acked: _Optional[_Iterable[int]] = ..., runs: _Optional[_Iterable[int]] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("token", "csr_pem", "labels", "host", "agent_version")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    token: str
    csr_pem: bytes
    labels: _containers.ScalarMap[str, str]
    host: _common_pb2.HostFacts
    agent_version: str
    def __init__(self, token: _Optional[str] = ..., csr_pem: _Optional[bytes] = ..., labels: _Optional[_Mapping[str, str]] = ..., host: _Optional[_Union[_common_pb2.HostFacts, _Mapping]] = ..., agent_version: _Optional[str] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("device_id", "certificate_pem", "ca_pem", "release_public_key_pem", "publisher_public_keys_pem", "api_address", "mqtt_url", "labels", "heartbeat_interval_seconds", "root", "api_addresses")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    RELEASE_PUBLIC_KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    PUBLISHER_PUBLIC_KEYS_PEM_FIELD_NUMBER: _ClassVar[int]
    API_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MQTT_URL_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ROOT_FIELD_NUMBER: _ClassVar[int]
    API_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    certificate_pem: bytes
    ca_pem: bytes
    release_public_key_pem: bytes
    publisher_public_keys_pem: _containers.RepeatedScalarFieldContainer[bytes]
    api_address: str
    mqtt_url: str
    labels: _containers.ScalarMap[str, str]
    heartbeat_interval_seconds: int
    root: bytes
    api_addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, device_id: _Optional[str] = ..., certificate_pem: _Optional[bytes] = ..., ca_pem: _Optional[bytes] = ..., release_public_key_pem: _Optional[bytes] = ..., publisher_public_keys_pem: _Optional[_Iterable[bytes]] = ..., api_address: _Optional[str] = ..., mqtt_url: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., heartbeat_interval_seconds: _Optional[int] = ..., root: _Optional[bytes] = ..., api_addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class RenewCertificateRequest(_message.Message):
    __slots__ = ("csr_pem",)
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    csr_pem: bytes
    def __init__(self, csr_pem: _Optional[bytes] = ...) -> None: ...

class RenewCertificateResponse(_message.Message):
    __slots__ = ("certificate_pem", "ca_pem")
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    certificate_pem: bytes
    ca_pem: bytes
    def __init__(self, certificate_pem: _Optional[bytes] = ..., ca_pem: _Optional[bytes] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("agent_version", "host", "models", "uptime_seconds", "release_serial", "release_digest", "session_id", "delivery_problems", "root_version")
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_SERIAL_FIELD_NUMBER: _ClassVar[int]
    RELEASE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    ROOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    agent_version: str
    host: _common_pb2.HostFacts
    models: _containers.RepeatedCompositeFieldContainer[_common_pb2.InstalledModel]
    uptime_seconds: int
    release_serial: int
    release_digest: str
    session_id: str
    delivery_problems: _containers.RepeatedCompositeFieldContainer[DeliveryProblem]
    root_version: int
    def __init__(self, agent_version: _Optional[str] = ..., host: _Optional[_Union[_common_pb2.HostFacts, _Mapping]] = ..., models: _Optional[_Iterable[_Union[_common_pb2.InstalledModel, _Mapping]]] = ..., uptime_seconds: _Optional[int] = ..., release_serial: _Optional[int] = ..., release_digest: _Optional[str] = ..., session_id: _Optional[str] = ..., delivery_problems: _Optional[_Iterable[_Union[DeliveryProblem, _Mapping]]] = ..., root_version: _Optional[int] = ...) -> None: ...

class DeliveryProblem(_message.Message):
    __slots__ = ("kind", "detail", "since")
    KIND_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    detail: str
    since: float
    def __init__(self, kind: _Optional[str] = ..., detail: _Optional[str] = ..., since: _Optional[float] = ...) -> None: ...

class AgentStatus(_message.Message):
    __slots__ = ("online", "heartbeat")
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    online: bool
    heartbeat: HeartbeatRequest
    def __init__(self, online: _Optional[bool] = ..., heartbeat: _Optional[_Union[HeartbeatRequest, _Mapping]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("server_time", "heartbeat_interval_seconds", "release_serial")
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_SERIAL_FIELD_NUMBER: _ClassVar[int]
    server_time: float
    heartbeat_interval_seconds: int
    release_serial: int
    def __init__(self, server_time: _Optional[float] = ..., heartbeat_interval_seconds: _Optional[int] = ..., release_serial: _Optional[int] = ...) -> None: ...

class SyncRequest(_message.Message):
    __slots__ = ("have_serial", "session_id", "have_root_version")
    HAVE_SERIAL_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HAVE_ROOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    have_serial: int
    session_id: str
    have_root_version: int
    def __init__(self, have_serial: _Optional[int] = ..., session_id: _Optional[str] = ..., have_root_version: _Optional[int] = ...) -> None: ...

class SyncEvent(_message.Message):
    __slots__ = ("release", "trace_context", "roots")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    ROOTS_FIELD_NUMBER: _ClassVar[int]
    release: _common_pb2.SignedRelease
    trace_context: _containers.ScalarMap[str, str]
    roots: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, release: _Optional[_Union[_common_pb2.SignedRelease, _Mapping]] = ..., trace_context: _Optional[_Mapping[str, str]] = ..., roots: _Optional[_Iterable[bytes]] = ...) -> None: ...

class FetchBundleRequest(_message.Message):
    __slots__ = ("digest", "offset", "length")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    digest: str
    offset: int
    length: int
    def __init__(self, digest: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class BundleChunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...
