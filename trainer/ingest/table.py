"""Rows as businesses have them → a RawTable (pure: no I/O).

Every source hands over columns (name → values) and this module turns them into the numeric
table the feature store keeps:

* **Types are checked**: a numeric feature takes numbers (a number in a string too, as a CSV
  or an API may send it); anything else fails with the column and the row named.
* **Missing values** (``None``, NaN, an empty string) are refused unless ``data.impute`` names
  a strategy for the column (or ``"*"`` for all): ``mean``, ``median``, ``most_frequent`` or
  ``zero``. The fill value is computed on the first snapshot of a chain and then kept, like a
  vocabulary, so a row means the same in every snapshot; it is recorded in the snapshot.
* **Categorical columns** (``data.categorical``) are encoded as codes with a vocabulary that
  is recorded in the snapshot and the bundle manifest: code ``k`` (1-based) is the k-th
  category of the vocabulary, code 0 is "missing or not seen in training". A later snapshot
  of the chain appends new categories (sorted) to the end, so earlier codes never change.
  The agent applies the vocabulary before the model, so serving takes the raw value
  (docs/serving.md); an unseen value becomes 0.
* A **timestamp** column (``data.timestamp``) orders rows (for ``window``) and is kept out of
  the features, as are the watermark column, the label and PII columns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, cast

import numpy as np

from fleetcore.errors import InvalidInputError
from trainer.sources import RawTable

__all__ = ["IMPUTE_STRATEGIES", "MAX_CATEGORIES", "Encoding", "TableSpec", "build_table",
           "columns_from_rows", "timestamp_seconds"]

IMPUTE_STRATEGIES = ("none", "mean", "median", "most_frequent", "zero")
MAX_CATEGORIES = 10_000  # per categorical column
MAX_CELL_CHARS = 4096  # a category, label or PII value
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class TableSpec:
    """What the pipeline's [data] section says about the table's columns."""

    task: str
    label: str
    pii: tuple[str, ...] = ()
    features: tuple[str, ...] | None = None  # None: every column not used otherwise
    categorical: tuple[str, ...] = ()
    timestamp: str | None = None
    exclude: tuple[str, ...] = ()  # e.g. the watermark column
    impute: Mapping[str, str] = field(default_factory=dict)  # column or "*" -> strategy

    def strategy(self, column: str) -> str:
        return self.impute.get(column, self.impute.get("*", "none"))


@dataclass(frozen=True)
class Encoding:
    """What a snapshot's numbers mean beyond themselves (JSON-ready via ``to_json``)."""

    categories: dict[str, list[str]] = field(default_factory=dict)  # column -> vocabulary
    fill: dict[str, float] = field(default_factory=dict)  # column -> imputed value

    def to_json(self) -> dict[str, Any]:
        return {"categories": {k: list(v) for k, v in self.categories.items()},
                "fill": dict(self.fill)}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any] | None) -> Encoding:
        doc = doc or {}
        return cls(categories={str(k): [str(x) for x in v]
                               for k, v in dict(doc.get("categories", {})).items()},
                   fill={str(k): float(v) for k, v in dict(doc.get("fill", {})).items()})

    def is_empty(self) -> bool:
        return not self.categories and not self.fill


def columns_from_rows(rows: Sequence[Mapping[str, Any]], *, where: str,
                      max_columns: int) -> dict[str, list[Any]]:
    """Row dicts (a JSON API's records, a stream's rows) → columns; a key missing from a row
    is a missing value there. Column names in order of first appearance."""
    names: dict[str, None] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise InvalidInputError(f"{where}: row {i + 1} is not an object of column values")
        for key in row:
            if key not in names:
                if not isinstance(key, str) or not key.strip() or len(key) > 256:
                    raise InvalidInputError(f"{where}: row {i + 1}: column name {str(key)[:40]!r}"
                                            " is not a non-empty name of at most 256 characters")
                names[key] = None
                if len(names) > max_columns:
                    raise InvalidInputError(f"{where}: more than {max_columns} columns; the "
                                            f"limit is {max_columns}")
    return {name: [row.get(name) for row in rows] for name in names}


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (
        isinstance(v, str) and not v.strip())


