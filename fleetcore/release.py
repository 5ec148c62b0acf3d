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

from collections.abc import Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from fleetcore import signing
from fleetcore.errors import (
    BadSignatureError,
    ExpiredError,
    InvalidInputError,
    ReplayError,
    RollbackError,
    WrongDeviceError,
)
from fleetcore.release_doc import (
    MAX_ARMS,
    MAX_BUNDLE_BYTES,
    MAX_DOCUMENT_BYTES,
    MAX_MODELS,
    MAX_SIGNATURE_BYTES,
    MAX_SIGNATURES,
    RELEASE_FORMAT,
    Arm,
    ModelRelease,
    ReleaseDocument,
    SignedRelease,
    TrustedMark,
    encode_document,
    parse_document,
)
from fleetcore.signing import SigningKey, TrustedKeys

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


# --- signing (control plane side) ----------------------------------------------------------


def sign_release(document: bytes, key: SigningKey | Sequence[SigningKey]) -> SignedRelease:
    """Sign with purpose "release" by one key or several (each listed with its key id)."""
    keys = [key] if isinstance(key, SigningKey) else list(key)
    if not keys:
        raise InvalidInputError("a release needs at least one signing key")
    sigs = tuple(signing.sign_with_id(k, "release", document) for k in keys)
    return SignedRelease(document=document, signature=sigs[0].sig, signatures=sigs)


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
