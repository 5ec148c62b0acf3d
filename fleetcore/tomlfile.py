"""Read and write the small TOML files the project keeps (configs, client configs).

Reading uses the standard library (``tomllib``); writing uses the maintained ``tomli-w``, which
writes any string ``tomllib`` reads back, characters outside the Basic Multilingual Plane
included (a home or state directory named with an emoji or a rare CJK character).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from fleetcore.errors import InvalidInputError
from fleetcore.files import atomic_write

__all__ = ["dumps", "load", "write"]

MAX_TOML_BYTES = 1024 * 1024


def load(path: Path) -> dict[str, Any]:
    data = Path(path).read_bytes()
    if len(data) > MAX_TOML_BYTES:
        raise InvalidInputError(f"{path}: {len(data)} bytes; the limit is {MAX_TOML_BYTES}")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{path}: not valid TOML: {exc}") from None


def dumps(doc: Mapping[str, Any]) -> str:
    """``doc`` as TOML text; a value TOML cannot hold raises ``TypeError``."""
    return tomli_w.dumps(doc)


def write(path: Path, doc: Mapping[str, Any], *, mode: int = 0o644) -> None:
    atomic_write(path, dumps(doc).encode("utf-8"), mode=mode)
