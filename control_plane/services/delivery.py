"""What a device fetches: heartbeats (group-committed), its signed release, and the bytes of
the bundles its release names (and no others)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from control_plane.domain.records import InstalledModel, ReleaseRecord
from control_plane.services.context import Context
from control_plane.storage.heartbeats import HeartbeatWriter
from fleetcore import pki
from fleetcore.errors import InvalidInputError, PermissionDeniedError

__all__ = ["DeliveryService"]


class DeliveryService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.heartbeats = HeartbeatWriter(ctx.store)

    async def heartbeat(self, caller: pki.Identity, agent_version: str, host: Mapping[str, Any],
                        models: Sequence[InstalledModel],
                        have: tuple[int, str] = (0, ""),
                        root_version: int | None = None) -> tuple[float, int, int]:
        """Record the device's report; return (server time, interval, release serial).

        The write is group-committed with the other heartbeats of this moment. ``have``:
        (serial, digest) of the newest release the device holds; when it is not one we issued
        (a restored backup), the release is re-issued above it."""
        now = self.ctx.clock()
        await self.heartbeats.record(caller.name, now, agent_version, host, models)
        if root_version is not None and root_version != self.store.device_root(caller.name):
            self.store.set_device_root(caller.name, root_version, now)
        release = self.ctx.releases.current(caller.name, now, have=have,  # renews it when due
                                            have_root=root_version)
        return (now, self.ctx.config.heartbeat_interval_seconds,
                release.serial if release else 0)

    def current_release(self, caller: pki.Identity, have_serial: int = 0,
                        have_root: int | None = None) -> ReleaseRecord | None:
        return self.ctx.releases.current(caller.name, self.ctx.clock(), have=(have_serial, ""),
                                         have_root=have_root)

    def roots_after(self, version: int) -> list[bytes]:
        """The signed roots an agent holding root ``version`` lacks, oldest first."""
        return self.ctx.roots.newer_than(version)

    def bundle(self, caller: pki.Identity, digest: str, offset: int,
               length: int) -> Iterator[bytes]:
        """Bytes of a bundle that the device's release names (and no other)."""
        allowed = {}
        for arm in self.store.device_arms(caller.name):
            mv = self.store.get_model_version(arm.model, arm.version)
            if mv is not None:
                allowed[mv.digest] = mv.length
        if digest not in allowed:
            raise PermissionDeniedError(f"bundle {digest} is not in the release of {caller.name}")
        total = allowed[digest]
        if offset > total:
            raise InvalidInputError(f"offset {offset} is past the end of {digest} ({total} bytes)")
        count = (total - offset) if length == 0 else min(length, total - offset)
        return self.ctx.blobs.read(digest, total, offset, count)