def _numeric(where: str, name: str, values: Sequence[Any] | np.ndarray, first_row: int,
             hint: str) -> np.ndarray:
    """float64 values with NaN where missing; the first bad cell named."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "fiub":
        out = values.astype(np.float64)
    else:
        try:
            out = np.array(values, dtype=np.float64)
        except (TypeError, ValueError):
            out = np.empty(len(values), dtype=np.float64)
            for i, v in enumerate(values):
                out[i] = _cell(where, name, v, first_row + i, hint)
        else:
            # np.array takes "" as an error, but "nan"/"inf" strings and bools as values: a
            # row-wise look only where a string or non-finite value could hide.
            if not np.isfinite(out[~np.isnan(out)]).all():
                for i, v in enumerate(values):
                    _cell(where, name, v, first_row + i, hint)
    bad = np.flatnonzero(np.abs(out) > _FLOAT32_MAX)  # Inf too; NaN (missing) compares False
    if bad.size:
        raise InvalidInputError(f"{where}: column {name!r}, row {first_row + int(bad[0])}: "
                                f"{values[int(bad[0])]!r} is not a finite float32")
    return out


def _cell(where: str, name: str, v: Any, row: int, hint: str) -> float:
    if _missing(v):
        return math.nan
    if isinstance(v, bool | int | float | Decimal | np.number):
        f = float(v)
    elif isinstance(v, str):
        try:
            f = float(v)
        except ValueError:
            raise InvalidInputError(f"{where}: column {name!r}, row {row}: expected a number, got "
                                    f"{v[:40]!r}{hint}") from None
    else:
        raise InvalidInputError(f"{where}: column {name!r}, row {row}: expected a number, got "
                                f"{type(v).__name__} {str(v)[:40]!r}{hint}")
    if not math.isfinite(f) or abs(f) > _FLOAT32_MAX:
        raise InvalidInputError(f"{where}: column {name!r}, row {row}: {str(v)[:40]!r} is not a "
                                "finite float32")
    return f


def _texts(where: str, name: str, values: Sequence[Any] | np.ndarray, first_row: int,
           *, missing_ok: bool) -> list[str | None]:
    """Each value as stripped text (None where missing, when ``missing_ok``); a column of
    strings takes the fast path, anything else is checked value by value."""
    if all(type(v) is str for v in values):
        texts: list[str | None] = [v.strip() or None for v in values]
        longest = max((len(t) for t in texts if t is not None), default=0)
        if longest > MAX_CELL_CHARS or any("\x00" in t for t in texts if t is not None):
            texts = [None if _missing(v) else _text(where, name, v, first_row + i)
                     for i, v in enumerate(values)]  # names the row at fault
    else:
        texts = [None if _missing(v) else _text(where, name, v, first_row + i)
                 for i, v in enumerate(values)]
    if not missing_ok and None in texts:
        raise InvalidInputError(f"{where}: column {name!r}, row {first_row + texts.index(None)}: "
                                "missing label")
    return texts


def _text(where: str, name: str, v: Any, row: int) -> str:
    if isinstance(v, str | int | Decimal | bool | np.integer) or (
            isinstance(v, float) and math.isfinite(v)):
        text = str(v) if not isinstance(v, float) or not v.is_integer() else str(int(v))
    else:
        raise InvalidInputError(f"{where}: column {name!r}, row {row}: expected a text or whole "
                                f"number value, got {type(v).__name__}")
    if len(text) > MAX_CELL_CHARS or "\x00" in text:
        raise InvalidInputError(f"{where}: column {name!r}, row {row}: value longer than "
                                f"{MAX_CELL_CHARS} characters or holding NUL")
    return text.strip()


def timestamp_seconds(where: str, name: str, values: Sequence[Any], first_row: int) -> np.ndarray:
    """Seconds since the epoch for datetimes, dates, ISO-8601 strings or numbers."""
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        if isinstance(v, datetime):  # a naive time is taken as UTC
            out[i] = (v if v.tzinfo else v.replace(tzinfo=UTC)).timestamp()
        elif isinstance(v, date):
            out[i] = datetime(v.year, v.month, v.day, tzinfo=UTC).timestamp()
        elif isinstance(v, str):
            try:
                out[i] = timestamp_seconds(where, name, [datetime.fromisoformat(v.strip())],
                                           first_row + i)[0]
            except ValueError:
                raise InvalidInputError(f"{where}: column {name!r}, row {first_row + i}: "
                                        f"{v[:40]!r} is not an ISO-8601 time") from None
        else:
            out[i] = _cell(where, name, v, first_row + i, "")
            if math.isnan(out[i]):
                raise InvalidInputError(f"{where}: column {name!r}, row {first_row + i}: "
                                        "missing timestamp")
    return out


def _fill_value(where: str, name: str, strategy: str, values: np.ndarray) -> float:
    seen = values[~np.isnan(values)]
    if strategy == "zero":
        return 0.0
    if not seen.size:
        raise InvalidInputError(f"{where}: column {name!r} has no values to compute its "
                                f"{strategy} from")
    if strategy == "mean":
        return float(seen.mean())
    if strategy == "median":
        return float(np.median(seen))
    uniq, counts = np.unique(seen, return_counts=True)  # most_frequent; ties: the smallest
    return float(uniq[int(np.argmax(counts))])


def build_table(columns: Mapping[str, Sequence[Any] | np.ndarray], spec: TableSpec, *,
                where: str, source: str, source_digest: str, prior: Encoding | None = None,
                prior_labels: Sequence[str] = (), first_row: int = 1,
                ) -> tuple[RawTable, Encoding, np.ndarray | None]:
    """Check and encode ``columns``; returns the table, its encoding (``prior`` extended) and
    the rows' timestamps in seconds (None without ``spec.timestamp``).

    ``prior`` and ``prior_labels``: the encoding and class names of the snapshot this one
    extends. Class ids index the sorted union of both, so the store can remap the parent's."""
    names = list(columns)
    n = len(columns[names[0]]) if names else 0
    if n == 0:
        raise InvalidInputError(f"{where}: no rows")
    used = [spec.label, *spec.pii, *spec.categorical, *(spec.features or ()),
            *([spec.timestamp] if spec.timestamp else []), *spec.exclude]
    missing_cols = sorted({c for c in used if c not in columns})
    if missing_cols:
        more = " ..." if len(names) > 20 else ""
        raise InvalidInputError(f"{where}: column(s) {missing_cols} named in [data] are not in "
                                f"the data (columns: {names[:20]}{more})")
    for name in [*spec.impute]:
        if name != "*" and name not in columns:
            raise InvalidInputError(f"{where}: data.impute names column {name!r}, which is not "
                                    "in the data")
    if spec.label in spec.pii:
        raise InvalidInputError(f"{where}: column {spec.label!r} cannot be both the label and PII")
    other = {spec.label, *spec.pii, *spec.exclude, *([spec.timestamp] if spec.timestamp else [])}
    features = list(spec.features) if spec.features else [c for c in names if c not in other]
    clash = sorted(set(features) & other)
    if clash:
        raise InvalidInputError(f"{where}: column(s) {clash} cannot be features: they are the "
                                "label, PII, the timestamp or the watermark")
    if not features:
        raise InvalidInputError(f"{where}: no feature columns besides the label, PII and time")
    prior = prior or Encoding()
    categories = {k: list(v) for k, v in prior.categories.items()}
    fill = dict(prior.fill)
    X = np.empty((n, len(features)), dtype=np.float32)
    categorical = set(spec.categorical)
    for j, name in enumerate(features):
        values = columns[name]
        if name in categorical:
            X[:, j] = _encode_categories(where, name, values, categories, first_row)
            continue
        hint = f" (list {name!r} in data.categorical if it holds categories)"
        col = _numeric(where, name, values, first_row, hint)
        holes = np.isnan(col)
        if holes.any():
            strategy = spec.strategy(name)
            if strategy == "none":
                row = first_row + int(np.flatnonzero(holes)[0])
                raise InvalidInputError(
                    f"{where}: column {name!r}, row {row}: missing value; set data.impute = "
                    f"{{{name} = \"mean\"}} (or median, most_frequent, zero; \"*\" for every "
                    "column) to fill it")
            if name not in fill:
                fill[name] = _fill_value(where, name, strategy, col)
            col[holes] = fill[name]
        X[:, j] = col
    y, labels, target = _labels(where, spec, columns[spec.label], prior_labels, first_row)
    pii = {name: np.array([t or "" for t in _texts(where, name, columns[name], first_row,
                                                   missing_ok=True)], dtype=str)
           for name in spec.pii}
    stamps = (timestamp_seconds(where, spec.timestamp, list(columns[spec.timestamp]), first_row)
              if spec.timestamp else None)
    encoding = Encoding(categories={k: v for k, v in categories.items() if k in categorical},
                        fill=fill)
    table = RawTable(feature_names=features, X=X, y=y, labels=labels, pii=pii, source=source,
                     source_digest=source_digest, image_shape=None, target=target,
                     encoding=None if encoding.is_empty() else encoding.to_json())
    return table, encoding, stamps


