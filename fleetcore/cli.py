"""What every command-line entry point shares: logging set-up, errors as one line, JSON output."""

from __future__ import annotations

import json
import logging
import sys
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any

from fleetcore.errors import EdgefleetError

__all__ = ["print_json", "print_table", "run_main", "setup_logging", "terminal_safe"]


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_main(fn: Callable[[], int]) -> int:
    """Run a CLI body: a domain error or OSError becomes one line on stderr and exit code 1."""
    try:
        return fn()
    except KeyboardInterrupt:
        return 130
    except (EdgefleetError, OSError, ValueError) as exc:
        print(f"error: {terminal_safe(str(exc))}", file=sys.stderr)
        return 1


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def terminal_safe(text: str) -> str:
    """``text`` with every control and format character escaped (``\\x1b``, ``\\u202e``): what
    a device or a peer reported (a hostname, a reason) cannot move the cursor, clear the
    operator's screen, set the window title or reorder text."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"):
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:  # other separators print as a space
            out.append(" ")
    return "".join(out)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[terminal_safe(str(h)) for h in headers],
             *[[terminal_safe(str(c)) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        sys.stdout.write("\n")
