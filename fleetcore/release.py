"""The signed per-device release document: encoding, signing, strict parsing and verification.

Pure: bytes and a reference time in, typed objects out or a domain error; nothing here reads
the clock, the disk or the network (the agent's shell is ``edge_agent/install/release_trust.py``).

Rules (docs/design.md section 3, modeled on python-tuf's ``trusted_metadata_set.py``):

* The control plane signs each device's document with the release key(s) (ECDSA P-256,
  SHA-256, DER signatures over DSSE's PAE of the exact document bytes with purpose "release":
  ``fleetcore.signing``). The agent checks them against the release role of its root of trust
  (``fleetcore.root``): a threshold of distinct release keys, each counted once. Before a root
  arrives an agent uses the release key pinned at enrollment (threshold 1).
* ``verify_release`` checks, in this order: sizes -> signature -> parse -> device id ->
  expiry -> serial. Nothing beyond the size check touches bytes that are not authenticated.
* Document: format ``edgefleet.release/v1``; exact key sets (unknown or missing keys refused,
  duplicate keys refused); exact types (a bool is not an int, an int field takes no float);
  ``serial >= 1``; ``expires_at > issued_at``; 0..MAX_MODELS models with unique names.
* Model: a device-style name; 1..MAX_ARMS arms with unique versions; the weights of the
  non-shadow arms sum to 1 (absolute tolerance 1e-6); a shadow arm has weight 0. Optional
  ``sample_rate`` in (0, 1] (absent means 0: the device contributes no labelled samples).
* Arm: ``version > 0``; digest ``sha256:`` + 64 lowercase hex; length 1..MAX_BUNDLE_BYTES;
  weight a finite number in [0, 1].
* Against the trusted mark (the newest accepted document): an older serial is a rollback; the
  same serial with another digest is a replay; the same serial and digest is a re-delivery and
  is returned as is.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from fleetcore import fields, signing, strict_json
from fleetcore.errors import (
    BadSignatureError,
    ExpiredError,
    InvalidInputError,
    ReplayError,
    RollbackError,
    WrongDeviceError,
)
from fleetcore.pki import validate_name
from fleetcore.signing import KeySignature, SigningKey, TrustedKeys

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
    "reverify_release",
    "sign_release",
    "verify_release",
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


def sign_release(document: bytes, key: SigningKey | Sequence[SigningKey]) -> SignedRelease:
    """Sign with purpose "release" by one key or several (each listed with its key id)."""
    keys = [key] if isinstance(key, SigningKey) else list(key)
    if not keys:
        raise InvalidInputError("a release needs at least one signing key")
    sigs = tuple(signing.sign_with_id(k, "release", document) for k in keys)
    return SignedRelease(document=document, signature=sigs[0].sig, signatures=sigs)


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


# --- verification (agent side) -----------------------------------------------------------


def verify_release(
    signed: SignedRelease,
    *,
    public_key: ec.EllipticCurvePublicKey | TrustedKeys,
    device_id: str,
    now: float,
    trusted: TrustedMark | None,
) -> ReleaseDocument:
    """Verify a delivered release for ``device_id`` at time ``now`` against the trusted mark.

    Raises ``InvalidInputError`` (size, format), ``BadSignatureError``, ``WrongDeviceError``,
    ``ExpiredError`` (freeze), ``RollbackError`` or ``ReplayError``. A re-delivery of the
    trusted document (same serial, same digest) is returned, not refused.
    """
    doc = reverify_release(signed, public_key=public_key, device_id=device_id)
    if doc.expires_at <= now:
        raise ExpiredError(
            f"release serial {doc.serial} expired at {doc.expires_at}; the time now is {now}"
        )
    if trusted is not None:
        if doc.serial < trusted.serial:
            raise RollbackError(
                f"release serial {doc.serial} is older than the trusted serial {trusted.serial}"
            )
        if doc.serial == trusted.serial and doc.digest != trusted.digest:
            raise ReplayError(
                f"release serial {doc.serial} has digest {doc.digest}; the trusted document "
                f"with that serial has digest {trusted.digest}"
            )
    return doc


def reverify_release(
    signed: SignedRelease,
    *,
    public_key: ec.EllipticCurvePublicKey | TrustedKeys,
    device_id: str,
    legacy: bool = False,
) -> ReleaseDocument:
    """Sizes, signature, parse and device id; no expiry or serial checks.

    For a document that was accepted before (e.g. reloaded from disk): a restarted agent keeps
    serving its last release even after it expires. New deliveries go through
    ``verify_release``. ``legacy``: also accept a single signature over the bare document
    (releases an agent accepted and stored before signatures carried their purpose).
    """
    _check_sizes(signed)
    _check_signature(signed, public_key, legacy=legacy)
    doc = parse_document(signed.document)
    if doc.device_id != device_id:
        raise WrongDeviceError(
            f"release is for device {doc.device_id!r}; this device is {device_id!r}"
        )
    return doc


def _check_sizes(signed: SignedRelease) -> None:
    if not isinstance(signed.document, bytes) or not isinstance(signed.signature, bytes):
        raise InvalidInputError(
            "release document and signature must be bytes; got "
            f"{type(signed.document).__name__} and {type(signed.signature).__name__}"
        )
    if not 0 < len(signed.document) <= MAX_DOCUMENT_BYTES:
        raise InvalidInputError(
            f"release document must be 1..{MAX_DOCUMENT_BYTES} bytes; "
            f"got {len(signed.document)}"
        )
    if len(signed.signatures) > MAX_SIGNATURES:
        raise InvalidInputError(
            f"a release carries at most {MAX_SIGNATURES} signatures; got {len(signed.signatures)}"
        )
    sizes = [len(s.sig) for s in signed.all_signatures()]
    if not sizes or not all(0 < n <= MAX_SIGNATURE_BYTES for n in sizes):
        raise InvalidInputError(
            f"release signatures (at least one) must be 1..{MAX_SIGNATURE_BYTES} bytes; "
            f"got {sizes or 0}"
        )


def _check_signature(signed: SignedRelease, public_key: ec.EllipticCurvePublicKey | TrustedKeys,
                     *, legacy: bool = False) -> None:
    if isinstance(public_key, TrustedKeys):
        trusted = public_key
    elif isinstance(public_key, ec.EllipticCurvePublicKey) and (
            public_key.curve.name == "secp256r1"):
        trusted = TrustedKeys.single(public_key)
    else:
        raise InvalidInputError(
            f"the pinned release key must be ECDSA P-256; got {type(public_key).__name__}"
        )
    try:
        signing.verify_threshold(trusted, "release", signed.document, signed.all_signatures(),
                                 role="release")
    except BadSignatureError as exc:
        if legacy and trusted.threshold == 1 and _legacy_verifies(signed, trusted):
            return
        raise BadSignatureError(
            f"release signature ({len(signed.signature)} bytes) does not verify with the "
            f"pinned release key or the root's release keys: {exc}"
        ) from None


def _legacy_verifies(signed: SignedRelease, trusted: TrustedKeys) -> bool:
    for key in trusted.keys.values():
        try:
            key.verify(signed.signature, signed.document, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            continue
        return True
    return False
