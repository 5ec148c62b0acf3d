"""Drift of live traffic against a bundle's ``profile.json``, per window, in bounded memory.

Rules (docs/design.md §5; time is passed in, nothing here reads a clock):

* A window opens with the first row after the previous one closed. It closes after
  ``window_requests`` rows, or at the first ``observe``/``flush`` call at least
  ``window_seconds`` after it opened, whichever comes first; ``end`` is that call's ``now``.
  A window with fewer than ``min_rows`` rows is dropped unscored (``skipped_windows`` counts
  them); ``flush`` closes the current window early only if it has ``min_rows`` rows.
* Feature PSI: the window's counts in the profile's bins (``searchsorted(edges, v, "right")``,
  the semantics of ``trainer.profile``), PSI = sum((q - p) * ln(q / p)) with both distributions
  smoothed by ``EPSILON`` so that empty bins stay finite. NaN inputs count in the last bin, as
  ``searchsorted`` puts them.
* KS: two-sample Kolmogorov-Smirnov statistic per feature between the window's reservoir
  (uniform, seeded, algorithm R) and the profile's reference sample, with the asymptotic
  p-value (Kolmogorov distribution, Stephens' small-sample correction). Values are compared at
  float32 precision, the precision of model inputs. A feature constant and equal in both samples
  has D = 0, p = 1: not drifted.
* Prediction PSI: the predicted-class counts against ``prediction.proportions``, plus one bucket
  for class ids outside the profile's labels (reference share 0, so they read as drift). For a
  regression model the profile's ``prediction`` has ``"kind": "value"`` and quantile ``edges``
  of the predicted value on the training split: each predicted value counts in its bin
  (``searchsorted(edges, v, "right")``, as for features) and NaN in the outside bucket.
* A feature drifted when its PSI > ``psi_threshold`` or its KS p < ``ks_alpha``. The window is
  flagged when more than ``feature_fraction`` of the features drifted, or the prediction PSI is
  over ``prediction_psi_threshold``. ``score`` = max(mean feature PSI, prediction PSI): one
  number on the PSI scale that rises with either kind of shift.
* PSI has a small-sample floor of about (bins - 1) / rows with no drift at all: with 10 bins,
  windows much under 200 rows drift past 0.2 by chance (a 50-row tail window of held-out digits
  does). Keep ``min_rows`` near ``window_requests`` where false alarms cost.

Memory is fixed when the monitor is built: per window the bin counts (features x edges ints),
the prediction counts and the reservoir (``reservoir_size`` x features float32), plus a
staging buffer of ``STAGE_ROWS`` rows and scratch for the KS merge. Nothing grows with the rows
observed. Small batches (single requests) are staged and folded in ``STAGE_ROWS`` at a time, so
their per-row cost is close to a batch's (``bench_update_cost`` in
``scripts/bench_agent_serving.py`` measures both).

The profile is untrusted input (it arrives inside a bundle): ``parse_profile`` and the monitor
check it and raise ``InvalidInputError``. Arrays of the wrong shape passed to ``observe`` are a
caller bug and raise ``ValueError``.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np

from fleetcore import strict_json
from fleetcore.errors import InvalidInputError

__all__ = [
    "EPSILON",
    "MAX_CLASSES",
    "MAX_EDGES",
    "MAX_FEATURES",
    "MAX_SAMPLE_CELLS",
    "MAX_SAMPLE_ROWS",
    "PROFILE_FORMAT",
    "STAGE_ROWS",
    "DriftConfig",
    "DriftMonitor",
    "DriftWindow",
    "kolmogorov_sf",
    "parse_profile",
]

log = logging.getLogger(__name__)

PROFILE_FORMAT = "edgefleet.profile/v1"  # trainer.profile.PROFILE_FORMAT; the agent has no trainer
EPSILON = 1e-4  # PSI smoothing added to every bin share
STAGE_ROWS = 128  # small batches are staged and folded in this many rows at a time

MAX_FEATURES = 1024  # also what the control plane accepts in drifted_features
MAX_EDGES = 255  # per feature (256 bins)
MAX_SAMPLE_ROWS = 10_000
MAX_SAMPLE_CELLS = 1_000_000  # reference rows x features: bounds the KS scratch
MAX_CLASSES = 10_000
MAX_NAME_CHARS = 128
_SUM_TOLERANCE = 1e-6  # proportions must sum to 1 within this
_CHUNK_CELLS = 1 << 17  # rows x edges x features compared per step: bounds the temporaries

_F32 = np.dtype(np.float32)
_I64 = np.dtype(np.int64)
_SIGN = np.uint32(0x80000000)
_LOW, _HIGH = (0, 1) if sys.byteorder == "little" else (1, 0)  # uint32 halves of a uint64
_PAD_KEY = np.uint64(0xFFFFFFFF << 32)  # above every key (NaN is mapped to inf first)


@dataclass(frozen=True)
class DriftConfig:
    window_requests: int = 500  # a window closes after this many rows ...
    window_seconds: float = 300.0  # ... or this long after it opened, whichever first
    min_rows: int = 50  # a window with fewer rows is not scored
    psi_threshold: float = 0.2  # per-feature PSI above this counts as drifted
    ks_alpha: float = 0.01  # KS p-value below this counts as drifted
    prediction_psi_threshold: float = 0.2
    feature_fraction: float = 0.1  # flagged when more than this fraction of features drifted
    reservoir_size: int = 256  # rows kept per window for the KS test

    def __post_init__(self) -> None:
        checks = (
            (self.window_requests >= 1, "window_requests must be >= 1"),
            (self.window_seconds > 0, "window_seconds must be > 0"),
            (1 <= self.min_rows <= self.window_requests, "min_rows must be 1..window_requests"),
            (self.psi_threshold > 0, "psi_threshold must be > 0"),
            (0 < self.ks_alpha < 1, "ks_alpha must be in (0, 1)"),
            (self.prediction_psi_threshold > 0, "prediction_psi_threshold must be > 0"),
            (0 <= self.feature_fraction < 1, "feature_fraction must be in [0, 1)"),
            (2 <= self.reservoir_size <= 65_536, "reservoir_size must be 2..65536"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"DriftConfig: {message}")


@dataclass(frozen=True)
class DriftWindow:
    model: str
    version: int
    start: float  # the `now` of the window's first rows
    end: float  # the `now` of the call that closed it
    rows: int
    feature_psi: dict[str, float]
    feature_ks_p: dict[str, float]  # KS p-value against the profile's reference sample
    prediction_psi: float
    drifted_features: list[str]
    score: float  # max(mean feature PSI, prediction PSI)
    drifted: bool

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types: the ``drift`` telemetry payload."""
        return asdict(self)


