"""Root-level rotations, beside `rotate release-key`:

* ``rotate audit-key``: a new key for audit checkpoints, listed by a new root (checkpoints
  made before still verify: the root chain keeps every audit key it ever listed).
* ``rotate root-keys``: new root keys; the new root is signed by a threshold of the old root
  keys (brought with ``--root-key``) and of the new ones (TUF's rule), so agents follow the
  chain without re-enrolling. The new keys go to ``--out`` (default HOME/root-keys/, the old
  ones then removed from there once the root is published).
* ``root renew``: the same keys in a new root version with a new expiry, before the current
  one expires (agents take no new release while their newest root has expired).
* ``root init``: a root of trust for a home made before roots existed; agents enrolled then
  accept it because it lists the release key they pinned (edge_agent/install/root_trust.py).

Each is audited; with fewer root keys at hand than the thresholds the new root is staged and
``control-plane root sign`` publishes it (then installs the staged key).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from control_plane.config import ControlPlaneConfig
from control_plane.ops import roots_cli
from control_plane.services.roots import ROOT_TTL_SECONDS, RootBook, StageResult, stage_root
from control_plane.storage import Store, open_store
from fleetcore import pki
from fleetcore import root as fleet_root
from fleetcore.errors import AlreadyExistsError, InvalidInputError
from fleetcore.files import atomic_write, ensure_private_dir
from fleetcore.root import RootDocument

__all__ = ["AUDIT_KEY_ROTATION", "ROOT_KEYS_ROTATION", "init_root", "renew_root"]

PRIVATE = 0o600


def _audit(store: Store, action: str, result: StageResult, detail: dict[str, object]) -> None:
    store.append_audit(time.time(), "control-plane", action, f"root v{result.version}",
                       "allowed", json.dumps({**detail, "root_version": result.version,
                                              "published": result.published},
                                             sort_keys=True, separators=(",", ":")))


def rotate_audit_key(args: argparse.Namespace) -> int:
    cfg = ControlPlaneConfig.load(args.home)
    lay = cfg.layout
    keys = roots_cli.root_keys_from(args, cfg)
    new_key = pki.generate_key()

    def change(root: RootDocument, now: float) -> RootDocument:
        return fleet_root.next_root(root, now, now + ROOT_TTL_SECONDS,
                                    {"audit": ([new_key.public_key()], 1)})

    store = open_store(cfg.store_location)
    try:
        atomic_write(lay.audit_key.with_name("pending-audit.key"), pki.private_key_pem(new_key),
                     mode=PRIVATE)
        result = stage_root(store, change, keys, time.time())
        _audit(store, "keys.rotate-audit-key", result,
               {"new_keyid": fleet_root.keyid(new_key.public_key())})
        roots_cli.report(result)
        if result.published:
            roots_cli.install_pending_keys(cfg, store)
    finally:
        store.close()
    return 0


def _audit_key_options(p: argparse.ArgumentParser) -> None:
    roots_cli.add_root_key_option(p)


def rotate_root_keys(args: argparse.Namespace) -> int:
    cfg = ControlPlaneConfig.load(args.home)
    if not 1 <= args.threshold <= args.count <= 16:
        raise InvalidInputError(f"need 1 <= --threshold <= --count <= 16; got {args.threshold} "
                                f"of {args.count}")
    old_keys = roots_cli.root_keys_from(args, cfg)
    default_out = cfg.layout.root_keys
    out = Path(args.out) if args.out else default_out.with_name("root-keys.next")
    if out.exists() and any(out.iterdir()):
        raise AlreadyExistsError(f"{out} is not empty; choose another --out")
    new_keys = [pki.generate_key() for _ in range(args.count)]
    ensure_private_dir(out)
    for i, key in enumerate(new_keys, start=1):
        atomic_write(out / f"root-{i}.key", pki.private_key_pem(key), mode=PRIVATE)
        atomic_write(out / f"root-{i}.pub", pki.public_key_pem(key))

    def change(root: RootDocument, now: float) -> RootDocument:
        return fleet_root.next_root(root, now, now + ROOT_TTL_SECONDS,
                                    {"root": ([k.public_key() for k in new_keys],
                                              args.threshold)})

    store = open_store(cfg.store_location)
    try:
        result = stage_root(store, change, [*old_keys, *new_keys], time.time())
        _audit(store, "keys.rotate-root-keys", result, {
            "new_keyids": sorted(fleet_root.keyid(k.public_key()) for k in new_keys),
            "threshold": args.threshold})
        roots_cli.report(result)
    finally:
        store.close()
    if result.published and not args.out:
        # The home held the old keys: the new ones take their place.
        for old in roots_cli.root_key_paths(default_out):
            old.unlink()
        for path in sorted(out.iterdir()):
            path.replace(default_out / path.name)
        out.rmdir()
        print(f"new root keys in {default_out}: move them offline")
    else:
        print(f"new root keys in {out}: keep them offline")
    return 0


def _root_keys_options(p: argparse.ArgumentParser) -> None:
    roots_cli.add_root_key_option(p)
    p.add_argument("--count", type=int, default=3, help="new root keys (default 3)")
    p.add_argument("--threshold", type=int, default=2,
                   help="signatures a later root needs from them (default 2)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="where the new keys go (default: they replace HOME/root-keys/)")


def renew_root(args: argparse.Namespace) -> int:
    cfg = ControlPlaneConfig.load(args.home)
    keys = roots_cli.root_keys_from(args, cfg)

    def change(root: RootDocument, now: float) -> RootDocument:
        return fleet_root.next_root(root, now, now + ROOT_TTL_SECONDS, {})

    store = open_store(cfg.store_location)
    try:
        result = stage_root(store, change, keys, time.time())
        _audit(store, "keys.renew-root", result, {})
        roots_cli.report(result)
    finally:
        store.close()
    return 0


def init_root(args: argparse.Namespace) -> int:
    """A root for a home made before roots: root keys, an audit key, root v1 listing the
    release key and publisher keys the agents pinned at enrollment."""
    cfg = ControlPlaneConfig.load(args.home)
    lay = cfg.layout
    store = open_store(cfg.store_location)
    try:
        if RootBook(store).current() is not None:
            raise AlreadyExistsError("this control plane has a root already; see "
                                     "`control-plane root show`")
        if roots_cli.root_key_paths(lay.root_keys):
            raise AlreadyExistsError(f"{lay.root_keys} holds root keys already")
        if not 1 <= args.threshold <= args.count <= 16:
            raise InvalidInputError(f"need 1 <= --threshold <= --count <= 16; got "
                                    f"{args.threshold} of {args.count}")
        if not lay.audit_key.exists():
            audit = pki.generate_key()
            atomic_write(lay.audit_key, pki.private_key_pem(audit), mode=PRIVATE)
            atomic_write(lay.audit_pub, pki.public_key_pem(audit))
        audit_pub = pki.load_private_key(lay.audit_key.read_bytes()).public_key()
        ensure_private_dir(lay.root_keys)
        roots = [pki.generate_key() for _ in range(args.count)]
        for i, key in enumerate(roots, start=1):
            atomic_write(lay.root_keys / f"root-{i}.key", pki.private_key_pem(key), mode=PRIVATE)
            atomic_write(lay.root_keys / f"root-{i}.pub", pki.public_key_pem(key))
        now = time.time()
        root_v1 = fleet_root.build_root(1, now, now + ROOT_TTL_SECONDS, {
            "root": ([k.public_key() for k in roots], args.threshold),
            "release": ([pki.load_public_key(lay.release_pub.read_bytes())], 1),
            "publisher": ([pki.load_public_key(p.read_bytes()) for p in cfg.publisher_keys],
                          1),
            "audit": ([audit_pub], 1),
        })
        store.put_root(1, fleet_root.sign_root(root_v1, roots), "published", now)
        store.append_audit(now, "control-plane", "keys.init-root", "root v1", "allowed",
                           json.dumps({"root_keys": args.count, "threshold": args.threshold}))
    finally:
        store.close()
    print(f"root version 1 published; root keys in {lay.root_keys}: move them offline")
    return 0


AUDIT_KEY_ROTATION = (
    "a new audit-checkpoint key through a new root (older checkpoints still verify)",
    _audit_key_options, rotate_audit_key)
ROOT_KEYS_ROTATION = (
    "new root keys; the new root is signed by a threshold of the old and of the new keys",
    _root_keys_options, rotate_root_keys)
