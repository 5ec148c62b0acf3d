"""`control-plane rotate bundle-key --home DIR`: a new key for bundles at rest, and every
stored bundle re-encrypted to it.

Resumable at every step, so a crash (or kill -9) and a rerun finish the job:

1. a new key is written to ``blob.key.new``, then ``blob.key`` is renamed to ``blob.key.old``
   and ``blob.key.new`` to ``blob.key`` (a rerun that finds ``blob.key.old`` continues with the
   key in ``blob.key`` instead of making another one);
2. every blob whose header names another key is re-encrypted to the new one, each atomically
   (a temporary file, fsync'd, renamed over the blob); the header's key id tells a rerun which
   are done;
3. once a last pass finds every blob under the new key, ``blob.key.old`` is deleted and the
   rotation is written to the audit log (``keys.rotate-bundle-key``).

A running control plane keeps serving throughout: its blob store reads each blob with the key
its header names and reloads the key files when it meets one it does not hold
(``control_plane/storage/blobs.py``).
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from control_plane.config import ControlPlaneConfig
from control_plane.services.context import AuditLog
from control_plane.storage import Store, open_store
from control_plane.storage.blobs import BlobStore, key_id, load_or_create_key, old_key_path
from fleetcore.errors import EdgefleetError
from fleetcore.files import atomic_write

__all__ = ["RotationResult", "rotate_bundle_key"]

log = logging.getLogger(__name__)

# A last pass that still finds blobs under the old key (a bundle published meanwhile by a
# control plane that had not seen the new key yet) starts another; at most this many.
MAX_PASSES = 5


@dataclass(frozen=True)
class RotationResult:
    key_id: str
    previous_key_id: str
    resealed: int  # blobs re-encrypted by this run
    blobs: int  # blobs in the store
    resumed: bool  # this run continued an interrupted rotation


def _new_key_path(path: Path) -> Path:
    return path.with_name(path.name + ".new")


def _install_new_key(path: Path) -> bool:
    """Steps 1: make ``blob.key`` a new key with the previous one at ``.old``; True when an
    interrupted rotation was found (its key is kept)."""
    old, new = old_key_path(path), _new_key_path(path)
    if old.exists():
        if not path.exists():  # stopped between the two renames
            os.replace(new, path)
        return True
    atomic_write(new, secrets.token_bytes(32), mode=0o600)
    os.replace(path, old)
    os.replace(new, path)
    return False


def rotate_bundle_key(cfg: ControlPlaneConfig, *,
                      after_each: Callable[[str], None] | None = None) -> RotationResult:
    """Rotate the bundle key of the home ``cfg`` names. ``after_each(digest)`` runs after
    each blob is re-encrypted (progress; tests interrupt the rotation there)."""
    path = cfg.layout.blob_key
    resumed = _install_new_key(path)
    old = old_key_path(path)
    current = load_or_create_key(path)
    previous = old.read_bytes()
    db = open_store(cfg.store_location)
    try:
        # Replicas on PostgreSQL: the database's copies are resealed too (and the blobs other
        # replicas published, which this home may never have had).
        shared = db if db.shares_blobs() else None
        store = BlobStore(cfg.layout.blobs, previous, key_file=path, shared=shared)
        store.use_key(current)
        return _reseal_all(cfg, store, db, current, previous, resumed, after_each)
    finally:
        db.close()


def _reseal_all(cfg: ControlPlaneConfig, store: BlobStore, db: Store, current: bytes,
                previous: bytes, resumed: bool,
                after_each: Callable[[str], None] | None) -> RotationResult:
    old = old_key_path(cfg.layout.blob_key)
    resealed = 0
    for _ in range(MAX_PASSES):
        digests = sorted({"sha256:" + p.name for p in cfg.layout.blobs.iterdir()
                          if len(p.name) == 64 and "." not in p.name}
                         | set(db.blob_digests() if store.shared is not None else ()))
        pending = [d for d in digests if store.key_of(d) != store.current_key_id]
        if not pending:
            break
        for digest in pending:
            if store.reseal(digest):
                resealed += 1
                log.info("re-encrypted %s", digest)
                if after_each is not None:
                    after_each(digest)
    else:
        raise EdgefleetError(f"bundles are still being stored under the old key after "
                             f"{MAX_PASSES} passes; run `control-plane rotate bundle-key "
                             f"--home {cfg.home}` again (it continues where it stopped)")
    result = RotationResult(key_id(current).hex(), key_id(previous).hex(), resealed,
                            len(digests), resumed)
    AuditLog(db, time.time).system("keys.rotate-bundle-key", "bundle-key", {
        "key_id": result.key_id, "previous_key_id": result.previous_key_id,
        "blobs": result.blobs, "resealed": resealed, "resumed": resumed})
    old.unlink()  # only now: every blob is under the new key, and the audit log says so
    return result
