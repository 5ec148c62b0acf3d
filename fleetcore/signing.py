"""Signatures that carry their purpose (domain separation), key ids and k-of-n checks.

Pure: keys and bytes in, bytes out or a ``fleetcore.errors`` error.

* Every signature is made over DSSE's pre-authentication encoding (PAE)::

      "DSSEv1" SP len(type) SP type SP len(body) SP body

  with a payload type fixed per purpose (``PURPOSES``), so a signature made for one purpose
  (a release) never verifies for another (an audit checkpoint, a root), even by the same key
  over the same bytes.
* Keys are ECDSA P-256 with SHA-256 and DER signatures. A signing key is anything with
  cryptography's ``EllipticCurvePrivateKey`` interface (``SigningKey``): a key loaded from a
  file, or one held in a PKCS#11 token behind the same two methods.
* A key id is the lowercase hex SHA-256 of the key's SubjectPublicKeyInfo DER (uncompressed
  point), so one key has one id.
* ``verify_threshold``: TUF's rule for k-of-n, each distinct key counts once, whatever key ids
  or duplicate signatures an envelope lists.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetcore.errors import BadSignatureError, InvalidInputError
from fleetcore.signatures import MAX_SIGNATURE_BYTES, KeySignature

__all__ = [
    "MAX_SIGNATURE_BYTES",
    "PURPOSES",
    "KeySignature",
    "SigningKey",
    "TrustedKeys",
    "keyid",
    "load_public_der",
    "pae",
    "public_der",
    "sign",
    "sign_with_id",
    "verify",
    "verify_threshold",
]


PURPOSES: Mapping[str, str] = {
    "release": "application/vnd.edgefleet.release+json",
    "root": "application/vnd.edgefleet.root+json",
    "audit-checkpoint": "application/vnd.edgefleet.audit-checkpoint+json",
}


@runtime_checkable
class SigningKey(Protocol):
    """What signing needs from a private key (cryptography's EllipticCurvePrivateKey has it)."""

    def sign(self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm
             ) -> bytes: ...

    def public_key(self) -> ec.EllipticCurvePublicKey: ...


@dataclass(frozen=True)
class TrustedKeys:
    """The keys of one role and how many of them must sign."""

    keys: Mapping[str, ec.EllipticCurvePublicKey]  # keyid -> key
    threshold: int

    @classmethod
    def single(cls, public_key: ec.EllipticCurvePublicKey) -> TrustedKeys:
        return cls({keyid(public_key): public_key}, 1)


def _payload_type(purpose: str) -> str:
    try:
        return PURPOSES[purpose]
    except KeyError:
        raise InvalidInputError(
            f"unknown signature purpose {purpose!r}; expected one of {sorted(PURPOSES)}"
        ) from None


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding of ``payload`` under ``payload_type``."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


def public_der(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """SubjectPublicKeyInfo DER, uncompressed point (the canonical encoding)."""
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def keyid(public_key: ec.EllipticCurvePublicKey) -> str:
    return hashlib.sha256(public_der(public_key)).hexdigest()


def load_public_der(der: bytes, where: str = "public key") -> ec.EllipticCurvePublicKey:
    """A P-256 public key from its canonical SubjectPublicKeyInfo DER; anything else refused
    (another curve or algorithm, a compressed point: one key, one encoding, one id)."""
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InvalidInputError(f"{where} is not a DER public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise InvalidInputError(f"{where} must be ECDSA P-256; got {type(key).__name__}")
    if public_der(key) != der:
        raise InvalidInputError(f"{where} must use the uncompressed SubjectPublicKeyInfo form")
    return key


def sign(key: SigningKey, purpose: str, payload: bytes) -> bytes:
    """A DER ECDSA-SHA256 signature over PAE(type of ``purpose``, ``payload``)."""
    return key.sign(pae(_payload_type(purpose), payload), ec.ECDSA(hashes.SHA256()))


def sign_with_id(key: SigningKey, purpose: str, payload: bytes) -> KeySignature:
    return KeySignature(keyid(key.public_key()), sign(key, purpose, payload))


def verify(public_key: ec.EllipticCurvePublicKey, purpose: str, payload: bytes,
           signature: bytes) -> None:
    """Raise ``BadSignatureError`` unless ``signature`` is ``public_key``'s for ``purpose``."""
    message = pae(_payload_type(purpose), payload)
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or (
            public_key.curve.name != "secp256r1"):
        raise InvalidInputError(f"a {purpose} key must be ECDSA P-256; "
                                f"got {type(public_key).__name__}")
    if not isinstance(signature, bytes) or not 0 < len(signature) <= MAX_SIGNATURE_BYTES:
        raise BadSignatureError(f"{purpose} signature must be 1..{MAX_SIGNATURE_BYTES} bytes")
    try:
        public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise BadSignatureError(
            f"{purpose} signature ({len(signature)} bytes) does not verify with key "
            f"{keyid(public_key)[:16]}"
        ) from None


def _verifies(public_key: ec.EllipticCurvePublicKey, purpose: str, payload: bytes,
              signature: bytes) -> bool:
    try:
        verify(public_key, purpose, payload, signature)
    except BadSignatureError:
        return False
    return True


def verify_threshold(trusted: TrustedKeys, purpose: str, payload: bytes,
                     signatures: Iterable[KeySignature], *, role: str = "") -> frozenset[str]:
    """The ids of the distinct trusted keys whose signature for ``purpose`` verifies;
    ``BadSignatureError`` unless there are at least ``trusted.threshold`` of them.

    Each key counts once (TUF): repeated signatures, a key id listed twice, and the same key
    under two ids (compared by its canonical encoding) add nothing. A signature with an empty
    key id (a legacy single-signature field) is tried against every trusted key."""
    role = role or purpose
    by_der: dict[bytes, str] = {}
    for kid, pub in trusted.keys.items():
        by_der.setdefault(public_der(pub), kid)
    canonical = {kid: by_der[public_der(pub)] for kid, pub in trusted.keys.items()}
    good: set[str] = set()
    for entry in signatures:
        candidates = [entry.keyid] if entry.keyid else list(trusted.keys)
        for kid in candidates:
            candidate = trusted.keys.get(kid)
            if candidate is None or canonical[kid] in good:
                continue
            if _verifies(candidate, purpose, payload, entry.sig):
                good.add(canonical[kid])
                break
    if trusted.threshold < 1 or len(good) < trusted.threshold:
        raise BadSignatureError(
            f"{role}: {len(good)} of the trusted {role} keys signed; "
            f"the threshold is {trusted.threshold}"
        )
    return frozenset(good)
