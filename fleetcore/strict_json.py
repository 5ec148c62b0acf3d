"""The one strict loader for JSON that crosses a trust boundary.

Every parser of untrusted JSON (release documents, bundle manifests and profiles, device
reports, archive indexes) goes through ``loads``: a size limit checked before parsing, UTF-8
only, no duplicate keys (so no two parsers can read different values from one document), no
``NaN``/``Infinity`` (not JSON, and they poison arithmetic), and deep nesting refused (the
parser's recursion limit, caught). Each failure is one ``InvalidInputError`` that names what
was being read.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

from fleetcore.errors import InvalidInputError

__all__ = ["DEFAULT_MAX_BYTES", "loads"]

DEFAULT_MAX_BYTES = 1024 * 1024


class _Refused(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> NoReturn:
    raise _Refused(f"{name} is not a JSON number")


def loads(data: bytes | str, *, what: str, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """Parse ``data`` as strict JSON; ``what`` names it in errors ("release document")."""
    size = len(data.encode("utf-8")) if isinstance(data, str) else len(data)
    if size > max_bytes:
        raise InvalidInputError(f"{what} is {size} bytes; the limit is {max_bytes}")
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInputError(f"{what} is not UTF-8: {exc}") from None
    else:
        text = data
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise InvalidInputError(f"{what} is not valid JSON: {exc}") from None
