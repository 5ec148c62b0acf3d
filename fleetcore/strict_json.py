"""The one strict loader for JSON that crosses a trust boundary.

Every parser of untrusted JSON (release documents, bundle manifests and profiles, device
reports, archive indexes) goes through ``loads``: a size limit checked before parsing, UTF-8
only, no duplicate keys (so no two parsers can read different values from one document), no
``NaN``/``Infinity`` (not JSON, and they poison arithmetic), and deep nesting refused (the
parser's recursion limit, caught, or ``max_depth`` when given). Each failure is one
``InvalidInputError`` that names what was being read.

``cooperative=True`` is for a large document parsed on a worker thread: numbers go through
Python-level functions (which also refuse a float that overflows to infinity, such as
``1e999``), so the thread gives up the GIL every switch interval; the C scanner otherwise holds
it for the whole document (measured: a 3.7 MB body held an event loop in another thread for
0.4-0.8 s with the C number parser, at most 30-90 ms with these functions).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, NoReturn

from fleetcore.errors import InvalidInputError

__all__ = ["DEFAULT_MAX_BYTES", "loads", "nests_deeper"]

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


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"{text[:32]} is not a finite number")
    return value


def _int(text: str) -> int:
    return int(text)


# A JSON string (brackets inside one do not nest); unrolled, so matching is linear.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_SAME_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def nests_deeper(data: bytes, limit: int) -> bool:
    """Whether arrays and objects nest more than ``limit`` deep in the JSON text ``data``,
    without parsing it: strings blanked, everything but brackets dropped, then ``limit``
    rounds of deleting innermost ``[]`` pairs (each round removes exactly one level). Each
    step runs at C speed (at most ~45 ms for 8 MiB on the 2-core host, ~10 ms for a real
    infer body) and the GIL can change hands between them. Unbalanced brackets count as too
    deep."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    if b'"' in data:
        data = _STRING.sub(b'""', data)
    nest = data.translate(_SAME_BRACKETS, _NOT_BRACKETS)
    if b"[" * (limit + 1) in nest:
        return True  # the plain way to nest deep, found in one search
    for _ in range(limit):
        nest = nest.replace(b"[]", b"")
        if not nest:
            return False
    return True


def _decoder(cooperative: bool, finite: bool) -> json.JSONDecoder:
    numbers: dict[str, Any] = (
        {"parse_float": _finite_float, "parse_int": _int} if cooperative
        else {"parse_float": _finite_float} if finite else {})
    return json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_no_constant,
                            **numbers)


# Made once: a decoder holds no state between documents (``json.loads`` shares one the same
# way), and building one per call cost more than parsing a small device report (~1.5 us).
_DECODERS = {(cooperative, finite): _decoder(cooperative, finite)
             for cooperative in (False, True) for finite in (False, True)}


def loads(data: bytes | str, *, what: str, max_bytes: int = DEFAULT_MAX_BYTES,
          max_depth: int | None = None, cooperative: bool = False,
          finite: bool = True) -> Any:
    """Parse ``data`` as strict JSON; ``what`` names it in errors ("release document").

    ``finite``: refuse a number that overflows to infinity (``1e999``), at the cost of a
    Python call per float; a caller that checks every number itself (serving, on its tensors)
    may pass False for speed."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    size = len(raw)
    if size > max_bytes:
        raise InvalidInputError(f"{what} is {size} bytes; the limit is {max_bytes}")
    if max_depth is not None and nests_deeper(raw, max_depth):
        raise InvalidInputError(f"{what} nests deeper than {max_depth} levels")
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInputError(f"{what} is not UTF-8: {exc}") from None
    else:
        text = data
    try:
        return _DECODERS[cooperative, finite].decode(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidInputError(f"{what} is not valid JSON: {exc}") from None
