"""Detection (docs/security.md, "Detection"): cloned device certificates, and the delivery
problems devices report (freeze, slow retrieval).

A clone (``domain/clones.py``) flags the device ``clone-suspected`` with both peers, writes
``devices.clone-suspected`` to the audit log (actor control-plane) and, under
``[agents] on_clone = "revoke"``, revokes the device through the same path as `fleet devices
revoke` (its certificates refused from then on; the broker's CRL rewritten).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from control_plane.domain.clones import CloneDetector, Suspicion
from control_plane.domain.records import DeviceAlert
from control_plane.services.context import Context
from fleetcore.errors import RevokedError

__all__ = ["CLONE", "DELIVERY_PROBLEMS", "DetectionService"]

log = logging.getLogger(__name__)

CLONE = "clone-suspected"
DELIVERY_PROBLEMS = ("freeze", "slow-retrieval")
MAX_DETAIL_CHARS = 500
# The clone window: a session seen again within this many heartbeat intervals of its last.
WINDOW_INTERVALS = 3
# How long two Sync streams of different sessions must both stay open to count as a clone
# (the stream of a process that just died closes within it).
STREAM_GRACE_SECONDS = 2.0


class DetectionService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.clones = CloneDetector(WINDOW_INTERVALS * ctx.config.heartbeat_interval_seconds)
        # The delivery problems last stored per device: a heartbeat writes only a change.
        self._reported: dict[str, tuple[tuple[str, str], ...]] = {}

    # ------------------------------------------------------------------ clones
    def heartbeat(self, device_id: str, session: str, peer: str) -> None:
        """Note a heartbeat; raises RevokedError when it revealed a clone and policy revoked."""
        suspicion = self.clones.heartbeat(device_id, session[:64], peer[:128], self.ctx.clock())
        if suspicion is not None:
            self.clone_suspected(suspicion)

    def clone_suspected(self, suspicion: Suspicion) -> None:
        device_id = suspicion.device_id
        now = self.ctx.clock()
        detail = suspicion.detail()
        new = self.store.flag_device(device_id, CLONE, json.dumps(detail, sort_keys=True), now)
        if new:
            log.warning("device %s: cloned certificate suspected (%s)", device_id, detail)
            self.ctx.audit.system("devices.clone-suspected", device_id,
                                  {**detail, "policy": self.ctx.config.on_clone})
        if self.ctx.config.on_clone == "revoke":
            device = self.store.get_device(device_id)
            if device is not None and device.revoked_at is None:
                self.store.revoke_device(device_id, now)
                self.ctx.audit.system("devices.revoke", device_id,
                                      {"reason": "cloned certificate suspected"})
                self.ctx.device_changed(device_id)  # streams end; the broker's CRL is rewritten
            raise RevokedError(f"device {device_id} is revoked: cloned certificate suspected")

    # ------------------------------------------------------------------ delivery problems
    def delivery_problems(self, device_id: str,
                          problems: Sequence[tuple[str, str, float]]) -> None:
        """What the device reported in its heartbeat: (kind, detail, since) of each delivery
        problem it has now; the ones it no longer reports are cleared. Unknown kinds are
        ignored; details are cut to a bound."""
        known = {kind: (detail[:MAX_DETAIL_CHARS], since) for kind, detail, since in problems
                 if kind in DELIVERY_PROBLEMS}
        key = tuple(sorted((kind, detail) for kind, (detail, _) in known.items()))
        if self._reported.get(device_id) == key:
            return
        if not key and device_id not in self._reported and not any(
                a.kind in DELIVERY_PROBLEMS for a in self.store.device_alerts(device_id)):
            self._reported[device_id] = key  # nothing to clear: no write (a read, no fsync)
            return
        now = self.ctx.clock()
        for kind, (detail, since) in known.items():
            if self.store.flag_device(device_id, kind, json.dumps(
                    {"detail": detail, "device_since": since}, sort_keys=True), now):
                log.warning("device %s reports %s: %s", device_id, kind, detail)
        self.store.clear_device_alerts(device_id,
                                       [k for k in DELIVERY_PROBLEMS if k not in known])
        self._reported[device_id] = key

    def alerts(self, device_id: str = "") -> list[DeviceAlert]:
        return self.store.device_alerts(device_id)

