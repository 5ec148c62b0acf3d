"""Device labels (``K=V``): parsing and limits shared by the CLIs and the control plane."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from fleetcore.errors import InvalidInputError

__all__ = ["MAX_LABELS", "matches", "parse_label_args", "validate_labels"]

MAX_LABELS = 32
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
_VALUE_RE = re.compile(r"^[A-Za-z0-9._/:-]{0,63}$")


def validate_labels(labels: Mapping[str, str]) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise InvalidInputError(f"at most {MAX_LABELS} labels; got {len(labels)}")
    for key, value in labels.items():
        if not _KEY_RE.match(key):
            raise InvalidInputError(
                f"label key must be 1-63 of A-Z a-z 0-9 . _ / -, starting alphanumeric; got {key!r}"
            )
        if not _VALUE_RE.match(value):
            raise InvalidInputError(
                f"label value must be 0-63 of A-Z a-z 0-9 . _ / : -; got {value!r} for {key!r}"
            )
    return dict(labels)


def parse_label_args(items: Iterable[str]) -> dict[str, str]:
    """``["site=paris", "tier=canary"]`` -> ``{"site": "paris", "tier": "canary"}``."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidInputError(f"expected K=V, got {item!r}")
        out[key] = value
    return validate_labels(out)


def matches(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())
