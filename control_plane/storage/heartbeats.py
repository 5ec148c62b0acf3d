"""Group commit for heartbeats: the heartbeats that arrive together share one transaction.

Every heartbeat used to be its own SQLite transaction, so with ``synchronous=FULL`` each paid
an fsync on the event loop; with a large fleet that fsync, not the CPU, bounded the heartbeat
rate (scripts/bench_fleet.py). Here a heartbeat queues its row and waits; the first one of a
loop iteration schedules a flush for the next, which writes every queued row in one
transaction. A heartbeat still answers only after its row is durable, and an unknown device
still fails alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from control_plane.domain.records import InstalledModel
from control_plane.storage.base import Store

__all__ = ["HeartbeatWriter"]

Beat = tuple[str, float, str, Mapping[str, Any], Sequence[InstalledModel]]


class HeartbeatWriter:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._pending: list[tuple[Beat, asyncio.Future[None]]] = []

    async def record(self, device_id: str, now: float, agent_version: str,
                     host: Mapping[str, Any], models: Sequence[InstalledModel]) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._pending.append(((device_id, now, agent_version, host, models), done))
        if len(self._pending) == 1:
            loop.call_soon(self._flush)
        await done

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        try:
            errors = self.store.record_heartbeats([beat for beat, _ in batch])
        except Exception as exc:  # the whole transaction failed: every heartbeat sees it
            for _, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        for (_, done), error in zip(batch, errors, strict=True):
            if done.done():  # the call was cancelled meanwhile
                continue
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)
