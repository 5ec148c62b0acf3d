"""Read and write the small TOML files the project keeps (configs, client configs).

Reading uses the standard library; writing covers exactly what our files hold: tables of
strings, integers, floats, booleans and lists of strings.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fleetcore.errors import InvalidInputError
from fleetcore.files import atomic_write

__all__ = ["dumps", "load", "write"]

MAX_TOML_BYTES = 1024 * 1024
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def load(path: Path) -> dict[str, Any]:
    data = Path(path).read_bytes()
    if len(data) > MAX_TOML_BYTES:
        raise InvalidInputError(f"{path}: {len(data)} bytes; the limit is {MAX_TOML_BYTES}")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{path}: not valid TOML: {exc}") from None


def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else json.dumps(k)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dumps(doc: Mapping[str, Any]) -> str:
    lines: list[str] = []
    tables = [(k, v) for k, v in doc.items() if isinstance(v, Mapping)]
    for key, value in doc.items():
        if not isinstance(value, Mapping):
            lines.append(f"{_key(key)} = {_value(value)}")
    for name, table in tables:
        if lines:
            lines.append("")
        lines.append(f"[{name}]")
        for key, value in table.items():
            if isinstance(value, Mapping):
                raise TypeError("nested tables are not supported")
            lines.append(f"{_key(key)} = {_value(value)}")
    return "\n".join(lines) + "\n"


def write(path: Path, doc: Mapping[str, Any], *, mode: int = 0o644) -> None:
    atomic_write(path, dumps(doc).encode("utf-8"), mode=mode)
