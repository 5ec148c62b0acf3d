"""The small context every service shares: store, clock, config, keys, audit, authorization,
the bundle blobs, the release issuer and the devices' presence.

Services take a ``Context`` and never call back up: the API edge calls services, services call
the context, storage and the pure rules in ``control_plane.domain``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

from control_plane.config import ControlPlaneConfig
from control_plane.domain import authz
from control_plane.domain.records import AuditOutcome, DeviceRecord, DeviceView
from control_plane.services.authority import Authority
from control_plane.services.releases import ReleaseIssuer
from control_plane.services.roots import RootBook
from control_plane.storage import Store
from control_plane.storage.blobs import BlobStore
from fleetcore import pki
from fleetcore.errors import PermissionDeniedError

__all__ = ["SYSTEM", "AuditLog", "Context"]

SYSTEM = "control-plane"  # the actor of what the control plane does by itself


@contextlib.contextmanager
def _untraced(name: str, model: str, rollout: bool) -> Iterator[None]:
    yield


class AuditLog:
    """Appends to the hash-chained audit log (the chain itself: ``domain.audit_chain``)."""

    def __init__(self, store: Store, clock: Callable[[], float]) -> None:
        self.store = store
        self.clock = clock

    def record(self, who: pki.Identity | str, action: str, target: str, outcome: AuditOutcome,
               detail: Mapping[str, Any] | None = None) -> None:
        """``who``: an identity, or a name ("control-plane", "token:...")."""
        actor = who.actor if isinstance(who, pki.Identity) else who
        role = who.role.label if isinstance(who, pki.Identity) and who.role else ""
        self.store.append_audit(
            self.clock(), actor, action, target, outcome.value,
            json.dumps(dict(detail or {}), sort_keys=True, separators=(",", ":")), role,
        )

    def system(self, action: str, target: str, detail: Mapping[str, Any]) -> None:
        """An action the control plane took by itself (a scheduler, a policy)."""
        self.record(SYSTEM, action, target, AuditOutcome.ALLOWED, detail)


class Context:
    def __init__(self, config: ControlPlaneConfig, store: Store, keys: Authority, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = store
        self.keys = keys
        self.clock = clock
        # Set by the server once the API port is bound (port 0 resolves only then).
        self.api_address = config.api_advertise or config.api_listen
        self.blobs = BlobStore(config.layout.blobs, keys.blob_key, key_file=config.layout.blob_key,
                               shared=store if store.shares_blobs() else None)
        self.audit = AuditLog(store, clock)
        # Devices whose MQTT connection dropped (the broker published their will); the bridge
        # keeps it, from the retained status topics, so it is rebuilt when it reconnects.
        self.disconnected: set[str] = set()
        # Called with a device id when its release changes or it is revoked (the server binds
        # it to wake the device's Sync streams and the MQTT bridge).
        self.on_device_change: Callable[[str], None] = lambda device_id: None
        # A root span around a change the control plane starts by itself (a retrained
        # version's canary, a promotion): the releases it pushes carry that trace to the
        # agents. ``traced(name, model, rollout)``; the server binds it when OpenTelemetry is
        # on (control_plane/api/tracing.py), a no-op otherwise.
        self.traced: Callable[[str, str, bool], AbstractContextManager[None]] = _untraced
        self.roots = RootBook(store)
        self.releases = ReleaseIssuer(store, keys.release_key, config.release_ttl_seconds,
                                      on_change=self.device_changed, roots=self.roots)

    def audit_key(self) -> Any:
        return self.keys.audit_key or self.keys.release_key

    def set_keys(self, keys: Authority) -> None:
        """Use newly loaded key material (a rotation ran beside this process; KeyWatch).
        A new release key re-issues every device's release signed by it (the devices adopt
        the root listing it first: it goes out before the release)."""
        old = self.keys.release_key.public_key()
        self.keys = keys
        self.releases.key = keys.release_key
        self.blobs.use_key(keys.blob_key)  # the keys held before stay readable
        if keys.release_key.public_key() != old:
            self.releases.reissue_all(self.clock())

    def device_changed(self, device_id: str) -> None:
        self.on_device_change(device_id)  # looked up per call: the server rebinds it

    def authorize(self, caller: pki.Identity, action_name: str, target: str) -> None:
        """Check the caller's role against the action table; a refused change is audited."""
        action = authz.ACTIONS[action_name]
        try:
            authz.check(caller, action)
        except PermissionDeniedError as exc:
            if action.changes_state:
                self.audit.record(caller, action.name, target, AuditOutcome.DENIED,
                                  {"reason": str(exc)})
            raise

    def view(self, record: DeviceRecord, now: float) -> DeviceView:
        status = record.status(now, self.config.offline_after_seconds,
                               disconnected=record.id in self.disconnected)
        return DeviceView(record, status, root_version=self.store.device_root(record.id))

    def push(self, device_ids: Iterable[str], now: float) -> None:
        """Issue each device's release again (its arms may have changed)."""
        for device_id in device_ids:
            self.releases.current(device_id, now)

    def reissue_model(self, model: str) -> None:
        """Re-issue the release of every device in the model's rollout (its content changed)."""
        rollout = self.store.get_rollout(model)
        if rollout is not None:
            self.push(rollout.device_ids, self.clock())
