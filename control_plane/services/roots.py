"""The fleet's roots of trust as the control plane keeps them: signed documents only.

The control plane stores every published root (and at most one staged, "pending" next root)
and never needs a root key: new roots are made and signed by commands that read root keys
from files an operator brings (``control-plane root sign``, the rotations). The rules of a
root are in ``fleetcore/root.py``; the chain is re-verified from version 1 on load, so a
tampered database cannot slip in a root the agents would refuse.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from control_plane.storage.base import Store
from fleetcore import pki
from fleetcore import root as fleet_root
from fleetcore.errors import BadSignatureError, InvalidInputError, NotFoundError
from fleetcore.root import RootDocument, SignedRoot
from fleetcore.signing import SigningKey

__all__ = [
    "MAX_ROOTS_SENT",
    "ROOT_TTL_SECONDS",
    "RootBook",
    "StageResult",
    "load_root_keys",
    "root_key_files",
    "sign_pending",
    "stage_root",
]

ROOT_TTL_SECONDS = 365 * 86400.0
MAX_ROOTS_SENT = 8  # the newest roots sent at once (Sync, the retained MQTT list)


class RootBook:
    """The published chain, verified, cached until the store has more roots."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._chain: list[SignedRoot] = []

    def chain(self) -> list[SignedRoot]:
        with self._lock:
            rows = self.store.published_roots()
            if len(rows) != len(self._chain) or (
                    rows and rows[-1][0] != self._chain[-1].version):
                self._chain = _verify_rows(rows)
            return list(self._chain)

    def current(self) -> SignedRoot | None:
        chain = self.chain()
        return chain[-1] if chain else None

    def version(self) -> int:
        current = self.current()
        return current.version if current else 0

    def newer_than(self, version: int) -> list[bytes]:
        """Envelopes of the roots after ``version``, oldest first (at most MAX_ROOTS_SENT:
        an agent further behind catches up over several rounds)."""
        return [r.envelope for r in self.chain() if r.version > version][:MAX_ROOTS_SENT]

    def latest(self) -> list[bytes]:
        return [r.envelope for r in self.chain()[-MAX_ROOTS_SENT:]]

    def audit_keys(self) -> list[ec.EllipticCurvePublicKey]:
        """Every audit key any root listed (old checkpoints verify after a rotation)."""
        seen: dict[str, ec.EllipticCurvePublicKey] = {}
        for signed in self.chain():
            for kid in signed.root.roles["audit"].keyids:
                seen.setdefault(kid, signed.root.keys[kid])
        return list(seen.values())


def _verify_rows(rows: Sequence[tuple[int, bytes]]) -> list[SignedRoot]:
    if not rows:
        return []
    chain = [fleet_root.verify_initial_root(rows[0][1])]
    for _, envelope in rows[1:]:
        chain.append(fleet_root.verify_root_update(chain[-1], envelope, 0.0))
    return chain


@dataclass(frozen=True)
class StageResult:
    version: int
    published: bool
    signatures: int
    envelope: bytes


def stage_root(store: Store, change: Callable[[RootDocument, float], RootDocument],
               keys_at_hand: Iterable[SigningKey], now: float) -> StageResult:
    """Make the next root with ``change(current root, now)`` (which returns the new document:
    ``fleetcore.root.next_root``), sign it with the root keys at hand and publish it when both
    thresholds hold; otherwise store it as pending for ``sign_pending``."""
    current = RootBook(store).current()
    if current is None:
        raise NotFoundError("this control plane has no root yet (made by `control-plane init`)")
    new = change(current.root, now)
    if new.version != current.version + 1:
        raise InvalidInputError(f"the next root must be version {current.version + 1}")
    envelope = fleet_root.sign_root(new, _useful(keys_at_hand, current.root, new))
    return _publish_or_stage(store, current, envelope, now)


def sign_pending(store: Store, keys_at_hand: Iterable[SigningKey], now: float) -> StageResult:
    book = RootBook(store)
    current = book.current()
    pending = store.pending_root()
    if current is None or pending is None:
        raise NotFoundError("no root is waiting for signatures")
    new = fleet_root.parse_root(fleet_root.parse_envelope(pending[1]).payload)
    envelope = fleet_root.add_signatures(pending[1], _useful(keys_at_hand, current.root, new))
    return _publish_or_stage(store, current, envelope, now)


def _useful(keys: Iterable[SigningKey], old: RootDocument, new: RootDocument) -> list[SigningKey]:
    wanted = set(old.roles["root"].keyids) | set(new.roles["root"].keyids)
    return [k for k in keys if fleet_root.keyid(k.public_key()) in wanted]


def _publish_or_stage(store: Store, current: SignedRoot, envelope: bytes,
                      now: float) -> StageResult:
    signatures = len(fleet_root.parse_envelope(envelope).signatures)
    version = current.version + 1
    try:
        fleet_root.verify_root_update(current, envelope, now)
    except BadSignatureError:
        store.put_root(version, envelope, "pending", now)
        return StageResult(version, False, signatures, envelope)
    store.put_root(version, envelope, "published", now)
    return StageResult(version, True, signatures, envelope)


def root_key_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.key") if p.is_file()) if folder.is_dir() else []


def load_root_keys(paths: Sequence[Path]) -> list[SigningKey]:
    keys: list[SigningKey] = []
    for path in paths:
        try:
            keys.append(pki.load_private_key(Path(path).read_bytes()))
        except OSError as exc:
            raise InvalidInputError(f"cannot read root key {path}: {exc.strerror}") from None
    return keys
