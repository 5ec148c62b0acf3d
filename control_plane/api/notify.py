"""Wake the Sync streams of a device when its release changes or it is revoked."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["DeviceNotifier"]


class DeviceNotifier:
    """Per-device wake-ups for long-lived streams, on one event loop."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = {}

    def notify(self, device_id: str) -> None:
        for event in self._waiters.get(device_id, ()):
            event.set()

    @contextmanager
    def subscribe(self, device_id: str) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        self._waiters.setdefault(device_id, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiters.get(device_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[device_id]

    def subscribers(self, device_id: str) -> int:
        return len(self._waiters.get(device_id, ()))
