"""`control-plane root show|sign --home DIR`: the fleet's root of trust, and the signing of a
staged (pending) root with root keys brought from offline storage.

Root keys are read only from the files named with ``--root-key`` (repeatable; by default every
``*.key`` in HOME/root-keys/, where init put them). The control plane itself needs only the
signed documents (``control_plane/services/roots.py``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from control_plane.config import ControlPlaneConfig
from control_plane.services.roots import (
    RootBook,
    StageResult,
    load_root_keys,
    root_key_files,
    sign_pending,
)
from control_plane.storage import Store, open_store
from fleetcore import pki
from fleetcore import root as fleet_root
from fleetcore.cli import print_table
from fleetcore.errors import InvalidInputError, NotFoundError
from fleetcore.files import atomic_write
from fleetcore.signing import SigningKey

__all__ = ["add_parsers", "install_pending_keys", "install_pending_release_key", "root_key_paths",
           "root_keys_from", "run"]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    root = sub.add_parser("root", help="the fleet's root of trust: show it, sign a staged one")
    what = root.add_subparsers(dest="root_command", required=True, metavar="WHAT")
    show = what.add_parser("show", help="the current root: version, expiry, keys per role")
    show.add_argument("--home", required=True, type=Path)
    sign = what.add_parser("sign", help="add root-key signatures to the pending root; it is "
                                        "published once both thresholds hold")
    sign.add_argument("--home", required=True, type=Path)
    add_root_key_option(sign)
    renew = what.add_parser("renew", help="the same keys in a new root version with a new "
                                          "expiry (before the current one expires)")
    renew.add_argument("--home", required=True, type=Path)
    add_root_key_option(renew)
    init = what.add_parser("init", help="a root of trust for a home made before roots existed")
    init.add_argument("--home", required=True, type=Path)
    init.add_argument("--count", type=int, default=3, help="root keys (default 3)")
    init.add_argument("--threshold", type=int, default=2,
                      help="signatures a later root needs from them (default 2)")


def add_root_key_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root-key", action="append", type=Path, default=[], metavar="FILE",
                   help="a root private key (repeatable; default: every key in HOME/root-keys/)")


def root_keys_from(args: argparse.Namespace, cfg: ControlPlaneConfig) -> list[SigningKey]:
    paths = list(args.root_key) or root_key_files(cfg.layout.root_keys)
    if not paths:
        raise InvalidInputError(f"no root keys: pass --root-key FILE (none in "
                                f"{cfg.layout.root_keys})")
    return load_root_keys(paths)


def run(args: argparse.Namespace) -> int:
    cfg = ControlPlaneConfig.load(args.home)
    store = open_store(cfg.store_location)
    try:
        if args.root_command == "show":
            return _show(store)
        result = sign_pending(store, root_keys_from(args, cfg), time.time())
        report(result)
        if result.published:
            install_pending_keys(cfg, store)
        return 0
    finally:
        store.close()


def report(result: StageResult) -> None:
    if result.published:
        print(f"root version {result.version} published ({result.signatures} signatures); "
              "agents adopt it at their next sync")
    else:
        print(f"root version {result.version} staged with {result.signatures} signatures; "
              "both thresholds are not met yet: run `control-plane root sign --home DIR "
              "--root-key FILE` with more root keys")


def install_pending_release_key(cfg: ControlPlaneConfig, store: Store) -> bool:
    """Once a root listing the staged release key is published, make it the release key (the
    serving control plane picks it up: KeyWatch)."""
    lay = cfg.layout
    return _install_pending(store, "release", lay.release_key, lay.release_pub)


def install_pending_keys(cfg: ControlPlaneConfig, store: Store) -> None:
    """Install every staged key (release, audit) that the published root now lists."""
    lay = cfg.layout
    _install_pending(store, "release", lay.release_key, lay.release_pub)
    _install_pending(store, "audit", lay.audit_key, lay.audit_pub)


def root_key_paths(folder: Path) -> list[Path]:
    """Every root key file (private and public halves) in ``folder``."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".key", ".pub"))


def _install_pending(store: Store, role: str, key_path: Path, pub_path: Path) -> bool:
    pending = key_path.with_name(f"pending-{role}.key")
    if not pending.exists():
        return False
    key = pki.load_private_key(pending.read_bytes())
    current = RootBook(store).current()
    if current is None or fleet_root.keyid(key.public_key()) not in (
            current.root.roles[role].keyids):
        return False
    # Private half first: KeyWatch loads only a matching pair, so never a mixed one.
    atomic_write(key_path, pki.private_key_pem(key), mode=0o600)
    atomic_write(pub_path, pki.public_key_pem(key))
    os.unlink(pending)
    print(f"{role} key {fleet_root.keyid(key.public_key())[:16]} installed in {key_path}")
    return True


def _show(store: Store) -> int:
    book = RootBook(store)
    current = book.current()
    if current is None:
        raise NotFoundError("no root yet (a home made before roots: see docs/security.md)")
    root = current.root
    expires = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(root.expires_at))
    print(f"root version {root.version}, expires {expires}"
          f"{' (EXPIRED)' if root.expires_at <= time.time() else ''}")
    print_table(("role", "threshold", "keys"), [
        (name, f"{spec.threshold} of {len(spec.keyids)}",
         " ".join(kid[:16] for kid in spec.keyids))
        for name, spec in root.roles.items()])
    pending = store.pending_root()
    if pending is not None:
        env = fleet_root.parse_envelope(pending[1])
        print(f"pending: version {pending[0]} with {len(env.signatures)} signatures "
              "(control-plane root sign)")
    return 0
