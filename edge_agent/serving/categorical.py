"""Raw values for models with categorical inputs: the agent encodes them before the model.

A bundle whose manifest lists ``categories`` for an input feature (the trainer's vocabulary,
``trainer/ingest/table.py``) takes that feature as a code: ``k`` for the k-th category of the
vocabulary, ``0`` for a missing value or one not seen in training. Clients need not know the
codes: an infer request may send the raw row instead, as a ``BYTES`` tensor of the same
``[n, features]`` shape (over HTTP JSON its ``data`` holds strings and numbers; over gRPC
``bytes_contents`` holds UTF-8 text), and the agent encodes it here. An FP32 request with the
codes is still accepted.

Versions of one model may carry vocabularies of different lengths: a newer snapshot of the same
chain appends categories, so the older is a prefix of the newer (checked when the model is
set). The request is encoded with the longest one, and an arm whose vocabulary is shorter sees
a code it never learned as 0 (``clamp``), exactly as if it had encoded the value itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edge_agent.serving.errors import BadRequestError
from fleetcore.errors import InvalidInputError

__all__ = ["Categories", "ClampedRuntime", "clamp", "encode", "from_manifests"]

MAX_VALUE_CHARS = 4096

# per feature: the vocabulary (value -> code) or None for a numeric feature
Categories = tuple[Mapping[str, int] | None, ...]


def _vocabularies(manifest: Mapping[str, Any]) -> list[list[str] | None]:
    out: list[list[str] | None] = []
    for feature in manifest.get("input", {}).get("features", []):
        cats = feature.get("categories") if isinstance(feature, dict) else None
        if cats is not None and (not isinstance(cats, list)
                                 or not all(isinstance(c, str) for c in cats)):
            raise InvalidInputError("manifest input.features[].categories must be a list of "
                                    "strings")
        out.append(cats)
    return out


def from_manifests(name: str, manifests: Mapping[int, Mapping[str, Any]]
                   ) -> tuple[Categories | None, dict[int, dict[int, int]]]:
    """The model's categories (None when no feature is categorical) and, per version, the
    features whose vocabulary is shorter than the model's: {feature index: its length}."""
    per_version = {v: _vocabularies(m) for v, m in manifests.items()}
    if not any(c is not None for vocabs in per_version.values() for c in vocabs):
        return None, {}
    widths = {len(v) for v in per_version.values()}
    if len(widths) != 1:
        raise InvalidInputError(f"{name}: the versions' manifests list different features")
    longest: list[list[str] | None] = [None] * widths.pop()
    for vocabs in per_version.values():
        for j, vocab in enumerate(vocabs):
            if vocab is not None and (longest[j] is None or len(vocab) > len(longest[j] or [])):
                longest[j] = vocab
    clamps: dict[int, dict[int, int]] = {}
    for v, vocabs in per_version.items():
        for j, vocab in enumerate(vocabs):
            best = longest[j]
            if (vocab is None) != (best is None):
                raise InvalidInputError(f"{name}: feature {j} is categorical in some versions "
                                        "only")
            if vocab is not None and best is not None:
                if best[:len(vocab)] != vocab:
                    raise InvalidInputError(
                        f"{name}: v{v}'s categories of feature {j} are not a prefix of the "
                        "newest version's; versions of one model must come from one chain of "
                        "snapshots")
                if len(vocab) < len(best):
                    clamps.setdefault(v, {})[j] = len(vocab)
    categories = tuple(None if vocab is None else {c: k + 1 for k, c in enumerate(vocab)}
                       for vocab in longest)
    return categories, clamps


def clamp(x: np.ndarray, lengths: Mapping[int, int]) -> np.ndarray:
    """Codes past an arm's vocabulary become 0 (unseen), on a copy."""
    out = x.copy()
    for j, length in lengths.items():
        column = out[:, j]
        column[column > length] = 0.0
    return out


def encode(values: Sequence[Any], rows: int, categories: Categories) -> np.ndarray:
    """Row-major raw values (``rows`` x features) → float32 codes and numbers."""
    features = len(categories)
    if len(values) != rows * features:
        raise BadRequestError(f"expected {rows * features} values; got {len(values)}")
    out = np.empty((rows, features), dtype=np.float32)
    for i in range(rows):
        for j, vocab in enumerate(categories):
            v = values[i * features + j]
            out[i, j] = _code(v, vocab, i, j) if vocab is not None else _number(v, i, j)
    return out


def _code(v: Any, vocab: Mapping[str, int], i: int, j: int) -> float:
    if v is None:
        return 0.0
    if isinstance(v, bytes):
        try:
            v = v.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequestError(f"row {i}, feature {j}: not UTF-8 text") from None
    if isinstance(v, bool) or not isinstance(v, str | int | float):
        raise BadRequestError(f"row {i}, feature {j}: expected a category, got "
                              f"{type(v).__name__}")
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    text = str(v).strip()
    if len(text) > MAX_VALUE_CHARS:
        raise BadRequestError(f"row {i}, feature {j}: a category of more than "
                              f"{MAX_VALUE_CHARS} characters")
    return float(vocab.get(text, 0))


def _number(v: Any, i: int, j: int) -> float:
    if isinstance(v, bytes):
        try:
            v = v.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequestError(f"row {i}, feature {j}: not UTF-8 text") from None
    try:
        if isinstance(v, bool):
            raise ValueError
        f = float(v)
    except (TypeError, ValueError):
        raise BadRequestError(f"row {i}, feature {j}: expected a number, got "
                              f"{str(v)[:40]!r}") from None
    if not math.isfinite(f):
        raise BadRequestError(f"row {i}, feature {j}: expected a finite number")
    return f


class ClampedRuntime:
    """An arm whose vocabularies are shorter than its model's: codes it never learned are 0."""

    def __init__(self, inner: Any, lengths: Mapping[int, int]) -> None:
        self.inner = inner
        self.lengths = dict(lengths)
        self.kind = inner.kind
        self.version = inner.version
        self.features = inner.features
        self.classes = inner.classes
        self.row_latency_s = inner.row_latency_s

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.inner.predict(clamp(x, self.lengths)))

    def __getattr__(self, name: str) -> Any:  # anything else a runtime offers
        return getattr(self.inner, name)
