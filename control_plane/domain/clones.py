"""Cloned device certificates: two agent processes speaking under one device identity.

Each agent process picks a random session id when it starts (kept in memory only) and sends
it with every heartbeat and Sync stream. A restart is a new session that then stays; a clone
is two sessions taking turns: a session seen again after another one spoke, within
``window`` seconds of its previous heartbeat. Two Sync streams of one device open at once
under different sessions are a clone too (the caller re-checks after a grace, so that the
stream of a process that just died is not counted).

Pure rules, no I/O: the caller (``services/detection.py``) flags, audits and revokes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

__all__ = ["CloneDetector", "Sighting", "Suspicion"]

# Sessions remembered per device (a clone needs two; restarts add one each).
MAX_SESSIONS = 8


@dataclass(frozen=True)
class Sighting:
    session: str
    peer: str  # "ipv4:10.0.0.5:51234" (gRPC) or "mqtt"
    at: float


@dataclass(frozen=True)
class Suspicion:
    """Why a device looks cloned: the two sessions, where each came from."""

    device_id: str
    how: str  # "heartbeats" | "sync-streams"
    first: Sighting
    second: Sighting

    def detail(self) -> dict[str, object]:
        return {"how": self.how,
                "peers": [self.first.peer, self.second.peer],
                "sessions": [self.first.session, self.second.session],
                "seen_at": [self.first.at, self.second.at]}


@dataclass
class _Device:
    last: str = ""
    sessions: dict[str, Sighting] = field(default_factory=dict)
    streams: dict[int, Sighting] = field(default_factory=dict)


class CloneDetector:
    """Remembers, per device, the recent sessions and the open Sync streams."""

    def __init__(self, window_seconds: float) -> None:
        self.window = window_seconds
        self._devices: dict[str, _Device] = {}
        self._tokens = itertools.count(1)

    def heartbeat(self, device_id: str, session: str, peer: str,
                  now: float) -> Suspicion | None:
        """A heartbeat of ``session``; a Suspicion when it returns after another spoke."""
        if not session:  # an agent from before session ids: nothing to compare
            return None
        d = self._devices.setdefault(device_id, _Device())
        for old in [s for s, seen in d.sessions.items() if now - seen.at > self.window]:
            del d.sessions[old]
        seen = Sighting(session, peer, now)
        before = d.sessions.get(session)
        other = d.sessions.get(d.last)
        suspicion = None
        if before is not None and d.last != session and other is not None:
            suspicion = Suspicion(device_id, "heartbeats", other, seen)
        d.sessions.pop(session, None)
        d.sessions[session] = seen  # newest last: the oldest goes first below
        while len(d.sessions) > MAX_SESSIONS:
            del d.sessions[next(iter(d.sessions))]
        d.last = session
        return suspicion

    def stream_opened(self, device_id: str, session: str, peer: str,
                      now: float) -> tuple[int, Sighting | None]:
        """Register an open Sync stream; its token, and another session's open stream (a
        candidate clone: confirm with ``still_concurrent`` after a grace)."""
        d = self._devices.setdefault(device_id, _Device())
        token = next(self._tokens)
        d.streams[token] = Sighting(session, peer, now)
        other = next((s for t, s in d.streams.items()
                      if t != token and session and s.session and s.session != session), None)
        return token, other

    def still_concurrent(self, device_id: str, token: int, now: float) -> Suspicion | None:
        """After a grace: the stream ``token`` and another session's are both still open."""
        d = self._devices.get(device_id)
        mine = d.streams.get(token) if d is not None else None
        if d is None or mine is None:
            return None
        other = next((s for t, s in d.streams.items()
                      if t != token and s.session and s.session != mine.session), None)
        if other is None:
            return None
        return Suspicion(device_id, "sync-streams", other, Sighting(mine.session, mine.peer, now))

    def stream_closed(self, device_id: str, token: int) -> None:
        d = self._devices.get(device_id)
        if d is not None:
            d.streams.pop(token, None)
            if not d.streams and not d.sessions:
                del self._devices[device_id]
