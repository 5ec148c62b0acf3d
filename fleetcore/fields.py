"""Typed checks for the fields of an untrusted JSON document, after ``fleetcore.strict_json``
has parsed it: exact key sets, exact types (a bool is not an int, an int field takes no
float), ranges and finite numbers. Pure; each failure is one ``InvalidInputError`` naming the
field. Shared by the signed documents' parsers (``fleetcore.release``, ``fleetcore.root``).
"""

from __future__ import annotations

import math
from typing import Any, NoReturn

from fleetcore.errors import InvalidInputError

__all__ = ["integer", "json_list", "json_object", "number", "string", "wrong_type"]


def wrong_type(where: str, expected: str, value: object) -> NoReturn:
    raise InvalidInputError(f"{where} must be {expected}; got {type(value).__name__} "
                            f"{value!r:.80}")


def json_object(raw: object, keys: frozenset[str], where: str) -> dict[str, Any]:
    """``raw`` is an object with exactly ``keys``."""
    if not isinstance(raw, dict):
        wrong_type(where, "a JSON object", raw)
    if raw.keys() != keys:
        raise InvalidInputError(
            f"{where} must have exactly the keys {sorted(keys)}; got unknown "
            f"{sorted(raw.keys() - keys)[:8]} and missing {sorted(keys - raw.keys())}"
        )
    return raw


def string(value: object, where: str) -> str:
    if not isinstance(value, str):
        wrong_type(where, "a string", value)
    return value


def integer(value: object, where: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        wrong_type(where, "an integer", value)
    if not low <= value <= high:
        raise InvalidInputError(f"{where} must be in {low}..{high}; got {value}")
    return value


def number(value: object, where: str) -> float:
    """A finite number (an int is taken as a float; one too large for a float is refused)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        wrong_type(where, "a number", value)
    try:
        result = float(value)
    except OverflowError:
        raise InvalidInputError(f"{where} must be a finite number; got {value:.80}") from None
    if not math.isfinite(result):
        raise InvalidInputError(f"{where} must be a finite number; got {value!r}")
    return result


def json_list(value: object, where: str, low: int, high: int) -> list[Any]:
    if not isinstance(value, list):
        wrong_type(where, "a JSON array", value)
    if not low <= len(value) <= high:
        raise InvalidInputError(f"{where} must have {low}..{high} entries; got {len(value)}")
    return value