def _encode_categories(where: str, name: str, values: Sequence[Any] | np.ndarray,
                       categories: dict[str, list[str]], first_row: int) -> np.ndarray:
    texts = _texts(where, name, values, first_row, missing_ok=True)
    vocab = categories.setdefault(name, [])
    known = {c: k + 1 for k, c in enumerate(vocab)}
    new = sorted({t for t in texts if t is not None and t not in known})
    if len(vocab) + len(new) > MAX_CATEGORIES:
        raise InvalidInputError(f"{where}: column {name!r} has more than {MAX_CATEGORIES} "
                                "categories; is it really categorical?")
    for t in new:
        vocab.append(t)
        known[t] = len(vocab)
    return np.array([0 if t is None else known[t] for t in texts], dtype=np.float32)


def _labels(where: str, spec: TableSpec, values: Sequence[Any] | np.ndarray,
            prior_labels: Sequence[str], first_row: int
            ) -> tuple[np.ndarray, list[str], str | None]:
    if spec.task == "regression":
        y = _numeric(where, spec.label, values, first_row, "")
        holes = np.flatnonzero(np.isnan(y))
        if holes.size:
            raise InvalidInputError(f"{where}: column {spec.label!r}, row "
                                    f"{first_row + int(holes[0])}: missing label")
        return y, [], spec.label
    texts = cast(list[str], _texts(where, spec.label, values, first_row, missing_ok=False))
    labels = sorted(set(prior_labels) | set(texts))
    class_of = {name: k for k, name in enumerate(labels)}
    return np.fromiter((class_of[t] for t in texts), dtype=np.int64, count=len(texts)), labels, None
