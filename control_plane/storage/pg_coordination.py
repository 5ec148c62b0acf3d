"""What several control-plane replicas on one PostgreSQL database coordinate through it.

* Leadership: a session-level advisory lock (``pg_try_advisory_lock``) held on a connection of
  its own. PostgreSQL releases it when that session ends, so a replica that stops, crashes or
  loses the network gives it up as soon as its connection closes (the kernel's or the server's
  TCP keepalive for a host that vanished), and the next replica that asks takes it.
* Changes: ``NOTIFY edgefleet_changes`` with a payload ``<origin> <what>`` (a device id whose
  release changed, or ``roots``); one listening connection per replica, on a thread, hands each
  change from another origin to a callback. Notifications sent while a listener was
  disconnected are lost, so after a reconnection it reports ``"*"`` (look at everything again).

No consensus protocol of our own: the database is the arbiter.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
from collections.abc import Callable
from typing import Any

import psycopg

__all__ = ["CHANNEL", "ChangeListener", "Leadership", "lock_key"]

log = logging.getLogger(__name__)

CHANNEL = "edgefleet_changes"
# How long the listener waits for a notification before it checks whether it should stop.
_POLL_SECONDS = 0.5
_RECONNECT_SECONDS = 1.0


def lock_key(name: str) -> int:
    """A signed 64-bit advisory lock key for a leadership's name."""
    return int.from_bytes(hashlib.sha256(b"edgefleet-lead:" + name.encode()).digest()[:8],
                          "big", signed=True)


def _connect(url: str) -> psycopg.Connection[Any]:
    # Keepalives: a leader whose host vanished loses its session (and its locks) in seconds.
    return psycopg.connect(url, autocommit=True, connect_timeout=5, keepalives=1,
                           keepalives_idle=5, keepalives_interval=2, keepalives_count=3)


class Leadership:
    """The advisory locks this process holds, on one dedicated connection."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: psycopg.Connection[Any] | None = None
        self._held: set[str] = set()
        self._mutex = threading.Lock()

    def try_lead(self, name: str) -> bool:
        with self._mutex:
            try:
                if self._conn is None or self._conn.closed:
                    self._held.clear()
                    self._conn = _connect(self.url)
                if name in self._held:
                    self._conn.execute("SELECT 1")  # the session (and so the lock) still lives
                    return True
                row = self._conn.execute("SELECT pg_try_advisory_lock(%s)",
                                         (lock_key(name),)).fetchone()
            except psycopg.Error as exc:
                log.warning("leadership %r: the database connection failed: %s", name, exc)
                self._drop()
                return False
            if row is not None and row[0]:
                self._held.add(name)
                log.info("this replica now leads %r", name)
                return True
            return False

    def _drop(self) -> None:
        self._held.clear()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        with self._mutex:
            self._drop()


class ChangeListener:
    """Publishes changes, and listens for other replicas' on a thread of its own."""

    def __init__(self, url: str, pool_execute: Callable[[str, tuple[Any, ...]], None]) -> None:
        self.url = url
        self.origin = secrets.token_hex(8)  # this process: its own notifications are skipped
        self._execute = pool_execute
        self._closers: list[Callable[[], None]] = []

    def publish(self, what: str) -> None:
        self._execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"{self.origin} {what}"))

    def listen(self, callback: Callable[[str], None]) -> Callable[[], None]:
        stop = threading.Event()
        ready = threading.Event()
        thread = threading.Thread(target=self._run, args=(callback, stop, ready),
                                  name="edgefleet-listen", daemon=True)
        thread.start()
        ready.wait(10)  # listening before the caller goes on (or given up: it retries)

        def close() -> None:
            stop.set()
            thread.join(5)

        self._closers.append(close)
        return close

    def _run(self, callback: Callable[[str], None], stop: threading.Event,
             ready: threading.Event) -> None:
        first = True
        while not stop.is_set():
            try:
                with _connect(self.url) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    ready.set()
                    if not first:
                        callback("*")  # what was sent while we were away is lost
                    first = False
                    while not stop.is_set():
                        for note in conn.notifies(timeout=_POLL_SECONDS):
                            origin, _, what = note.payload.partition(" ")
                            if origin != self.origin and what:
                                self._deliver(callback, what)
            except psycopg.Error as exc:
                log.warning("change listener: the database connection failed (%s); "
                            "reconnecting", exc)
                stop.wait(_RECONNECT_SECONDS)

    @staticmethod
    def _deliver(callback: Callable[[str], None], what: str) -> None:
        try:
            callback(what)
        except Exception:
            log.exception("change listener: handling %r failed", what)

    def close(self) -> None:
        closers, self._closers = self._closers, []
        for close in closers:
            close()
