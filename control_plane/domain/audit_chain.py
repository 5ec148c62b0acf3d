"""The audit log as a hash chain: entry hashes, chain verification, signed checkpoints.

Each entry's hash covers the previous entry's hash, its sequence number and its fields, so
changing, deleting or reordering any row breaks the chain at that row, and ``verify_chain``
names the first such row. A checkpoint signs the head (size, last hash, time) with the audit
key (HOME/keys/audit.key, listed in the root's audit role), purpose "audit-checkpoint"
(``fleetcore.signing``: a release signature is never a checkpoint signature, nor the reverse);
kept elsewhere, it shows a later truncation (or a rewritten chain): the current chain must
still contain the checkpoint's head at the same position. A checkpoint verifies with any audit
key the root chain ever listed, so one made before an audit-key rotation still verifies.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec

from control_plane.domain.records import AuditRecord
from fleetcore import signing, strict_json
from fleetcore.errors import BadSignatureError, InvalidInputError

__all__ = [
    "CHECKPOINT_FORMAT",
    "GENESIS_HASH",
    "ChainVerdict",
    "check_checkpoint",
    "entry_hash",
    "make_checkpoint",
    "verify_chain",
]

GENESIS_HASH = "0" * 64
CHECKPOINT_FORMAT = "edgefleet.audit-checkpoint/v1"
MAX_CHECKPOINT_BYTES = 4096


def entry_hash(prev_hash: str, seq: int, time: float, actor: str, role: str, action: str,
               target: str, outcome: str, detail: str) -> str:
    """The hash of one entry, chained to the one before it."""
    fields: list[object] = [prev_hash, seq, repr(time), actor, action, target, outcome, detail]
    if role:  # entries written before roles were recorded hash without one
        fields.append(role)
    body = json.dumps(fields, separators=(",", ":"))
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ChainVerdict:
    ok: bool
    entries: int
    first_bad_seq: int  # 0 when ok
    reason: str


def verify_chain(records: Sequence[AuditRecord]) -> ChainVerdict:
    """Check a whole chain, oldest first; report the first entry that does not fit."""
    prev = GENESIS_HASH
    for expected_seq, r in enumerate(records, start=1):
        if r.seq != expected_seq:
            what = "deleted" if r.seq > expected_seq else "reordered or duplicated"
            return ChainVerdict(False, len(records), expected_seq,
                                f"entry {expected_seq} is missing ({what}): found {r.seq}")
        if r.prev_hash != prev:
            return ChainVerdict(False, len(records), r.seq,
                                f"entry {r.seq} does not follow entry {r.seq - 1} "
                                "(an earlier entry was changed, deleted or reordered)")
        actual = entry_hash(r.prev_hash, r.seq, r.time, r.actor, r.role, r.action, r.target,
                            r.outcome, r.detail)
        if actual != r.hash:
            return ChainVerdict(False, len(records), r.seq,
                                f"entry {r.seq} was changed after it was written")
        prev = r.hash
    return ChainVerdict(True, len(records), 0, "chain intact")


def _canonical(doc: dict[str, object]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def make_checkpoint(records: Sequence[AuditRecord], now: float,
                    key: signing.SigningKey) -> tuple[bytes, bytes]:
    """A signed head of the chain: (document, DER ECDSA-SHA256 signature, purpose
    "audit-checkpoint")."""
    head = records[-1] if records else None
    doc = _canonical({
        "format": CHECKPOINT_FORMAT, "size": len(records),
        "hash": head.hash if head else GENESIS_HASH, "time": now,
    })
    return doc, signing.sign(key, "audit-checkpoint", doc)


def check_checkpoint(document: bytes, signature: bytes,
                     audit_keys: ec.EllipticCurvePublicKey | Sequence[ec.EllipticCurvePublicKey],
                     records: Sequence[AuditRecord]) -> tuple[bool, str]:
    """Does the current chain still contain the checkpoint's head where it was?
    ``audit_keys``: every audit key of the root chain (any one of them may have signed)."""
    if len(document) > MAX_CHECKPOINT_BYTES or len(signature) > signing.MAX_SIGNATURE_BYTES:
        raise InvalidInputError("checkpoint is larger than any this control plane writes")
    keys = [audit_keys] if isinstance(audit_keys, ec.EllipticCurvePublicKey) else audit_keys
    trusted = signing.TrustedKeys({signing.keyid(k): k for k in keys}, 1)
    try:
        signing.verify_threshold(trusted, "audit-checkpoint", document,
                                 [signing.KeySignature("", signature)], role="audit")
    except BadSignatureError:
        return False, "checkpoint signature does not verify with any audit key of the root"
    try:
        doc = strict_json.loads(document, what="audit checkpoint",
                                max_bytes=MAX_CHECKPOINT_BYTES)
        size, head = int(doc["size"]), str(doc["hash"])
        if doc.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(doc.get("format"))
    except (ValueError, KeyError, TypeError, InvalidInputError) as exc:
        raise InvalidInputError(f"not an audit checkpoint: {exc}") from None
    if len(records) < size:
        return False, (f"the log has {len(records)} entries; the checkpoint saw {size}: "
                       "entries were removed (truncation)")
    if size and records[size - 1].hash != head:
        return False, f"entry {size} differs from the checkpoint: the chain was rewritten"
    return True, f"the checkpoint's {size} entries are intact"
