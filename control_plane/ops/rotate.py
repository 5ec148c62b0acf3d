"""`control-plane rotate WHAT --home DIR`: one function per key or certificate.

Each rotation runs beside a serving control plane (which reloads the home's keys within a
second: ``control_plane/services/keywatch.py``), is audited, and is documented as a runbook in
docs/operator-guide.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from control_plane.config import ControlPlaneConfig
from control_plane.ops import roots_cli, rotate_release_key, rotate_roots
from control_plane.ops.rotate_bundle_key import rotate_bundle_key

__all__ = ["ROTATIONS", "add_parsers", "run"]


def _bundle_key(args: argparse.Namespace) -> int:
    cfg = ControlPlaneConfig.load(args.home)
    rotated = rotate_bundle_key(cfg)
    how = " (an interrupted rotation finished)" if rotated.resumed else ""
    print(f"bundle key rotated{how}: {rotated.previous_key_id} -> {rotated.key_id}; "
          f"{rotated.resealed} of {rotated.blobs} stored bundles re-encrypted; the old key "
          "is deleted")
    return 0


def _no_options(parser: argparse.ArgumentParser) -> None:
    del parser


# what -> (help, add its options, run it: args -> exit status)
ROTATIONS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                           Callable[[argparse.Namespace], int]]] = {
    "bundle-key": ("a new key for bundles at rest; every stored bundle re-encrypted "
                   "(resumable: run it again after an interruption)", _no_options, _bundle_key),
    "release-key": rotate_release_key.ROTATION,
    "audit-key": rotate_roots.AUDIT_KEY_ROTATION,
    "root-keys": rotate_roots.ROOT_KEYS_ROTATION,
}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    for what, (help_text, add_options, _) in sorted(ROTATIONS.items()):
        p = sub.add_parser(what, help=help_text)
        p.add_argument("--home", required=True, type=Path)
        add_options(p)


def run(args: argparse.Namespace) -> int:
    """`rotate WHAT` and `root show|sign|renew|init`."""
    if args.command == "root":
        if args.root_command == "renew":
            return rotate_roots.renew_root(args)
        if args.root_command == "init":
            return rotate_roots.init_root(args)
        return roots_cli.run(args)
    return ROTATIONS[args.what][2](args)
