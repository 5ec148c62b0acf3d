"""`control-plane rotate WHAT --home DIR`: one function per key or certificate.

Each rotation runs beside a serving control plane (which reloads the home's keys within a
second: ``control_plane/services/keywatch.py``), is audited, and is documented as a runbook in
docs/operator-guide.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from control_plane.ops import rotate_release_key

__all__ = ["ROTATIONS", "add_parsers", "run"]

# what -> (help, add its options, run it: args -> exit status)
ROTATIONS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                           Callable[[argparse.Namespace], int]]] = {
    "release-key": rotate_release_key.ROTATION,
}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    for what, (help_text, add_options, _) in sorted(ROTATIONS.items()):
        p = sub.add_parser(what, help=help_text)
        p.add_argument("--home", required=True, type=Path)
        add_options(p)


def run(args: argparse.Namespace) -> int:
    return ROTATIONS[args.what][2](args)
