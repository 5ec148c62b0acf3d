"""Per-device release documents: built from the device's arms, signed with the release key.

A device's document changes (new serial) when its arms change, and is renewed (new serial and
expiry, same content) once less than half of its lifetime is left, so a device in touch never
sees its release expire, while one cut off for longer than the lifetime is frozen out of
installing anything stale. ``content`` (a digest of the arms) tells a renewal from a change.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric import ec

from control_plane.domain import ReleaseRecord
from control_plane.storage import Store
from fleetcore.release import Arm, ModelRelease, encode_document, sign_release

__all__ = ["ReleaseIssuer"]


class ReleaseIssuer:
    def __init__(
        self,
        store: Store,
        key: ec.EllipticCurvePrivateKey,
        ttl_seconds: float,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.key = key
        self.ttl = ttl_seconds
        self.on_change = on_change

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

    def current(self, device_id: str, now: float) -> ReleaseRecord | None:
        """The device's release, issuing or renewing it first when needed."""
        models = self._models(device_id)
        existing = self.store.get_release(device_id)
        if existing is None and not models:
            return None
        content = hashlib.sha256(json.dumps(
            [[m.name, [[a.version, a.digest, a.length, a.weight, a.shadow] for a in m.arms],
              m.sample_rate] for m in models]).encode()).hexdigest()
        if (existing is not None and existing.content == content
                and existing.expires_at - now > self.ttl / 2):
            return existing
        serial = existing.serial + 1 if existing else 1
        document = encode_document(device_id, serial, now, now + self.ttl, models)
        signed = sign_release(document, self.key)
        record = ReleaseRecord(device_id, serial, signed.document, signed.signature, now,
                               now + self.ttl, content)
        self.store.put_release(record)
        if self.on_change is not None and (existing is None or existing.content != content):
            self.on_change(device_id)
        return record
