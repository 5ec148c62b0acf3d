"""Per-device release documents: built from the device's arms, signed with the release key.

A device's document changes (new serial) when its arms change, and is renewed (new serial and
expiry, same content) once less than half of its lifetime is left, so a device in touch never
sees its release expire, while one cut off for longer than the lifetime is frozen out of
installing anything stale. ``content`` (a digest of the arms) tells a renewal from a change.
A device that reports holding a newer serial than ours (the control plane was restored from an
older backup) gets the same content re-issued above it: agents refuse lower serials, but only
when it reports the current root version: a serial held under an older root may have been
signed by a retired (perhaps stolen) release key, and an agent that adopts a root with new
release keys forgets its serial anyway (TUF's rule for rotated keys). A release signed by a
key that is no longer the release key is re-issued (``reissue_all`` after a rotation).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from control_plane.domain.records import ReleaseRecord
from control_plane.storage.base import Store
from fleetcore import signing
from fleetcore.errors import AlreadyExistsError, BadSignatureError
from fleetcore.pki import SigningKey
from fleetcore.release import Arm, ModelRelease, encode_document, sign_release

if TYPE_CHECKING:
    from control_plane.services.roots import RootBook

__all__ = ["ISSUE_ATTEMPTS", "MAX_FLOOR", "ReleaseIssuer"]


def _digest(record: ReleaseRecord) -> str:
    return "sha256:" + hashlib.sha256(record.document).hexdigest()

MAX_FLOOR = 2**62  # a device's claim above this is ignored (serials stay far from overflow)
# Tries to issue a device's release while other replicas take its next serial first (each
# failed try means another replica issued one: a handful covers any number of replicas).
ISSUE_ATTEMPTS = 5


class ReleaseIssuer:
    def __init__(
        self,
        store: Store,
        key: SigningKey,
        ttl_seconds: float,
        on_change: Callable[[str], None] | None = None,
        roots: RootBook | None = None,
    ) -> None:
        self.store = store
        self.key = key
        self.ttl = ttl_seconds
        self.on_change = on_change
        self.roots = roots

    def _signed_by_current_key(self, record: ReleaseRecord) -> bool:
        try:
            signing.verify(self.key.public_key(), "release", record.document, record.signature)
        except BadSignatureError:
            return False
        return True

    def reissue_all(self, now: float) -> int:
        """Re-sign every device's release with the current key (after a rotation)."""
        count = 0
        for device in self.store.list_devices():
            if device.revoked_at:
                continue
            existing = self.store.get_release(device.id)
            if existing is not None and not self._signed_by_current_key(existing):
                self.current(device.id, now)
                count += 1
        return count

    def _models(self, device_id: str) -> list[ModelRelease]:
        by_model: dict[str, list[Arm]] = {}
        for arm in self.store.device_arms(device_id):
            mv = self.store.get_model_version(arm.model, arm.version)
            if mv is None:
                continue
            by_model.setdefault(arm.model, []).append(
                Arm(version=arm.version, digest=mv.digest, length=mv.length, weight=arm.weight,
                    shadow=arm.shadow)
            )
        out = []
        for name, arms in sorted(by_model.items()):
            policy = self.store.get_policy(name)
            rate = policy.sample_rate if policy is not None else 0.0
            out.append(ModelRelease(name=name, arms=tuple(arms), sample_rate=rate))
        return out

    def current(self, device_id: str, now: float, have: tuple[int, str] = (0, ""),
                have_root: int | None = None) -> ReleaseRecord | None:
        """The device's release, issuing or renewing it first when needed. ``have``: the
        (serial, digest) of the newest release the device says it holds ("" digest: unknown);
        a serial above ours, or ours with another digest, is not something we issued: ours
        must go above it.

        Replicas on one database may issue a device's release at once (an operator's rollout
        on one, the device's heartbeat on another): the write that comes second finds the serial
        taken, and this looks again from what the other wrote (often: nothing left to issue)."""
        for _ in range(ISSUE_ATTEMPTS - 1):
            with contextlib.suppress(AlreadyExistsError):
                return self._current(device_id, now, have, have_root)
        return self._current(device_id, now, have, have_root)  # its conflict goes to the caller

    def _current(self, device_id: str, now: float, have: tuple[int, str],
                 have_root: int | None) -> ReleaseRecord | None:
        floor, digest = have if 0 <= have[0] < MAX_FLOOR else (0, "")
        if (have_root is not None and self.roots is not None
                and have_root < self.roots.version()):
            floor, digest = 0, ""  # held under an older root: maybe a retired key's serial
        models = self._models(device_id)
        existing = self.store.get_release(device_id)
        if existing is None and not models:
            return None
        content = hashlib.sha256(json.dumps(
            [[m.name, [[a.version, a.digest, a.length, a.weight, a.shadow] for a in m.arms],
              m.sample_rate] for m in models]).encode()).hexdigest()
        behind = existing is not None and (
            existing.serial < floor
            or (existing.serial == floor and bool(digest) and digest != _digest(existing)))
        stale = existing is not None and not self._signed_by_current_key(existing)
        if (existing is not None and existing.content == content and not behind
                and not stale and existing.expires_at - now > self.ttl / 2):
            return existing
        serial = max(existing.serial if existing else 0, floor) + 1
        document = encode_document(device_id, serial, now, now + self.ttl, models)
        signed = sign_release(document, self.key)
        record = ReleaseRecord(device_id, serial, signed.document, signed.signature, now,
                               now + self.ttl, content)
        self.store.put_release(record)  # AlreadyExistsError: another replica's came first
        if self.on_change is not None and (existing is None or existing.content != content
                                           or behind or stale):
            self.on_change(device_id)
        return record
