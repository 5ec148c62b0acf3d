"""Notices when the home's key material changed on disk (a ``control-plane rotate`` command ran
beside the serving process) and loads it, so rotations need no restart.

The files are polled (their inode, size and modification time), not watched: a home on a
Kubernetes Secret or a network volume gives no reliable change events. A half-written rotation
(a certificate that does not yet match its key) fails to load and is tried again at the next
poll; until then the control plane keeps what it had.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from control_plane.config import ControlPlaneConfig
from control_plane.services.authority import Authority
from fleetcore.errors import UntrustedInputError

__all__ = ["KeyWatch", "fingerprint"]

log = logging.getLogger(__name__)

Fingerprint = tuple[tuple[str, int, int, int], ...]


def _files(config: ControlPlaneConfig) -> list[Path]:
    home = config.home
    paths: list[Path] = []
    for folder in (home / "pki", home / "keys"):
        if folder.is_dir():
            paths.extend(sorted(p for p in folder.iterdir() if p.is_file()))
    paths.extend(config.publisher_keys)
    return paths


def fingerprint(config: ControlPlaneConfig) -> Fingerprint:
    out = []
    for path in _files(config):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        out.append((str(path), st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


class KeyWatch:
    def __init__(self, config: ControlPlaneConfig) -> None:
        self.config = config
        self._seen = fingerprint(config)

    def poll(self) -> Authority | None:
        """The newly loaded key material when the files changed since the last load."""
        now = fingerprint(self.config)
        if now == self._seen:
            return None
        try:
            loaded = Authority.load(self.config)
        except (OSError, ValueError, UntrustedInputError) as exc:
            log.warning("key files changed but do not load yet (%s); keeping the current keys",
                        exc)
            return None
        self._seen = now
        log.info("key material reloaded from %s", self.config.home)
        return loaded