# --- the profile: untrusted input ------------------------------------------------------------


class _Reference(NamedTuple):
    names: list[str]
    edges: list[np.ndarray]  # per feature, float64, strictly increasing
    proportions: list[np.ndarray]  # per feature, len(edges) + 1
    sample: np.ndarray  # [rows, features] float32
    prediction: np.ndarray  # [classes] float64 (the value bins' shares for kind "value")
    prediction_edges: np.ndarray | None  # kind "value": the bins' edges; None for classes


def _field(doc: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidInputError(
            f"profile: {where}{key} must be a {kind.__name__}; got {type(value).__name__}"
        )
    return value


def _numbers(values: Any, where: str, *, limit: int) -> np.ndarray:
    if not isinstance(values, list):
        raise InvalidInputError(f"profile: {where} must be a list; got {type(values).__name__}")
    if len(values) > limit:
        raise InvalidInputError(f"profile: {where} has {len(values)} entries; the limit is {limit}")
    if not all(type(v) is float or type(v) is int for v in values):
        raise InvalidInputError(f"profile: {where} must hold only numbers")
    out = np.array(values, dtype=np.float64)
    if not np.isfinite(out).all():
        raise InvalidInputError(f"profile: {where} must hold finite numbers")
    return out


def _shares(values: Any, where: str, *, length: int) -> np.ndarray:
    out = _numbers(values, where, limit=length)
    if len(out) != length:
        raise InvalidInputError(f"profile: {where} has {len(out)} entries; expected {length}")
    if (out < 0).any():
        raise InvalidInputError(f"profile: {where} has a negative share")
    if abs(out.sum() - 1.0) > _SUM_TOLERANCE:
        raise InvalidInputError(f"profile: {where} sums to {out.sum():.9g}; expected 1")
    return out


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_CHARS:
        raise InvalidInputError(f"profile: {where} must be a string of 1..{MAX_NAME_CHARS} chars")
    return value


def _feature(doc: Any, j: int) -> tuple[str, np.ndarray, np.ndarray]:
    where = f"features[{j}]."
    if not isinstance(doc, dict):
        raise InvalidInputError(f"profile: features[{j}] must be an object")
    name = _name(doc.get("name"), f"{where}name")
    edges = _numbers(doc.get("edges"), f"{where}edges", limit=MAX_EDGES)
    if (np.diff(edges) <= 0).any():
        raise InvalidInputError(f"profile: {where}edges must be strictly increasing")
    return name, edges, _shares(doc.get("proportions"), f"{where}proportions",
                                length=len(edges) + 1)


def _check_profile(doc: Any) -> _Reference:
    if not isinstance(doc, dict):
        raise InvalidInputError("profile: must be a JSON object")
    if doc.get("format") != PROFILE_FORMAT:
        raise InvalidInputError(
            f"profile: format must be {PROFILE_FORMAT!r}; got {doc.get('format')!r}"
        )
    features = _field(doc, "features", list, "")
    if not 1 <= len(features) <= MAX_FEATURES:
        raise InvalidInputError(
            f"profile: has {len(features)} features; expected 1..{MAX_FEATURES}"
        )
    names, edges, proportions = [], [], []
    for j, f in enumerate(features):
        name, e, p = _feature(f, j)
        names.append(name)
        edges.append(e)
        proportions.append(p)
    if len(set(names)) != len(names):
        raise InvalidInputError("profile: feature names must be unique")
    rows = _field(_field(doc, "reference_sample", dict, ""), "rows", list, "reference_sample.")
    width = len(names)
    if not 1 <= len(rows) <= min(MAX_SAMPLE_ROWS, MAX_SAMPLE_CELLS // width):
        raise InvalidInputError(
            f"profile: reference_sample has {len(rows)} rows of {width} features; expected 1.."
            f"{min(MAX_SAMPLE_ROWS, MAX_SAMPLE_CELLS // width)}"
        )
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != width:
            got = len(row) if isinstance(row, list) else type(row).__name__
            raise InvalidInputError(
                f"profile: reference_sample.rows[{i}] must be a list of {width} numbers; got {got}"
            )
    sample = _numbers([v for row in rows for v in row], "reference_sample.rows",
                      limit=MAX_SAMPLE_CELLS).reshape(len(rows), width)
    with np.errstate(over="ignore"):  # beyond float32: +-inf, still ordered
        sample32 = sample.astype(np.float32)
    shares, value_edges = _prediction(_field(doc, "prediction", dict, ""))
    return _Reference(names, edges, proportions, sample32, shares, value_edges)


def _prediction(prediction: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """The reference shares of the predictions, and the value bins' edges (kind "value")."""
    kind = prediction.get("kind", "classes")
    if kind == "value":
        value_edges = _numbers(prediction.get("edges"), "prediction.edges", limit=MAX_EDGES)
        if (np.diff(value_edges) <= 0).any():
            raise InvalidInputError("profile: prediction.edges must be strictly increasing")
        return _shares(prediction.get("proportions"), "prediction.proportions",
                       length=len(value_edges) + 1), value_edges
    if kind != "classes":
        raise InvalidInputError(f"profile: prediction.kind must be 'classes' or 'value'; got "
                                f"{str(kind)[:MAX_NAME_CHARS]!r}")
    labels = _field(prediction, "labels", list, "prediction.")
    if not 1 <= len(labels) <= MAX_CLASSES:
        raise InvalidInputError(
            f"profile: prediction.labels has {len(labels)} entries; expected 1..{MAX_CLASSES}"
        )
    for i, label in enumerate(labels):
        _name(label, f"prediction.labels[{i}]")
    return _shares(prediction.get("proportions"), "prediction.proportions",
                   length=len(labels)), None


def parse_profile(data: bytes, *, max_bytes: int = 16 * 1024 * 1024) -> dict[str, Any]:
    """The checked ``profile.json`` of a bundle; ``InvalidInputError`` says what is wrong."""
    doc = strict_json.loads(data, what="profile", max_bytes=max_bytes)
    _check_profile(doc)
    return doc


# --- two-sample KS ---------------------------------------------------------------------------


# Kolmogorov distribution: for x >= 1, Q(x) = 2 sum (-1)^(k-1) exp(-2 k^2 x^2); for x < 1,
# 1 - Q(x) = sqrt(2 pi) / x * sum exp(-(2k-1)^2 pi^2 / (8 x^2)). Four terms of either series
# reach double precision in its range; one exp and one matmul evaluate both.
_K = np.arange(1, 5, dtype=np.float64)
_KS_SQUARED = np.concatenate([-2 * _K ** 2, np.zeros(4)])[:, None]
_KS_INVERSE = np.concatenate([np.zeros(4), -((2 * _K - 1) ** 2) * math.pi ** 2 / 8])[:, None]
_KS_WEIGHTS = np.array([[2.0, -2.0, 2.0, -2.0, 0, 0, 0, 0], [0, 0, 0, 0, 1.0, 1.0, 1.0, 1.0]])


def kolmogorov_sf(x: np.ndarray) -> np.ndarray:
    """P(K > x) for the Kolmogorov distribution (``scipy.special.kolmogorov``, numpy only: the
    agent does not depend on scipy)."""
    x = np.maximum(np.asarray(x, dtype=np.float64), 1e-3)  # below ~0.2, 1 - Q(x) underflows
    squared = x * x
    large, small = _KS_WEIGHTS @ np.exp(_KS_SQUARED * squared + _KS_INVERSE / squared)
    out = np.where(x < 1.0, 1.0 - math.sqrt(2 * math.pi) / x * small, large)
    return np.clip(out, 0.0, 1.0)


def _sortable(values: np.ndarray) -> np.ndarray:
    """float32 -> uint32 keys in the same order, C-ordered (-0.0 == 0.0; callers map NaN to inf).

    Negative floats have every bit flipped, others only the sign bit.
    """
    signed = np.add(values, np.float32(0), order="C").view(np.int32)
    flip = signed >> 31
    flip &= 0x7FFFFFFF
    flip ^= signed
    keys = flip.view(np.uint32)
    keys ^= _SIGN
    return keys


class _TwoSampleKs:
    """KS statistic of each feature, reservoir vs the fixed reference sample, all at once.

    Each value becomes one uint64 key: its sortable float32 bits above, a step below: the
    reference is kept as distinct values with counts (step + n * count), each reservoir value
    steps - m; steps are offset by m * n to stay unsigned, and padding (step 0) sorts last. One
    stable sort merges the two sorted runs; the cumulative sum of the steps is then m * n times
    the difference of the two ECDFs, read only where the value changes (ties).
    """

    def __init__(self, sample: np.ndarray, reservoir_size: int) -> None:
        self.m = len(sample)
        columns = [np.unique(_sortable(sample[:, j]), return_counts=True)
                   for j in range(sample.shape[1])]
        self._u = max(len(values) for values, _ in columns)
        self._values = np.full((len(columns), self._u), _PAD_KEY, np.uint64)
        self._counts = np.zeros((len(columns), self._u), np.uint64)
        for j, (values, counts) in enumerate(columns):
            self._values[j, : len(values)] = values.astype(np.uint64) << np.uint64(32)
            self._counts[j, : len(values)] = counts
        self._reference = np.empty_like(self._values)  # keys with steps for _reference_n rows
        self._reference_n = 0
        self._merged = np.empty((len(columns), self._u + reservoir_size), np.uint64)
        self._steps = np.empty((len(columns), self._u + reservoir_size), np.int64)

    @property
    def nbytes(self) -> int:
        arrays = (self._values, self._counts, self._reference, self._merged, self._steps)
        return sum(a.nbytes for a in arrays)

    def pvalues(self, reservoir: np.ndarray) -> np.ndarray:
        """Asymptotic KS p-value per feature; ``reservoir`` is [rows, features] float32."""
        n, m, u = len(reservoir), self.m, self._u
        offset = m * n
        if self._reference_n != n:
            self._reference[...] = self._values | (self._counts * np.uint64(n) + np.uint64(offset))
            self._reference_n = n
        keys = _sortable(reservoir.T)
        keys.sort(axis=1)
        ends = np.empty(keys.shape, np.bool_)  # where a run of equal values ends
        np.not_equal(keys[:, 1:], keys[:, :-1], out=ends[:, :-1])
        ends[:, -1] = True
        at = np.flatnonzero(ends)
        if 2 * len(at) <= keys.size:  # many ties: merge distinct values with their counts
            first = np.searchsorted(at, np.arange(len(keys) + 1) * n)  # each row's first run
            runs = np.diff(first)
            row = np.repeat(np.arange(len(keys)), runs)
            rank = np.arange(len(at)) - np.repeat(first[:-1], runs)
            merged = self._merged[:, : u + int(runs.max())]
            merged[:, u:] = _PAD_KEY | np.uint64(offset)
            counts = np.empty_like(at)  # run lengths
            counts[0] = at[0] + 1
            np.subtract(at[1:], at[:-1], out=counts[1:])
            merged[row, u + rank] = ((keys.ravel()[at].astype(np.uint64) << np.uint64(32))
                                     | (offset - m * counts).astype(np.uint64))
        else:
            merged = self._merged[:, : u + n]
            halves = merged.view(np.uint32)
            halves[:, 2 * u + _HIGH::2] = keys
            halves[:, 2 * u + _LOW::2] = offset - m
        merged[:, :u] = self._reference
        merged.sort(axis=1, kind="stable")
        halves = merged.view(np.uint32)
        steps = self._steps[:, : merged.shape[1]]
        np.subtract(halves[:, _LOW::2], np.int64(offset), out=steps)
        np.cumsum(steps, axis=1, out=steps)
        np.abs(steps[:, :-1], out=steps[:, :-1])
        steps[:, :-1] *= halves[:, 2 + _HIGH::2] != halves[:, _HIGH:-2:2]  # where a value ends
        d = steps[:, :-1].max(axis=1, initial=0) / offset
        en = m * n / (m + n)
        return kolmogorov_sf((math.sqrt(en) + 0.12 + 0.11 / math.sqrt(en)) * d)


# --- the monitor -----------------------------------------------------------------------------


def _class_ids(predicted: np.ndarray) -> np.ndarray:
    if predicted.dtype.kind not in "iu":
        raise ValueError(f"observe: predicted must hold integer class ids; got {predicted.dtype}")
    if predicted.dtype.kind == "u":  # ids past int64 are outside the labels either way
        predicted = np.minimum(predicted, np.iinfo(np.int64).max)
    return predicted.astype(np.int64)


class DriftMonitor:
    """Drift windows of one model version; feed it the rows it served and their predictions.

    Not thread-safe: call it from one thread (the serving loop) or under a lock.
    """

    def __init__(self, model: str, version: int, profile: dict[str, Any],
                 config: DriftConfig = DriftConfig(), *, seed: int = 0) -> None:
        ref = _check_profile(profile)
        self.model, self.version, self.config = model, version, config
        self.skipped_windows = 0  # closed with fewer than min_rows rows, not scored
        self._names = ref.names
        n_features = self._features = len(ref.names)
        self._window_requests = config.window_requests
        self._window_seconds = config.window_seconds
        n_edges = max(1, *(len(e) for e in ref.edges))
        # Edges rounded up to float32: for a float32 v, v >= e exactly when v >= ceil32(e).
        # Missing edges are NaN: never >= (a feature's count of v >= edge is then 0).
        self._edges = np.full((n_edges, n_features), np.nan, np.float32)
        shares = np.zeros((n_edges + 1, n_features))
        for j, (e, p) in enumerate(zip(ref.edges, ref.proportions, strict=True)):
            with np.errstate(over="ignore"):
                e32 = e.astype(np.float32)
            self._edges[: len(e), j] = np.where(e32 < e, np.nextafter(e32, np.float32(np.inf)), e32)
            shares[: len(p), j] = p
        # Smoothed reference shares; padded bins get the same share in the window: they cancel.
        self._norm = 1.0 + EPSILON * np.array([len(e) + 1 for e in ref.edges])
        self._shares = (shares + EPSILON) / self._norm
        self._log_shares = np.log(self._shares)
        self._classes = len(ref.prediction)
        self._value_edges = ref.prediction_edges
        class_norm = 1.0 + EPSILON * (self._classes + 1)  # + ids outside the labels (share 0)
        self._class_shares = (np.append(ref.prediction, 0.0) + EPSILON) / class_norm
        self._log_class_shares = np.log(self._class_shares)
        self._ks = _TwoSampleKs(ref.sample, config.reservoir_size)
        self._chunk = max(1, min(_CHUNK_CELLS // (n_edges * n_features), 65_535))
        self._cmp = np.empty((min(self._chunk, max(STAGE_ROWS, config.window_requests)),
                              n_edges, n_features), np.bool_)
        self._rng = np.random.default_rng(seed)
        # The window: counts of v >= edge per (edge, feature), prediction counts, reservoir.
        self._at_least = np.zeros((n_edges, n_features), np.int64)
        self._predicted = np.zeros(self._classes + 1, np.int64)  # the last: outside the labels
        self._reservoir = np.empty((config.reservoir_size, n_features), np.float32)
        self._rows = 0  # rows in the window, staged ones included
        self._folded = 0  # rows folded into the counts and the reservoir
        self._start: float | None = None
        # Small batches are staged as bytes (cheaper per call than numpy slice assignment).
        self._staged = 0
        self._stage_rows: list[bytes] = []
        self._stage_pred: list[bytes] = []

    @property
    def memory_bytes(self) -> int:
        arrays = (self._edges, self._norm, self._shares, self._log_shares, self._class_shares,
                  self._log_class_shares, self._cmp, self._at_least, self._predicted,
                  self._reservoir)
        staged = STAGE_ROWS * (self._features * 4 + 8)
        return sum(a.nbytes for a in arrays) + self._ks.nbytes + staged

    def observe(self, rows: np.ndarray, predicted: np.ndarray, now: float) -> list[DriftWindow]:
        """Count rows (float32 [n, features], raw inputs) and predicted class ids ([n] ints).

        Returns the windows that closed: none, or several when a big batch spans them.
        """
        if rows.dtype is not _F32:
            rows = np.asarray(rows, dtype=np.float32)
        if self._value_edges is not None:
            predicted = self._value_bins(predicted)
        elif predicted.dtype is not _I64:
            predicted = _class_ids(predicted)
        if rows.ndim != 2 or rows.shape[1] != self._features or predicted.shape != rows.shape[:1]:
            raise ValueError(f"observe: expected rows [n, {self._features}] and predicted [n]; "
                             f"got {rows.shape} and {predicted.shape}")
        n = len(rows)
        closed: list[DriftWindow] = []
        start = self._start
        if start is not None:
            if now - start >= self._window_seconds:
                self._close(now, closed)
            elif (staged := self._staged + n) <= STAGE_ROWS and (
                    self._rows + n < self._window_requests):
                # The hot path: one request at a time, staged as bytes (cheaper than slicing).
                self._stage_rows.append(rows.tobytes())
                self._stage_pred.append(predicted.tobytes())
                self._rows += n
                self._staged = staged
                if staged == STAGE_ROWS:
                    self._fold_stage()
                return closed
        done = 0
        while done < n:
            if self._start is None:
                self._start = now
            take = min(n - done, self._window_requests - self._rows)
            self._fold_stage()
            self._fold(rows[done:done + take], predicted[done:done + take])
            self._rows += take
            done += take
            if self._rows >= self._window_requests:
                self._close(now, closed)
        return closed

    def _value_bins(self, predicted: np.ndarray) -> np.ndarray:
        """A regression model's predicted values -> their bin ids (NaN: the outside bucket)."""
        assert self._value_edges is not None
        if predicted.dtype.kind not in "fiu":
            raise ValueError(f"observe: predicted must hold values; got {predicted.dtype}")
        values = predicted.astype(np.float64)
        ids = np.searchsorted(self._value_edges, values, side="right").astype(np.int64)
        ids[np.isnan(values)] = self._classes
        return ids

    def flush(self, now: float) -> DriftWindow | None:
        """Close the current window early if it has ``min_rows`` rows; else keep it open."""
        if self._rows < self.config.min_rows:
            return None
        closed: list[DriftWindow] = []
        self._close(now, closed)
        return closed[0]

    def _fold_stage(self) -> None:
        if self._staged:
            rows = np.frombuffer(b"".join(self._stage_rows), np.float32)
            self._fold(rows.reshape(-1, self._features),
                       np.frombuffer(b"".join(self._stage_pred), np.int64))
            self._stage_rows.clear()
            self._stage_pred.clear()
            self._staged = 0

    def _fold(self, rows: np.ndarray, predicted: np.ndarray) -> None:
        if np.isnan(rows).any():
            rows = np.where(np.isnan(rows), np.float32(np.inf), rows)
        outside = self._classes  # the last count: ids outside the labels
        ids = np.minimum(predicted, outside)
        if len(ids) and ids.min() < 0:
            ids[ids < 0] = outside
        self._predicted += np.bincount(ids, minlength=outside + 1)
        for lo in range(0, len(rows), self._chunk):
            chunk = rows[lo:lo + self._chunk]
            cmp = self._cmp[: len(chunk)]
            np.greater_equal(chunk[:, None, :], self._edges, out=cmp)
            self._at_least += np.add.reduce(cmp.view(np.uint8), axis=0, dtype=np.uint16)
        self._sample(rows)

    def _sample(self, rows: np.ndarray) -> None:
        """Algorithm R, vectorized: row i (0-based in the window) replaces slot U[0, i] if < k."""
        k, seen = len(self._reservoir), self._folded
        direct = min(max(k - seen, 0), len(rows))
        self._reservoir[seen:seen + direct] = rows[:direct]
        rest = rows[direct:]
        if len(rest):
            upto = np.arange(seen + direct + 1, seen + len(rows) + 1)
            slot = (self._rng.random(len(rest)) * upto).astype(np.intp)
            keep = slot < k
            self._reservoir[slot[keep]] = rest[keep]  # duplicates: the later row wins, as in R
        self._folded += len(rows)

    def _close(self, now: float, closed: list[DriftWindow]) -> None:
        self._fold_stage()
        if self._rows >= self.config.min_rows and self._start is not None:
            closed.append(self._score(self._start, now))
        else:
            self.skipped_windows += 1
            log.debug("drift window of %s v%d dropped: %d rows < min_rows %d",
                      self.model, self.version, self._rows, self.config.min_rows)
        self._at_least[...] = 0
        self._predicted[...] = 0
        self._rows = self._folded = 0
        self._start = None

    def _score(self, start: float, end: float) -> DriftWindow:
        cfg, n = self.config, self._rows
        at_least = self._at_least
        counts = np.empty((len(at_least) + 1, self._features), np.int64)
        counts[0] = n - at_least[0]
        counts[1:-1] = at_least[:-1] - at_least[1:]
        counts[-1] = at_least[-1]
        psi = _psi(counts / n, self._norm, self._shares, self._log_shares)
        prediction_psi = float(_psi(self._predicted / n, 1.0 + EPSILON * (self._classes + 1),
                                    self._class_shares, self._log_class_shares))
        ks_p = self._ks.pvalues(self._reservoir[: min(n, len(self._reservoir))])
        drifted = (psi > cfg.psi_threshold) | (ks_p < cfg.ks_alpha)
        names = self._names
        window = DriftWindow(
            model=self.model, version=self.version, start=start, end=end, rows=n,
            feature_psi=dict(zip(names, psi.tolist(), strict=True)),
            feature_ks_p=dict(zip(names, ks_p.tolist(), strict=True)),
            prediction_psi=prediction_psi,
            drifted_features=[names[j] for j in np.flatnonzero(drifted)],
            score=max(float(psi.mean()), prediction_psi),
            drifted=bool(drifted.sum() > cfg.feature_fraction * self._features
                         or prediction_psi > cfg.prediction_psi_threshold),
        )
        log.debug("drift window of %s v%d: %d rows, score %.3f, drifted %s",
                  self.model, self.version, n, window.score, window.drifted)
        return window


def _psi(shares: np.ndarray, norm: np.ndarray | float, reference: np.ndarray,
         log_reference: np.ndarray) -> np.ndarray:
    """PSI over axis 0 of window shares against smoothed reference shares."""
    q = (shares + EPSILON) / norm
    return ((q - reference) * (np.log(q) - log_reference)).sum(axis=0)
