"""The lock file a control plane serving from a SQLite home holds (``HOME/serve.lock``).

``control-plane serve`` on a SQLite home holds a shared ``flock`` on it for as long as it runs
(several processes on one home may share it, as tests and tools do); ``control-plane migrate``
takes it exclusively and without waiting, so it refuses a home that is serving, and a control
plane started during a migration refuses to start. The kernel drops the lock when its process
dies (even by SIGKILL): a stale file never blocks anything.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from fleetcore.errors import InvalidInputError

__all__ = ["LOCK_FILE", "HomeLock", "hold_exclusive", "hold_serving"]

LOCK_FILE = "serve.lock"

log = logging.getLogger(__name__)


class HomeLock:
    """An open, locked lock file; ``release()`` (or process exit) drops the lock."""

    def __init__(self, fd: int | None) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _open(home: Path) -> int:
    return os.open(Path(home) / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def hold_serving(home: Path) -> HomeLock:
    """A serving control plane's shared lock; refused while a migration holds the home. A
    home where no file can be made (read-only) serves without it: the migration's SQLite
    exclusive lock still refuses a database in use."""
    try:
        fd = _open(home)
    except OSError as exc:
        log.warning("cannot create %s (%s); serving without it", Path(home) / LOCK_FILE, exc)
        return HomeLock(None)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise InvalidInputError(
            f"{home} is being migrated to PostgreSQL (control-plane migrate holds "
            f"{LOCK_FILE}); start the control plane when the migration has finished") from None
    return HomeLock(fd)


def hold_exclusive(home: Path) -> HomeLock:
    """The migration's exclusive lock; refused while any control plane serves this home."""
    fd = _open(home)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise InvalidInputError(
            f"a control plane is serving from {home} (it holds {home / LOCK_FILE}); stop it "
            "(SIGTERM to control-plane serve) and run the migration again") from None
    return HomeLock(fd)
