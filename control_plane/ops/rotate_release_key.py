"""`control-plane rotate release-key --home DIR [--root-key FILE ...]`.

1. A new release key; a new root (version + 1) listing it as the only release key, signed by
   the root keys at hand. With both thresholds met the root is published; otherwise it is
   staged ("pending") and the new key waits in keys/pending-release.key until
   `control-plane root sign` publishes the root.
2. Once published, the new key replaces keys/release.key and release.pub. The serving control
   plane reloads it within a second (KeyWatch) and re-issues every device's release signed by
   it; agents get the root first (Sync, the retained MQTT roots topic), adopt it, forget the
   serial held under the old key, and from then on refuse releases signed by the old key.
3. Audited as ``keys.rotate-release-key``.
"""

from __future__ import annotations

import argparse
import json
import time

from control_plane.config import ControlPlaneConfig
from control_plane.ops import roots_cli
from control_plane.services.roots import ROOT_TTL_SECONDS, stage_root
from control_plane.storage import open_store
from fleetcore import pki
from fleetcore import root as fleet_root
from fleetcore.files import atomic_write
from fleetcore.root import RootDocument

__all__ = ["ROTATION", "rotate_release_key"]


def rotate_release_key(args: argparse.Namespace) -> int:
    cfg = ControlPlaneConfig.load(args.home)
    lay = cfg.layout
    keys = roots_cli.root_keys_from(args, cfg)
    new_key = pki.generate_key()
    old_id = fleet_root.keyid(pki.load_public_key(lay.release_pub.read_bytes()))
    new_id = fleet_root.keyid(new_key.public_key())

    def change(root: RootDocument, now: float) -> RootDocument:
        return fleet_root.next_root(root, now, now + ROOT_TTL_SECONDS,
                                    {"release": ([new_key.public_key()], 1)})

    store = open_store(cfg.store_location)
    try:
        # The new key is on disk (private, not yet in use) before any root names it.
        atomic_write(lay.release_key.with_name("pending-release.key"),
                     pki.private_key_pem(new_key), mode=0o600)
        now = time.time()
        result = stage_root(store, change, keys, now)
        store.append_audit(now, "control-plane", "keys.rotate-release-key", f"root v"
                           f"{result.version}", "allowed", json.dumps(
                               {"old_keyid": old_id, "new_keyid": new_id,
                                "root_version": result.version,
                                "published": result.published}, sort_keys=True,
                               separators=(",", ":")))
        roots_cli.report(result)
        if result.published:
            roots_cli.install_pending_release_key(cfg, store)
    finally:
        store.close()
    return 0


# Registered in control_plane/ops/rotate.py's ROTATIONS.
ROTATION = (
    "a new release key through a new root; agents refuse the old key afterwards",
    roots_cli.add_root_key_option,
    rotate_release_key,
)
