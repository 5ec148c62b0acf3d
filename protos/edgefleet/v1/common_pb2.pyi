from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HostFacts(_message.Message):
    __slots__ = ("hostname", "os", "arch", "cpu_count", "memory_bytes", "python_version")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    OS_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PYTHON_VERSION_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    os: str
    arch: str
    cpu_count: int
    memory_bytes: int
    python_version: str
    def __init__(self, hostname: _Optional[str] = ..., os: _Optional[str] = ..., arch: _Optional[str] = ..., cpu_count: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., python_version: _Optional[str] = ...) -> None: ...

class InstalledModel(_message.Message):
    __slots__ = ("name", "version", "state", "bundle_digest", "reason", "serving")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    state: str
    bundle_digest: str
    reason: str
    serving: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[str] = ..., bundle_digest: _Optional[str] = ..., reason: _Optional[str] = ..., serving: _Optional[bool] = ...) -> None: ...

class SignedRelease(_message.Message):
    __slots__ = ("document", "signature", "signatures")
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    document: bytes
    signature: bytes
    signatures: _containers.RepeatedCompositeFieldContainer[KeySignature]
    def __init__(self, document: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., signatures: _Optional[_Iterable[_Union[KeySignature, _Mapping]]] = ...) -> None: ...

class KeySignature(_message.Message):
    __slots__ = ("keyid", "sig")
    KEYID_FIELD_NUMBER: _ClassVar[int]
    SIG_FIELD_NUMBER: _ClassVar[int]
    keyid: str
    sig: bytes
    def __init__(self, keyid: _Optional[str] = ..., sig: _Optional[bytes] = ...) -> None: ...
