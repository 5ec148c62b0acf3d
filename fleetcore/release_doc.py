"""The release document's data types, encoding and strict parsing: no cryptography.

What an agent's serving process needs of a release (its models and arms, serial and digest)
without loading the signature code (``fleetcore.release`` verifies; it re-exports all of this).
Parsing rules: see ``fleetcore.release``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from fleetcore import fields, strict_json
from fleetcore.errors import InvalidInputError
from fleetcore.names import validate_name
from fleetcore.signatures import KeySignature

__all__ = [
    "MAX_ARMS",
    "MAX_BUNDLE_BYTES",
    "MAX_DOCUMENT_BYTES",
    "MAX_MODELS",
    "MAX_SIGNATURES",
    "MAX_SIGNATURE_BYTES",
    "RELEASE_FORMAT",
    "Arm",
    "ModelRelease",
    "ReleaseDocument",
    "SignedRelease",
    "TrustedMark",
    "encode_document",
    "parse_document",
]

RELEASE_FORMAT = "edgefleet.release/v1"
MAX_DOCUMENT_BYTES = 256 * 1024
MAX_SIGNATURE_BYTES = 512
MAX_SIGNATURES = 16
MAX_MODELS = 64
MAX_ARMS = 8
MAX_BUNDLE_BYTES = 8 * 1024**3
# Serials and versions are stored as SQLite INTEGERs by the control plane.
_MAX_INT = 2**63 - 1
_WEIGHT_TOLERANCE = 1e-6
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")

_DOCUMENT_KEYS = frozenset({"format", "device_id", "serial", "issued_at", "expires_at", "models"})
_MODEL_KEYS = frozenset({"name", "arms"})
_MODEL_OPTIONAL = frozenset({"sample_rate"})
_ARM_KEYS = frozenset({"version", "digest", "length", "weight", "shadow"})


@dataclass(frozen=True)
class Arm:
    """One version of a model and its share of the traffic."""

    version: int  # > 0
    digest: str  # "sha256:" + 64 lowercase hex, of the bundle
    length: int  # bundle size in bytes, 1..MAX_BUNDLE_BYTES
    weight: float  # traffic share in [0, 1]
    shadow: bool = False  # gets a mirrored copy of the traffic, answer only recorded; weight 0


@dataclass(frozen=True)
class ModelRelease:
    name: str
    arms: tuple[Arm, ...]
    # Share of the requests with feedback whose inputs the device may contribute as labelled
    # samples (PII pseudonymized or dropped on the device, per the bundle manifest). 0: none.
    sample_rate: float = 0.0


@dataclass(frozen=True)
class ReleaseDocument:
    """A parsed, checked release document. ``digest`` is over the exact document bytes."""

    device_id: str
    serial: int
    issued_at: float  # unix seconds
    expires_at: float  # unix seconds, > issued_at
    models: tuple[ModelRelease, ...]
    digest: str

    def model(self, name: str) -> ModelRelease | None:
        for model in self.models:
            if model.name == name:
                return model
        return None


@dataclass(frozen=True)
class SignedRelease:
    document: bytes  # canonical JSON bytes
    # DER ECDSA-SHA256 over PAE("release", document) by the first release key, or b"" when
    # only ``signatures`` are given; tried against every trusted release key.
    signature: bytes
    # W3C trace context that came beside the document (never signed, never trusted for
    # anything but tracing; checked by fleetcore.otel.check_carrier).
    trace_context: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    # One signature per release key, with its key id (k-of-n under the root's release role).
    signatures: tuple[KeySignature, ...] = ()

    def all_signatures(self) -> tuple[KeySignature, ...]:
        legacy = (KeySignature("", self.signature),) if self.signature else ()
        return legacy + self.signatures


@dataclass(frozen=True)
class TrustedMark:
    """The newest document this device has accepted (its high-water mark)."""

    serial: int
    digest: str


# --- encoding and signing (control plane side) -------------------------------------------


def encode_document(
    device_id: str,
    serial: int,
    issued_at: float,
    expires_at: float,
    models: Sequence[ModelRelease],
) -> bytes:
    """Return the canonical document bytes; refuses what ``parse_document`` would refuse."""
    doc = {
        "format": RELEASE_FORMAT,
        "device_id": device_id,
        "serial": serial,
        "issued_at": _as_float(issued_at),
        "expires_at": _as_float(expires_at),
        "models": [
            {
                "name": model.name,
                **({"sample_rate": _as_float(model.sample_rate)} if model.sample_rate else {}),
                "arms": [
                    {
                        "version": arm.version,
                        "digest": arm.digest,
                        "length": arm.length,
                        "weight": _as_float(arm.weight),
                        "shadow": arm.shadow,
                    }
                    for arm in model.arms
                ],
            }
            for model in models
        ],
    }
    try:
        data = json.dumps(
            doc, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True
        ).encode("ascii")
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"release document cannot be encoded: {exc}") from None
    # One set of rules: what we sign is exactly what an agent will accept.
    parse_document(data)
    return data


# --- parsing -----------------------------------------------------------------------------


def parse_document(document: bytes) -> ReleaseDocument:
    """Parse and check a release document (see the rules in the module docstring)."""
    raw = strict_json.loads(document, what="release document", max_bytes=MAX_DOCUMENT_BYTES)
    obj = fields.json_object(raw, _DOCUMENT_KEYS, "release document")
    if obj["format"] != RELEASE_FORMAT:
        raise InvalidInputError(
            f"release document format must be {RELEASE_FORMAT!r}; got {obj['format']!r}"
        )
    device_id = validate_name(fields.string(obj["device_id"], "device_id"), "release device_id")
    serial = fields.integer(obj["serial"], "serial", low=1, high=_MAX_INT)
    issued_at = fields.number(obj["issued_at"], "issued_at")
    expires_at = fields.number(obj["expires_at"], "expires_at")
    if expires_at <= issued_at:
        raise InvalidInputError(
            f"release expires_at must be after issued_at ({issued_at}); got {expires_at}"
        )
    raw_models = fields.json_list(obj["models"], "models", low=0, high=MAX_MODELS)
    models = tuple(_model(m, f"models[{i}]") for i, m in enumerate(raw_models))
    _unique([m.name for m in models], "model names")
    return ReleaseDocument(
        device_id=device_id,
        serial=serial,
        issued_at=issued_at,
        expires_at=expires_at,
        models=models,
        digest="sha256:" + hashlib.sha256(document).hexdigest(),
    )


def _model(raw: object, where: str) -> ModelRelease:
    if isinstance(raw, dict) and "sample_rate" in raw:
        obj = fields.json_object(raw, _MODEL_KEYS | _MODEL_OPTIONAL, where)
        sample_rate = fields.number(obj["sample_rate"], f"{where}.sample_rate")
        if not 0.0 < sample_rate <= 1.0:
            raise InvalidInputError(f"{where}.sample_rate must be in (0, 1]; got {sample_rate!r}")
    else:
        obj, sample_rate = fields.json_object(raw, _MODEL_KEYS, where), 0.0
    name = validate_name(fields.string(obj["name"], f"{where}.name"), f"{where}.name")
    raw_arms = fields.json_list(obj["arms"], f"{where}.arms", low=1, high=MAX_ARMS)
    arms = tuple(_arm(a, f"{where}.arms[{i}]") for i, a in enumerate(raw_arms))
    _unique([a.version for a in arms], f"{where} arm versions")
    total = math.fsum(a.weight for a in arms if not a.shadow)
    if abs(total - 1.0) > _WEIGHT_TOLERANCE:
        raise InvalidInputError(
            f"{where}: weights of the non-shadow arms must sum to 1; got {total!r}"
        )
    return ModelRelease(name=name, arms=arms, sample_rate=sample_rate)


def _arm(raw: object, where: str) -> Arm:
    obj = fields.json_object(raw, _ARM_KEYS, where)
    version = fields.integer(obj["version"], f"{where}.version", low=1, high=_MAX_INT)
    digest = fields.string(obj["digest"], f"{where}.digest")
    if not _DIGEST_RE.match(digest):
        raise InvalidInputError(
            f"{where}.digest must be 'sha256:' and 64 lowercase hex digits; got {digest!r}"
        )
    length = fields.integer(obj["length"], f"{where}.length", low=1, high=MAX_BUNDLE_BYTES)
    weight = fields.number(obj["weight"], f"{where}.weight")
    if not 0.0 <= weight <= 1.0:
        raise InvalidInputError(f"{where}.weight must be in [0, 1]; got {weight!r}")
    shadow = obj["shadow"]
    if not isinstance(shadow, bool):
        fields.wrong_type(f"{where}.shadow", "a boolean", shadow)
    if shadow and weight != 0.0:
        raise InvalidInputError(
            f"{where}: a shadow arm must have weight 0 (it gets a mirrored copy); "
            f"got {weight!r}"
        )
    return Arm(version=version, digest=digest, length=length, weight=weight, shadow=shadow)














def _unique(values: Sequence[object], what: str) -> None:
    seen: set[object] = set()
    for value in values:
        if value in seen:
            raise InvalidInputError(f"{what} must be unique; got {value!r} twice")
        seen.add(value)


def _as_float(value: object) -> object:
    """Write whole-number times and weights as floats, so equal inputs give equal bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            return value  # refused by the parser with a clear message
    return value
