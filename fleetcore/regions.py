"""Data-locality policy: which regions a feature store takes data from.

One parser for the policy wherever it is read: the trainer's pipeline ``[store]
allowed_regions``, the store's own ``policy.toml``, and the control plane vetting samples for
retraining. A region is a short name (``eu-west-1``); ``"*"`` allows any region.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from fleetcore import tomlfile
from fleetcore.errors import InvalidInputError

__all__ = [
    "ANY_REGION",
    "POLICY_FILE",
    "allows",
    "check_region",
    "check_regions",
    "read_policy_file",
]

ANY_REGION = "*"
POLICY_FILE = "policy.toml"
MAX_REGIONS = 256
_REGION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_region(value: object, where: str) -> str:
    """One concrete region name (not ``"*"``): where data lives, e.g. a snapshot's region."""
    if not (isinstance(value, str) and _REGION_RE.match(value)):
        raise InvalidInputError(
            f"{where}: {value!r} is not a region name (1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit)"
        )
    return value


def check_regions(value: object, where: str) -> list[str]:
    """A checked list of region names (or ``"*"``); ``where`` names the source in errors."""
    if not isinstance(value, list | tuple):
        raise InvalidInputError(f'{where}: expected allowed_regions = [list of regions or "*"]')
    if len(value) > MAX_REGIONS:
        raise InvalidInputError(f"{where}: {len(value)} regions; the limit is {MAX_REGIONS}")
    out: list[str] = []
    for r in value:
        if r != ANY_REGION and not (isinstance(r, str) and _REGION_RE.match(r)):
            raise InvalidInputError(f"{where}: {r!r} is not a region name or {ANY_REGION!r}")
        out.append(str(r))
    return out


def read_policy_file(path: Path) -> list[str]:
    """The ``allowed_regions`` of a store's ``policy.toml``."""
    return check_regions(tomlfile.load(path).get("allowed_regions"), str(path))


def allows(policy: Sequence[str], region: str) -> bool:
    return ANY_REGION in policy or region in policy
