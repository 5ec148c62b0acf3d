"""The signed root of trust: which keys hold which role, how many must sign, and its updates.

Pure, like ``fleetcore.release``: bytes and ``now`` in, typed objects or a ``fleetcore.errors``
error out. TUF's root role (python-tuf ``trusted_metadata_set.update_root``), adapted:

* Document ``edgefleet.root/v1``: ``version >= 1``, ``issued_at < expires_at``, ``keys``
  {keyid: base64 SubjectPublicKeyInfo DER of a P-256 key, keyid = its SHA-256}, ``roles``
  exactly {"root", "release", "publisher", "audit"}, each {keyids (unique, listed in keys),
  threshold 1..len(keyids)}. Exact key sets, exact types, strict JSON, size and count limits.
* Envelope (DSSE-style JSON): ``payloadType`` (the root purpose's type), ``payload`` (base64
  of the document bytes), ``signatures`` [{keyid, sig (base64)}]; signatures are over DSSE's
  PAE with purpose "root" (``fleetcore.signing``).
* ``verify_initial_root``: the root pinned at enrollment is signed by a threshold of its own
  root keys.
* ``verify_root_update(trusted, new, now)``: version must be trusted.version + 1 exactly (a
  higher one is a skip, a lower one a rollback; the same version with the same bytes is a
  re-delivery and returns the trusted root; the same version with other bytes is a replay);
  signed by a threshold of the trusted root's root keys AND a threshold of its own; each key
  counts once. Intermediate roots may be expired (TUF 5.3.4); only the newest one's expiry
  matters: ``check_current`` raises ``ExpiredError`` for it, and the agent then accepts no new
  release (TUF 5.3.10) while it keeps serving the one it has.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ec

from fleetcore import fields, signing, strict_json
from fleetcore.errors import (
    ExpiredError,
    InvalidInputError,
    ReplayError,
    RollbackError,
    UntrustedInputError,
)
from fleetcore.signatures import MAX_ROOT_ENVELOPE_BYTES
from fleetcore.signing import KeySignature, SigningKey, TrustedKeys

__all__ = [
    "MAX_ENVELOPE_BYTES",
    "MAX_KEYS",
    "MAX_SIGNATURES",
    "ROLES",
    "ROOT_FORMAT",
    "ChainUpdate",
    "Role",
    "RootDocument",
    "SignedRoot",
    "VersionSkipError",
    "add_signatures",
    "build_root",
    "check_current",
    "encode_root",
    "envelope_version",
    "keyid",
    "next_root",
    "parse_envelope",
    "parse_root",
    "role_keys",
    "sign_root",
    "threshold",
    "trusted_keys",
    "update_chain",
    "verify_initial_root",
    "verify_root_update",
]

ROOT_FORMAT = "edgefleet.root/v1"
ROLES = ("root", "release", "publisher", "audit")
PURPOSE = "root"
PAYLOAD_TYPE = signing.PURPOSES[PURPOSE]
MAX_ENVELOPE_BYTES = MAX_ROOT_ENVELOPE_BYTES
MAX_DOCUMENT_BYTES = 32 * 1024
MAX_KEYS = 64
MAX_KEYIDS = 32
MAX_SIGNATURES = 32
_MAX_INT = 2**63 - 1
_DOC_KEYS = frozenset({"format", "version", "issued_at", "expires_at", "keys", "roles"})
_ROLE_KEYS = frozenset({"keyids", "threshold"})
_ENV_KEYS = frozenset({"payloadType", "payload", "signatures"})
_SIG_KEYS = frozenset({"keyid", "sig"})

keyid = signing.keyid


class VersionSkipError(UntrustedInputError):
    """A root that is more than one version ahead of the trusted one."""


@dataclass(frozen=True)
class Role:
    keyids: tuple[str, ...]
    threshold: int


@dataclass(frozen=True)
class RootDocument:
    version: int
    issued_at: float
    expires_at: float
    keys: Mapping[str, ec.EllipticCurvePublicKey] = field(compare=False)
    roles: Mapping[str, Role]


@dataclass(frozen=True)
class SignedRoot:
    """A verified root: its document and the exact envelope bytes it came in."""

    root: RootDocument
    envelope: bytes

    @property
    def version(self) -> int:
        return self.root.version


@dataclass(frozen=True)
class Envelope:
    payload: bytes
    signatures: tuple[KeySignature, ...]


@dataclass(frozen=True)
class ChainUpdate:
    """What ``update_chain`` did: the roots newly accepted in order (persist them, then use
    ``current``), and the refusal that stopped it, if any."""

    current: SignedRoot
    accepted: tuple[SignedRoot, ...]
    error: UntrustedInputError | None


# --- helpers for the other modules -------------------------------------------------------


def trusted_keys(root: RootDocument, role: str) -> TrustedKeys:
    if role not in ROLES:
        raise InvalidInputError(f"unknown role {role!r}; expected one of {list(ROLES)}")
    spec = root.roles[role]
    return TrustedKeys({kid: root.keys[kid] for kid in spec.keyids}, spec.threshold)


def role_keys(root: RootDocument, role: str) -> list[ec.EllipticCurvePublicKey]:
    return list(trusted_keys(root, role).keys.values())


def threshold(root: RootDocument, role: str) -> int:
    return trusted_keys(root, role).threshold


def check_current(root: RootDocument, now: float) -> None:
    """``ExpiredError`` when the newest trusted root has expired (no new releases)."""
    if root.expires_at <= now:
        raise ExpiredError(
            f"root version {root.version} expired at {root.expires_at}; the time now is {now}"
        )


# --- building and signing (control plane side) -------------------------------------------


def build_root(
    version: int,
    issued_at: float,
    expires_at: float,
    roles: Mapping[str, tuple[Sequence[ec.EllipticCurvePublicKey], int]],
) -> RootDocument:
    """A root from {role: (public keys, threshold)} for every role; checked like a parsed one."""
    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    specs: dict[str, Role] = {}
    for role in ROLES:
        if role not in roles:
            raise InvalidInputError(f"root needs the role {role!r}")
        role_pubs, k = roles[role]
        ids: list[str] = []
        for pub in role_pubs:
            kid = keyid(pub)
            keys[kid] = pub
            if kid not in ids:
                ids.append(kid)
        specs[role] = Role(tuple(ids), k)
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise InvalidInputError(f"unknown roles {sorted(unknown)}; expected {list(ROLES)}")
    root = RootDocument(version, float(issued_at), float(expires_at), keys, specs)
    return parse_root(encode_root(root))  # one set of rules


def next_root(root: RootDocument, issued_at: float, expires_at: float,
              changes: Mapping[str, tuple[Sequence[ec.EllipticCurvePublicKey], int]]
              ) -> RootDocument:
    """The root after ``root``: version + 1, new times, ``changes`` {role: (keys, threshold)}
    replacing those roles; the other roles keep their keys and thresholds."""
    roles: dict[str, tuple[Sequence[ec.EllipticCurvePublicKey], int]] = {
        name: ([root.keys[kid] for kid in spec.keyids], spec.threshold)
        for name, spec in root.roles.items()}
    roles.update(changes)
    return build_root(root.version + 1, issued_at, expires_at, roles)


def encode_root(root: RootDocument) -> bytes:
    doc = {
        "format": ROOT_FORMAT,
        "version": root.version,
        "issued_at": float(root.issued_at),
        "expires_at": float(root.expires_at),
        "keys": {kid: base64.b64encode(signing.public_der(pub)).decode("ascii")
                 for kid, pub in root.keys.items()},
        "roles": {name: {"keyids": list(spec.keyids), "threshold": spec.threshold}
                  for name, spec in root.roles.items()},
    }
    try:
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False,
                          ensure_ascii=True).encode("ascii")
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"root cannot be encoded: {exc}") from None


def _encode_envelope(payload: bytes, signatures: Sequence[KeySignature]) -> bytes:
    env = {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [{"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode("ascii")}
                       for s in signatures],
    }
    return json.dumps(env, sort_keys=True, separators=(",", ":")).encode("ascii")


def sign_root(root: RootDocument, keys: Iterable[SigningKey]) -> bytes:
    """The envelope of ``root`` signed by each of ``keys`` (any number: a staged root may
    carry fewer signatures than the thresholds; ``add_signatures`` adds the rest)."""
    payload = encode_root(root)
    return add_signatures(_encode_envelope(payload, ()), keys)


def add_signatures(envelope: bytes, keys: Iterable[SigningKey]) -> bytes:
    """``envelope`` with a signature by each of ``keys`` that has not signed it yet."""
    env = parse_envelope(envelope)
    parse_root(env.payload)
    sigs = list(env.signatures)
    have = {s.keyid for s in sigs}
    for key in keys:
        entry = signing.sign_with_id(key, PURPOSE, env.payload)
        if entry.keyid not in have:
            sigs.append(entry)
            have.add(entry.keyid)
    if len(sigs) > MAX_SIGNATURES:
        raise InvalidInputError(f"a root carries at most {MAX_SIGNATURES} signatures")
    return _encode_envelope(env.payload, sigs)


# --- parsing ------------------------------------------------------------------------------


def parse_envelope(data: bytes) -> Envelope:
    if not isinstance(data, bytes):
        raise InvalidInputError(f"root envelope must be bytes; got {type(data).__name__}")
    raw = strict_json.loads(data, what="root envelope", max_bytes=MAX_ENVELOPE_BYTES,
                            max_depth=4)
    obj = fields.json_object(raw, _ENV_KEYS, "root envelope")
    if obj["payloadType"] != PAYLOAD_TYPE:
        raise InvalidInputError(
            f"root envelope payloadType must be {PAYLOAD_TYPE!r}; got {obj['payloadType']!r:.80}"
        )
    payload = _b64(obj["payload"], "root envelope payload", MAX_DOCUMENT_BYTES)
    raw_sigs = fields.json_list(obj["signatures"], "root envelope signatures", 0, MAX_SIGNATURES)
    sigs = []
    for i, entry in enumerate(raw_sigs):
        where = f"root envelope signatures[{i}]"
        item = fields.json_object(entry, _SIG_KEYS, where)
        kid = _keyid(item["keyid"], f"{where}.keyid")
        sigs.append(KeySignature(kid, _b64(item["sig"], f"{where}.sig",
                                           signing.MAX_SIGNATURE_BYTES)))
    return Envelope(payload, tuple(sigs))


def parse_root(payload: bytes) -> RootDocument:
    raw = strict_json.loads(payload, what="root document", max_bytes=MAX_DOCUMENT_BYTES,
                            max_depth=4)
    obj = fields.json_object(raw, _DOC_KEYS, "root document")
    if obj["format"] != ROOT_FORMAT:
        raise InvalidInputError(
            f"root document format must be {ROOT_FORMAT!r}; got {obj['format']!r:.80}"
        )
    version = fields.integer(obj["version"], "root version", 1, _MAX_INT)
    issued_at = fields.number(obj["issued_at"], "root issued_at")
    expires_at = fields.number(obj["expires_at"], "root expires_at")
    if expires_at <= issued_at:
        raise InvalidInputError(
            f"root expires_at must be after issued_at ({issued_at}); got {expires_at}"
        )
    raw_keys = obj["keys"]
    if not isinstance(raw_keys, dict):
        fields.wrong_type("root keys", "a JSON object", raw_keys)
    if not 1 <= len(raw_keys) <= MAX_KEYS:
        raise InvalidInputError(f"root keys must have 1..{MAX_KEYS} entries; got {len(raw_keys)}")
    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    for kid, value in raw_keys.items():
        _keyid(kid, "root key id")
        der = _b64(value, f"root key {kid[:16]}", 1024)
        pub = signing.load_public_der(der, f"root key {kid[:16]}")
        if keyid(pub) != kid:
            raise InvalidInputError(
                f"root key id {kid[:16]}... is not the SHA-256 of its key ({keyid(pub)[:16]}...)"
            )
        keys[kid] = pub
    raw_roles = fields.json_object(obj["roles"], frozenset(ROLES), "root roles")
    roles = {name: _role(raw_roles[name], name, keys) for name in ROLES}
    return RootDocument(version, issued_at, expires_at, keys, roles)


def _role(raw: object, name: str, keys: Mapping[str, object]) -> Role:
    where = f"root role {name!r}"
    obj = fields.json_object(raw, _ROLE_KEYS, where)
    ids = fields.json_list(obj["keyids"], f"{where} keyids", 1, MAX_KEYIDS)
    keyids: list[str] = []
    for kid in ids:
        _keyid(kid, f"{where} keyid")
        if kid not in keys:
            raise InvalidInputError(f"{where} lists key {kid[:16]}..., which is not in keys")
        if kid in keyids:
            raise InvalidInputError(f"{where} lists key {kid[:16]}... twice")
        keyids.append(kid)
    k = fields.integer(obj["threshold"], f"{where} threshold", 1, len(keyids))
    return Role(tuple(keyids), k)


# --- verification (agent side) -------------------------------------------------------------


def envelope_version(data: bytes) -> int:
    """The version a root envelope claims (parsed strictly, signatures not checked)."""
    return parse_root(parse_envelope(data).payload).version


def verify_initial_root(data: bytes) -> SignedRoot:
    """The root pinned at enrollment: a threshold of its own root keys must sign it.
    Expiry is not checked here (``check_current`` reports it)."""
    env = parse_envelope(data)
    root = parse_root(env.payload)
    signing.verify_threshold(trusted_keys(root, "root"), PURPOSE, env.payload, env.signatures,
                             role=f"root v{root.version} (its own root keys)")
    return SignedRoot(root, bytes(data))


def verify_root_update(trusted: SignedRoot, data: bytes, now: float) -> SignedRoot:
    """Verify the next root against the trusted one (rules in the module docstring).

    ``now`` is accepted for the record and future use: intermediate roots may be expired, so
    no expiry is checked here; call ``check_current`` on the newest root."""
    del now
    env = parse_envelope(data)
    root = parse_root(env.payload)
    want = trusted.version + 1
    if root.version == trusted.version:
        if bytes(data) == trusted.envelope or env.payload == parse_envelope(
                trusted.envelope).payload:
            return trusted
        raise ReplayError(f"root version {root.version} differs from the trusted root with "
                          "that version")
    if root.version < trusted.version:
        raise RollbackError(f"root version {root.version} is older than the trusted version "
                            f"{trusted.version}")
    if root.version != want:
        raise VersionSkipError(f"root version {root.version} skips ahead; the next one must "
                               f"be version {want}")
    signing.verify_threshold(trusted_keys(trusted.root, "root"), PURPOSE, env.payload,
                             env.signatures, role=f"root v{root.version} (trusted v"
                             f"{trusted.version}'s root keys)")
    signing.verify_threshold(trusted_keys(root, "root"), PURPOSE, env.payload, env.signatures,
                             role=f"root v{root.version} (its own root keys)")
    return SignedRoot(root, bytes(data))


def update_chain(trusted: SignedRoot, envelopes: Iterable[bytes], now: float) -> ChainUpdate:
    """Walk ``envelopes`` (any order, e.g. the latest few roots) up from ``trusted``.

    Roots not newer than the current one are skipped when they are the trusted one's or older
    (a list of the latest roots normally holds some the agent has); each newer one must be the
    next version and verify. Stops at the first refusal and reports it with the progress so far.
    """
    pending: dict[int, bytes] = {}
    error: UntrustedInputError | None = None
    for data in envelopes:
        try:
            version = envelope_version(data)
        except UntrustedInputError as exc:
            error = error or exc
            continue
        if version > trusted.version:
            if version in pending and pending[version] != data:
                error = error or ReplayError(f"two different roots claim version {version}")
                continue
            pending[version] = data
    current = trusted
    accepted: list[SignedRoot] = []
    for version in sorted(pending):
        try:
            current = verify_root_update(current, pending[version], now)
        except UntrustedInputError as exc:
            return ChainUpdate(current, tuple(accepted), exc)
        accepted.append(current)
    return ChainUpdate(current, tuple(accepted), error)


# --- strict field readers ------------------------------------------------------------------












def _keyid(value: object, where: str) -> str:
    if (not isinstance(value, str) or len(value) != 64
            or any(c not in "0123456789abcdef" for c in value)):
        raise InvalidInputError(f"{where} must be 64 lowercase hex digits; got {value!r:.80}")
    return value


def _b64(value: object, where: str, max_bytes: int) -> bytes:
    if not isinstance(value, str) or not value.isascii():
        fields.wrong_type(where, "an ASCII base64 string", value)
    if len(value) > (max_bytes + 2) // 3 * 4:
        raise InvalidInputError(f"{where} is longer than {max_bytes} bytes")
    try:
        out = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInputError(f"{where} is not valid base64: {exc}") from None
    if not out:
        raise InvalidInputError(f"{where} is empty")
    return out
