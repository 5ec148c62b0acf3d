"""The audit log as a hash chain: entry hashes, chain verification, signed checkpoints.

Each entry's hash covers the previous entry's hash, its sequence number and its fields, so
changing, deleting or reordering any row breaks the chain at that row, and ``verify_chain``
names the first such row. A checkpoint signs the head (size, last hash, time) with the control
plane's signing key; kept elsewhere, it shows a later truncation (or a rewritten chain): the
current chain must still contain the checkpoint's head at the same position.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from control_plane.domain.records import AuditRecord
from fleetcore import strict_json
from fleetcore.errors import InvalidInputError
from fleetcore.pki import SigningKey

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
                    key: SigningKey) -> tuple[bytes, bytes]:
    """A signed head of the chain: (document, DER ECDSA-SHA256 signature)."""
    head = records[-1] if records else None
    doc = _canonical({
        "format": CHECKPOINT_FORMAT, "size": len(records),
        "hash": head.hash if head else GENESIS_HASH, "time": now,
    })
    return doc, key.sign(doc, ec.ECDSA(hashes.SHA256()))


def check_checkpoint(document: bytes, signature: bytes, public_key: ec.EllipticCurvePublicKey,
                     records: Sequence[AuditRecord]) -> tuple[bool, str]:
    """Does the current chain still contain the checkpoint's head where it was?"""
    if len(document) > MAX_CHECKPOINT_BYTES or len(signature) > 512:
        raise InvalidInputError("checkpoint is larger than any this control plane writes")
    try:
        public_key.verify(signature, document, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False, "checkpoint signature does not verify with this control plane's key"
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
