"""Names of devices, models and operators: one rule, without the PKI's cryptography.

``fleetcore.pki`` re-exports ``validate_name``; code on an agent's serving path imports it from
here so that parsing a release does not load ``cryptography`` (docs/serving.md, "Agent footprint").
"""

from __future__ import annotations

import re

from fleetcore.errors import InvalidInputError

__all__ = ["NAME_RE", "validate_name"]

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def validate_name(name: str, what: str = "name") -> str:
    if not NAME_RE.match(name):
        raise InvalidInputError(
            f"{what} must be 1-63 characters of a-z, 0-9, '.', '_' or '-', starting with a "
            f"letter or digit; got {name!r}"
        )
    return name
