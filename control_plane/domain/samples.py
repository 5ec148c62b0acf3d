"""Vetting a labelled sample a device sent, pure: does it fit the version that served it?

The manifest of that version says how many features a row has, how many classes there are (or
that the model is a regression model: its labels are finite numbers, not class ids) and
which PII columns the device must pseudonymize (HMAC-SHA256, hex). The store's region policy
says which regions' data may be kept. A refused sample is counted, never stored.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from control_plane.domain.records import SampleRecord
from fleetcore import regions
from fleetcore.bundle import manifest_task
from fleetcore.errors import InvalidInputError

__all__ = ["against_manifest", "region_refusal"]

_HMAC_HEX = re.compile(r"^([0-9a-f]{64})?$")  # "": the request did not carry the column


def against_manifest(row: SampleRecord, manifest: dict[str, Any]) -> str:
    """Why the sample does not fit the version that served it ("" when it does)."""
    width = len(manifest["input"]["features"])
    hashed = {c.get("name") for c in manifest["input"].get("pii_columns", [])
              if c.get("action") == "hmac"}
    if any(len(r) != width for r in row.features):
        return f"rows must have {width} features"
    if manifest_task(manifest) == "regression":
        # telemetry parsing let only finite numbers of bounded size through
        if any(isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
               for v in row.labels):
            return "labels must be finite numbers (a regression model)"
    else:
        classes = len(manifest["output"]["labels"])
        if any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < classes
               for v in row.labels):
            return f"labels must be class ids below {classes}"
    for name, values in row.pii.items():
        # (the column's name is the device's text: it stays out of the reason)
        if name not in hashed:
            return "a column that is not a pseudonymized PII column of the manifest"
        if not all(_HMAC_HEX.match(v) for v in values):
            return "PII values that are not HMAC-SHA256 pseudonyms"
    return ""


def region_refusal(region: str, allowed: Sequence[str]) -> str:
    """Why the store's policy refuses data from the device's region ("" when it allows it).

    A device without a region label (its enrollment token granted none) or with one that is no
    region name is refused whatever the policy: even ``"*"`` allows only data that says where
    it comes from (such samples once broke every later retraining job)."""
    if not region:
        return "the device has no region label (its enrollment token granted none)"
    try:
        regions.check_region(region, "the device's region label")
    except InvalidInputError:
        return "the device's region label is not a region name"
    if regions.allows(allowed, region):
        return ""
    return (f"region {region!r} is not allowed by "
            f"the store's policy ({', '.join(allowed) or 'none'})")
