"""Publishers: the keys that sign model bundles, held by the root's "publisher" role.

``fleet publishers list | add PUB.pem | revoke KEYID [--rollback]`` (admin; audited as
``publishers.add`` / ``publishers.revoke``). Adding or revoking a key makes the next root
(``fleetcore.root.next_root``) and signs it with the root keys at hand in HOME/root-keys/
(``control_plane.services.roots.stage_root``): published when both root thresholds hold, else
staged as pending for ``control-plane root sign`` with keys brought from offline storage.
Agents adopt the new root at their next sync and verify bundles with its publisher keys and
threshold from then on; the registry does the same for uploads (``publisher_trust``).

Each published version records the ids of the keys that signed it
(``model_versions.signer_keyids``). After a revocation a version whose signers no longer
reach the threshold is *untrusted*: rollouts of it are refused, agents refuse to install it,
devices that serve it keep serving it, unless ``--rollback`` releases them back to the newest
version of that model that is still trusted. Versions published before signers were recorded
are unknown and left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec

from control_plane.domain.records import AuditOutcome, RolloutState
from control_plane.services.context import Context
from control_plane.services.roots import (
    ROOT_TTL_SECONDS,
    StageResult,
    load_root_keys,
    root_key_files,
    stage_root,
)
from fleetcore import pki
from fleetcore import root as fleet_root
from fleetcore.bundle_verify import publisher_keyid
from fleetcore.errors import AlreadyExistsError, InvalidInputError, NotFoundError
from fleetcore.root import RootDocument

__all__ = [
    "PublisherChange",
    "PublisherList",
    "PublisherService",
    "PublisherTrust",
    "publisher_trust",
    "version_trusted",
]

log = logging.getLogger(__name__)

MAX_PEM_BYTES = 4096


@dataclass(frozen=True)
class PublisherTrust:
    """The publisher keys uploads and agents trust now, and how many must sign a bundle."""

    pems: tuple[bytes, ...]
    keyids: tuple[str, ...]
    threshold: int
    root_version: int  # 0: no root yet ([pki] publisher_keys, threshold 1)

    def meets(self, signers: Iterable[str]) -> bool:
        return len(set(signers) & set(self.keyids)) >= self.threshold


def publisher_trust(ctx: Context) -> PublisherTrust:
    current = ctx.roots.current()
    if current is None:
        pems = tuple(ctx.keys.publisher_public_pems)
        ids = []
        for pem in pems:
            try:
                ids.append(publisher_keyid(pem))
            except InvalidInputError:
                continue
        return PublisherTrust(pems, tuple(ids), 1, 0)
    spec = current.root.roles["publisher"]
    return PublisherTrust(tuple(pki.public_key_pem(current.root.keys[k]) for k in spec.keyids),
                          spec.keyids, spec.threshold, current.version)


def version_trusted(ctx: Context, model: str, version: int) -> bool:
    """False only for a version whose recorded signers no longer meet the threshold."""
    signers = ctx.store.version_signers().get((model, version))
    return signers is None or publisher_trust(ctx).meets(signers)


@dataclass(frozen=True)
class PublisherList:
    publishers: tuple[tuple[str, bytes], ...]  # (key id, public key PEM)
    threshold: int
    root_version: int
    pending_version: int  # a staged root waiting for signatures (0: none)


@dataclass(frozen=True)
class PublisherChange:
    keyid: str
    root_version: int
    published: bool  # False: staged, waiting for `control-plane root sign`
    signatures: int
    threshold: int
    rolled_back: tuple[str, ...]  # "DEVICE MODEL vOLD -> vNEW"


class PublisherService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.store = ctx.store

    def listing(self, caller: pki.Identity) -> PublisherList:
        self.ctx.authorize(caller, "publishers.list", "")
        trust = publisher_trust(self.ctx)
        pending = self.store.pending_root()
        return PublisherList(tuple(zip(trust.keyids, trust.pems, strict=True)), trust.threshold,
                             trust.root_version, pending[0] if pending else 0)

    def add(self, caller: pki.Identity, pem: bytes, threshold: int = 0) -> PublisherChange:
        try:
            key: ec.EllipticCurvePublicKey | None = _load_pem(pem)
        except InvalidInputError:
            key = None  # refused below, once the caller is known to be allowed
        kid = fleet_root.keyid(key) if key is not None else ""
        self.ctx.authorize(caller, "publishers.add", kid)
        key = key or _load_pem(pem)
        root = self._current()
        spec = root.roles["publisher"]
        if kid in spec.keyids:
            raise AlreadyExistsError(f"publisher key {kid[:16]}... is trusted already; hint: "
                                     "`fleet publishers list`")
        keys = [root.keys[k] for k in spec.keyids] + [key]
        k = _threshold(threshold or spec.threshold, len(keys))
        result = self._stage(keys, k)
        self.ctx.audit.record(caller, "publishers.add", kid, AuditOutcome.ALLOWED,
                              _details(result, k))
        return PublisherChange(kid, result.version, result.published, result.signatures, k, ())

    def revoke(self, caller: pki.Identity, keyid: str, *, rollback: bool = False,
               threshold: int = 0) -> PublisherChange:
        self.ctx.authorize(caller, "publishers.revoke", keyid[:64])
        if not 1 <= len(keyid) <= 64 or any(c not in "0123456789abcdefABCDEF" for c in keyid):
            raise InvalidInputError(f"a key id is 1..64 hex digits; got {keyid[:80]!r}; hint: "
                                    "`fleet publishers list` shows them")
        root = self._current()
        spec = root.roles["publisher"]
        matches = [k for k in spec.keyids if keyid and k.startswith(keyid.lower())]
        if len(matches) > 1:
            raise InvalidInputError(f"key id prefix {keyid!r} names {len(matches)} publishers; "
                                    "hint: give more of the id (`fleet publishers list`)")
        if not matches:
            if not rollback:
                raise NotFoundError(f"no trusted publisher key {keyid!r}; hint: `fleet "
                                    "publishers list` shows the trusted ones")
            # Revoked already (the root was staged, then signed): only the rollback is left.
            moved = self._rollback(self.ctx.clock())
            self.ctx.audit.record(caller, "publishers.revoke", keyid, AuditOutcome.ALLOWED,
                                  {"rollback": list(moved), "root_version": root.version})
            return PublisherChange(keyid, root.version, True, 0, spec.threshold, moved)
        kid = matches[0]
        keys = [root.keys[k] for k in spec.keyids if k != kid]
        if not keys:
            raise InvalidInputError("cannot revoke the only publisher key: nothing could "
                                    "publish; hint: `fleet publishers add NEW.pem` first")
        k = _threshold(threshold or min(spec.threshold, len(keys)), len(keys))
        if threshold == 0 and spec.threshold > len(keys):
            raise InvalidInputError(
                f"revoking leaves {len(keys)} publisher key(s) for a threshold of "
                f"{spec.threshold}; hint: pass --threshold {len(keys)} or add a key first")
        result = self._stage(keys, k)
        paused = self._pause_untrusted_rollouts(kid) if result.published else []
        moved = self._rollback(self.ctx.clock()) if rollback and result.published else ()
        self.ctx.audit.record(caller, "publishers.revoke", kid, AuditOutcome.ALLOWED,
                              {**_details(result, k), "rollback": list(moved),
                               "paused_rollouts": paused})
        log.warning("publisher key %s revoked (root v%d %s)", kid[:16], result.version,
                    "published" if result.published else "staged")
        return PublisherChange(kid, result.version, result.published, result.signatures, k,
                               moved)

    # ------------------------------------------------------------------ internals
    def _current(self) -> RootDocument:
        current = self.ctx.roots.current()
        if current is None:
            raise NotFoundError("this control plane has no root of trust yet; hint: a home "
                                "made by `control-plane init` has one")
        if self.store.pending_root() is not None:
            raise AlreadyExistsError(
                "a staged root is waiting for signatures; hint: `control-plane root sign "
                "--home DIR --root-key FILE` publishes it before another change")
        return current.root

    def _stage(self, keys: Sequence[ec.EllipticCurvePublicKey], k: int) -> StageResult:
        at_hand = load_root_keys(root_key_files(self.ctx.config.layout.root_keys))

        def change(root: RootDocument, now: float) -> RootDocument:
            return fleet_root.next_root(root, now, now + ROOT_TTL_SECONDS,
                                        {"publisher": (list(keys), k)})

        return stage_root(self.store, change, at_hand, self.ctx.clock())

    def _pause_untrusted_rollouts(self, kid: str) -> list[str]:
        """A running rollout of a version no longer trusted gives it to no more devices."""
        paused = []
        for r in self.store.running_rollouts():
            if r.state is RolloutState.RUNNING and not version_trusted(self.ctx, r.model,
                                                                       r.version):
                reason = f"publisher key {kid[:16]}... revoked"
                self.store.update_rollout(r.id, state=RolloutState.PAUSED.value, reason=reason,
                                          history=[*r.history, reason])
                paused.append(f"{r.model}:{r.version}")
        return paused

    def _rollback(self, now: float) -> tuple[str, ...]:
        """Release every device serving an untrusted version back to the newest trusted
        version of that model (devices with no trusted version to go to keep theirs)."""
        trust = publisher_trust(self.ctx)
        signers = self.store.version_signers()
        untrusted = {mv for mv, ids in signers.items() if not trust.meets(ids)}
        if not untrusted:
            return ()
        moved: list[str] = []
        targets: dict[tuple[str, int], list[str]] = {}
        for device in self.store.list_devices():
            if device.revoked_at is not None:
                continue
            for arm in self.store.device_arms(device.id):
                if (arm.model, arm.version) not in untrusted:
                    continue
                good = [v for (m, v), ids in signers.items()
                        if m == arm.model and trust.meets(ids)]
                older = [v for v in good if v < arm.version]
                to = max(older or good or [0])
                if to == 0:
                    log.warning("%s serves untrusted %s v%d and no trusted version exists",
                                device.id, arm.model, arm.version)
                    continue
                targets.setdefault((arm.model, to), []).append(device.id)
                moved.append(f"{device.id} {arm.model} v{arm.version} -> v{to}")
        for (model, version), devices in targets.items():
            self.store.assign_version(model, version, devices)
            self.ctx.push(devices, now)
        return tuple(moved)


def _load_pem(pem: bytes) -> ec.EllipticCurvePublicKey:
    if not pem or len(pem) > MAX_PEM_BYTES:
        raise InvalidInputError(f"publisher key must be a PEM public key of at most "
                                f"{MAX_PEM_BYTES} bytes")
    try:
        key = pki.load_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise InvalidInputError(f"publisher key is not a PEM public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise InvalidInputError("publisher key must be an EC P-256 public key "
                                "(`trainer keygen` makes one)")
    return key


def _threshold(k: int, n: int) -> int:
    if not 1 <= k <= n:
        raise InvalidInputError(f"publisher threshold must be 1..{n} (the number of publisher "
                                f"keys); got {k}")
    return k


def _details(result: StageResult, k: int) -> dict[str, object]:
    return {"root_version": result.version, "published": result.published,
            "signatures": result.signatures, "threshold": k}
