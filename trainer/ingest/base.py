"""What every batch reader hands back, and the small rules they share (pure)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import numpy as np

from fleetcore.errors import InvalidInputError

__all__ = ["Batch", "Budget", "decode_mark", "digest_of", "encode_mark", "greater"]


@dataclass
class Batch:
    """New rows from one read of a source, and how far the source has now been read."""

    columns: Mapping[str, Sequence[Any] | np.ndarray]
    rows: int
    cursor: dict[str, Any]  # recorded with the snapshot; the next read starts after it
    lineage: dict[str, Any] = field(default_factory=dict)  # query digest, range, counts
    digest: str = ""  # "sha256:..." of what was read (the snapshot's source_digest)


def digest_of(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


class Budget:
    """Rows and bytes taken from one source in one read, against its limits."""

    def __init__(self, where: str, *, max_rows: int, max_bytes: int) -> None:
        self.where, self.max_rows, self.max_bytes = where, max_rows, max_bytes
        self.rows = 0
        self.bytes = 0

    def take(self, rows: int, nbytes: int) -> None:
        self.rows += rows
        self.bytes += nbytes
        if self.rows > self.max_rows:
            raise InvalidInputError(f"{self.where}: more than {self.max_rows} rows; the limit "
                                    "is data.max_rows (or add a watermark to read in steps)")
        if self.bytes > self.max_bytes:
            raise InvalidInputError(f"{self.where}: more than {self.max_bytes} bytes; the "
                                    "limit is data.max_bytes")


def encode_mark(value: Any) -> Any:
    """A watermark value as JSON (tagged where JSON has no such type)."""
    if isinstance(value, datetime):
        return {"datetime": value.isoformat()}
    if isinstance(value, date):
        return {"date": value.isoformat()}
    if isinstance(value, Decimal):
        return {"decimal": str(value)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidInputError(f"a watermark of type {type(value).__name__} is not supported; "
                                "use a number, text or time column")
    return value


def decode_mark(doc: Any) -> Any:
    if isinstance(doc, dict):
        if "datetime" in doc:
            return datetime.fromisoformat(doc["datetime"])
        if "date" in doc:
            return date.fromisoformat(doc["date"])
        if "decimal" in doc:
            return Decimal(doc["decimal"])
    return doc


def greater(a: Any, b: Any) -> bool:
    """a > b for watermark values that may have come back from JSON differently typed."""
    if isinstance(a, str) and isinstance(b, datetime | date):
        a = type(b).fromisoformat(a)
    if isinstance(b, str) and isinstance(a, datetime | date):
        b = type(a).fromisoformat(b)
    try:
        return bool(a > b)
    except TypeError:
        raise InvalidInputError(f"watermark values {a!r} and {b!r} cannot be compared; is the "
                                "watermark column of one type?") from None
