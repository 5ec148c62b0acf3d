"""The agent's persisted root of trust: the chain of signed roots it has accepted.

A thin shell around the pure ``fleetcore.root`` core, like ``release_trust.py``:

* ``STATE/trust/root.json`` holds every accepted root envelope, oldest first, written
  atomically (temp file, fsync, ``os.replace``) before a new root is used. On load the whole
  chain is re-verified from the first root (pinned at enrollment). A missing file means "no
  root yet"; a corrupt or tampered one is an error, never a reset (forgetting the chain would
  re-open rollback to an old root).
* ``update`` walks newly delivered roots (``fleetcore.root.update_chain``); whatever verifies
  is persisted, a refusal leaves file and memory as they were.
* An agent enrolled before roots existed has ``trust/release.pub`` and
  ``trust/publishers/*.pub`` and no root. It keeps using those files until a root arrives and
  accepts its first root TOFU-free: only when the root is signed by a threshold of its own root
  keys AND lists the release key pinned at enrollment in its release role (so only the holder
  of the fleet's release key or root keys can introduce it).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from fleetcore import root as fleet_root
from fleetcore import signing, strict_json
from fleetcore.errors import BadSignatureError, InvalidInputError, UntrustedInputError
from fleetcore.files import atomic_write
from fleetcore.root import ChainUpdate, SignedRoot
from fleetcore.signing import TrustedKeys

__all__ = ["MAX_CHAIN", "ROOT_FILE_FORMAT", "RootTrust", "recorded_root_version"]

log = logging.getLogger(__name__)

ROOT_FILE_FORMAT = "edgefleet.root-trust/v1"
MAX_CHAIN = 1024
_MAX_FILE_BYTES = MAX_CHAIN * (fleet_root.MAX_ENVELOPE_BYTES * 4 // 3 + 8) + 4096


class RootTrust:
    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        self._chain: list[SignedRoot] = self._load()

    @property
    def current(self) -> SignedRoot | None:
        return self._chain[-1] if self._chain else None

    @property
    def version(self) -> int:
        return self._chain[-1].version if self._chain else 0

    def release_keys(self) -> TrustedKeys | None:
        current = self.current
        return fleet_root.trusted_keys(current.root, "release") if current else None

    def retired_release_keys(self) -> list[ec.EllipticCurvePublicKey]:
        """Release keys an older root listed and the current one does not."""
        keys = self.release_keys()
        now = set(keys.keys) if keys is not None else set()
        out: dict[str, ec.EllipticCurvePublicKey] = {}
        for signed in self._chain[:-1]:
            for kid in signed.root.roles["release"].keyids:
                if kid not in now:
                    out.setdefault(kid, signed.root.keys[kid])
        return list(out.values())

    def publisher_pems(self) -> list[bytes] | None:
        current = self.current
        if current is None:
            return None
        from fleetcore import pki  # noqa: PLC0415 (keeps this module's imports small)

        return [pki.public_key_pem(k) for k in fleet_root.role_keys(current.root, "publisher")]

    def publisher_threshold(self) -> int:
        """Distinct publisher keys a bundle needs (the root's publisher role; 1 without one)."""
        current = self.current
        return fleet_root.threshold(current.root, "publisher") if current else 1

    def pin(self, envelope: bytes, *, pinned_release_key: ec.EllipticCurvePublicKey | None
            = None) -> SignedRoot:
        """Accept a first root (at enrollment, or the first to reach an agent enrolled before
        roots: then it must list ``pinned_release_key`` as a release key)."""
        with self._lock:
            if self._chain:
                raise InvalidInputError("a root is pinned already; new roots come as updates")
            signed = fleet_root.verify_initial_root(envelope)
            if pinned_release_key is not None and signing.keyid(pinned_release_key) not in (
                    signed.root.roles["release"].keyids):
                raise BadSignatureError(
                    f"root v{signed.version} does not list the release key pinned at "
                    "enrollment; refusing it as this agent's first root"
                )
            self._save([signed])
            self._chain = [signed]
        log.info("pinned root version %d", signed.version)
        return signed

    def update(self, envelopes: list[bytes], now: float) -> ChainUpdate:
        """Adopt the roots in ``envelopes`` that extend the chain; persist before use."""
        with self._lock:
            current = self.current
            if current is None:
                raise InvalidInputError("no root is pinned; pin one first")
            result = fleet_root.update_chain(current, envelopes, now)
            if result.accepted:
                chain = self._chain + list(result.accepted)
                self._save(chain)
                self._chain = chain
                log.info("adopted root version %d (from %d)", result.current.version,
                         current.version)
        return result

    def _save(self, chain: list[SignedRoot]) -> None:
        if len(chain) > MAX_CHAIN:
            raise InvalidInputError(f"the root chain is longer than {MAX_CHAIN}")
        record = {"format": ROOT_FILE_FORMAT,
                  "chain": [base64.b64encode(r.envelope).decode("ascii") for r in chain]}
        self._path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self._path, json.dumps(record, indent=1).encode("ascii") + b"\n")

    def _load(self) -> list[SignedRoot]:
        envelopes = _read(self._path)
        if envelopes is None:
            return []
        try:
            chain = [fleet_root.verify_initial_root(envelopes[0])]
            for envelope in envelopes[1:]:
                chain.append(fleet_root.verify_root_update(chain[-1], envelope, 0.0))
                if chain[-1] is chain[-2]:
                    raise InvalidInputError("the same root twice")
        except UntrustedInputError as exc:
            raise InvalidInputError(
                f"root trust file {self._path} is corrupted or tampered with ({exc}); "
                "refusing to forget the trusted roots"
            ) from exc
        return chain


def _read(path: Path) -> list[bytes] | None:
    try:
        with path.open("rb") as fh:
            data = fh.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    try:
        record: Any = strict_json.loads(data, what="root trust file", max_bytes=_MAX_FILE_BYTES)
        if not isinstance(record, dict) or record.keys() != {"format", "chain"}:
            raise InvalidInputError("expected a JSON object with keys ['chain', 'format']")
        if record["format"] != ROOT_FILE_FORMAT:
            raise InvalidInputError(f"format must be {ROOT_FILE_FORMAT!r}")
        chain = record["chain"]
        if not isinstance(chain, list) or not 1 <= len(chain) <= MAX_CHAIN or not all(
                isinstance(e, str) and e.isascii() for e in chain):
            raise InvalidInputError(f"chain must list 1..{MAX_CHAIN} base64 strings")
        return [base64.b64decode(e, validate=True) for e in chain]
    except (InvalidInputError, binascii.Error, ValueError) as exc:
        raise InvalidInputError(
            f"root trust file {path} is corrupted ({exc}); refusing to forget the trusted roots"
        ) from None


def recorded_root_version(path: Path) -> int:
    """The newest root version the file records (0: none), for status displays only."""
    envelopes = _read(path)
    if not envelopes:
        return 0
    return fleet_root.envelope_version(envelopes[-1])
