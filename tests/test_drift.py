"""Drift on the agent (edge_agent.reporting.drift) vs. a trainer-built profile of real digits.

Unshifted held-out rows are never flagged; inverted, noisy and prediction-only shifts are. PSI
and KS are checked against direct computations (numpy searchsorted, scipy), windows close by
count and by time with ``now`` passed in, memory does not grow with the rows, and hostile
profiles are refused.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from edge_agent.reporting.drift import (
    EPSILON,
    MAX_FEATURES,
    PROFILE_FORMAT,
    DriftConfig,
    DriftMonitor,
    DriftWindow,
    kolmogorov_sf,
    parse_profile,
)
from fleetcore.errors import InvalidInputError
from scripts.bench_agent_serving import bench_update_cost
from trainer import profile as trainer_profile

# scipy ships no type stubs; it is only the reference here (the agent does not depend on it).
scipy_stats: Any = importlib.import_module("scipy.stats")
scipy_special: Any = importlib.import_module("scipy.special")

WINDOW = DriftConfig(window_requests=200)
LABELS = [str(d) for d in range(10)]
NAMES = [f"pixel_{i // 8}_{i % 8}" for i in range(64)]


@dataclass(frozen=True)
class Digits:
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    profile: dict[str, Any]
    profile_bytes: bytes


@pytest.fixture(scope="module")
def digits() -> Digits:
    data = load_digits()
    X_train, X_test, y_train, y_test = train_test_split(
        data.data.astype(np.float32), data.target.astype(np.int64), test_size=400,
        stratify=data.target, random_state=0)
    built = trainer_profile.build_profile(X_train, NAMES, y_train, LABELS, bins=10,
                                          sample_rows=500, seed=0)
    raw = json.dumps(built).encode()
    return Digits(X_train, y_train, X_test, y_test, parse_profile(raw), raw)


def feed(monitor: DriftMonitor, rows: np.ndarray, predicted: np.ndarray,
         now: float = 0.0) -> list[DriftWindow]:
    """All windows, the last one flushed."""
    windows = monitor.observe(rows, predicted, now)
    last = monitor.flush(now)
    return windows + ([last] if last is not None else [])


def expected_psi(window_shares: np.ndarray, reference: np.ndarray) -> float:
    q = (window_shares + EPSILON) / (1 + EPSILON * len(reference))
    p = (reference + EPSILON) / (1 + EPSILON * len(reference))
    return float(((q - p) * np.log(q / p)).sum())


# --- not flagged when nothing moved --------------------------------------------------------


def test_held_out_digits_are_not_flagged_in_any_window(digits: Digits) -> None:
    windows = feed(DriftMonitor("digits", 1, digits.profile, WINDOW), digits.X_test,
                   digits.y_test)

    assert [w.rows for w in windows] == [200, 200]
    for w in windows:
        assert not w.drifted, (w.score, w.prediction_psi, w.drifted_features)
        assert w.score < 0.2 and w.prediction_psi < 0.2
        assert len(w.drifted_features) <= 0.1 * len(NAMES)


def test_a_constant_feature_is_not_drifted(digits: Digits) -> None:
    assert (digits.X_train[:, 0] == 0).all() and (digits.X_test[:, 0] == 0).all()
    (w, *_) = feed(DriftMonitor("digits", 1, digits.profile, WINDOW), digits.X_test,
                   digits.y_test)
    assert w.feature_ks_p["pixel_0_0"] == 1.0
    assert w.feature_psi["pixel_0_0"] == pytest.approx(0.0, abs=1e-12)
    assert "pixel_0_0" not in w.drifted_features


def test_single_rows_give_the_same_windows_as_one_batch(digits: Digits) -> None:
    config = DriftConfig(window_requests=150, reservoir_size=64)  # rows replace rows in it
    batched = feed(DriftMonitor("digits", 1, digits.profile, config, seed=7), digits.X_test,
                   digits.y_test)
    one_by_one = DriftMonitor("digits", 1, digits.profile, config, seed=7)
    windows: list[DriftWindow | None] = []
    for i in range(len(digits.X_test)):
        windows += one_by_one.observe(digits.X_test[i:i + 1], digits.y_test[i:i + 1], 0.0)
    windows.append(one_by_one.flush(0.0))

    assert [w.to_dict() for w in windows if w] == [w.to_dict() for w in batched]
    assert len(batched) == 3


def test_the_reservoir_is_a_uniform_sample_of_the_window() -> None:
    tiny = trainer_profile.build_profile(np.arange(100, dtype=np.float32)[:, None], ["x"],
                                         np.zeros(100, np.int64), ["a"], bins=4, sample_rows=50,
                                         seed=0)
    rows = np.arange(1000, dtype=np.float32)[:, None]
    kept = np.zeros(1000)
    for seed in range(200):
        monitor = DriftMonitor("m", 1, tiny, DriftConfig(window_requests=10_000,
                                                          reservoir_size=50), seed=seed)
        for lo in range(0, 1000, 37):  # uneven batches
            monitor.observe(rows[lo:lo + 37], np.zeros(len(rows[lo:lo + 37]), np.int64), 0.0)
        monitor._fold_stage()  # the last rows may still be staged
        kept[monitor._reservoir[:, 0].astype(int)] += 1
    # Each row is kept with probability 50 / 1000; each tenth of the window gets 1000 of the
    # 10,000 slots filled (binomial sd ~ 30).
    assert np.abs(kept.reshape(10, 100).sum(axis=1) - 1000).max() < 150


# --- flagged when something moved --------------------------------------------------------


def noisy(X: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.clip(X + rng.normal(0, 4, X.shape), 0, 16).astype(np.float32)


@pytest.mark.parametrize("shift", [lambda X: 16 - X, noisy], ids=["inverted", "noise-sigma-4"])
def test_shifted_inputs_are_flagged(digits: Digits,
                                    shift: Callable[[np.ndarray], np.ndarray]) -> None:
    windows = feed(DriftMonitor("digits", 1, digits.profile, WINDOW), shift(digits.X_test),
                   digits.y_test)

    for w in windows:
        assert w.drifted
        assert len(w.drifted_features) > 0.1 * len(NAMES)
        assert w.prediction_psi < 0.2  # the inputs moved, not the predictions


def test_a_prediction_only_shift_is_flagged_by_prediction_psi(digits: Digits) -> None:
    all_threes = np.full(len(digits.X_test), 3, np.int64)
    windows = feed(DriftMonitor("digits", 1, digits.profile, WINDOW), digits.X_test, all_threes)

    for w in windows:
        assert w.drifted
        assert w.prediction_psi > 0.2 and w.score == w.prediction_psi
        assert len(w.drifted_features) <= 0.1 * len(NAMES)  # inputs did not move


def test_class_ids_outside_the_labels_read_as_drift(digits: Digits) -> None:
    odd = np.where(np.arange(len(digits.X_test)) % 2 == 0, -1, 99).astype(np.int64)
    (w, *_) = feed(DriftMonitor("digits", 1, digits.profile, WINDOW), digits.X_test, odd)
    assert w.drifted and w.prediction_psi > 5


# --- the statistics themselves -----------------------------------------------------------


def test_feature_and_prediction_psi_follow_the_profile_bins(digits: Digits) -> None:
    rows = digits.X_test[:200].copy()
    rows[:7, 5] = np.nan  # searchsorted puts NaN in the last bin; so does the monitor
    (w,) = DriftMonitor("digits", 1, digits.profile, WINDOW).observe(rows, digits.y_test[:200],
                                                                     0.0)
    for j, f in enumerate(digits.profile["features"]):
        bins = np.searchsorted(np.array(f["edges"]), rows[:, j].astype(np.float64), "right")
        shares = np.bincount(bins, minlength=len(f["proportions"])) / len(rows)
        want = expected_psi(shares, np.array(f["proportions"]))
        assert w.feature_psi[f["name"]] == pytest.approx(want, rel=1e-9, abs=1e-12)
    shares = np.bincount(digits.y_test[:200], minlength=11) / 200  # + the outside bucket
    reference = np.append(digits.profile["prediction"]["proportions"], 0.0)
    assert w.prediction_psi == pytest.approx(expected_psi(shares, reference), rel=1e-9)


def gaussian_profile() -> tuple[dict[str, Any], np.ndarray]:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(1000, 8)).astype(np.float32)
    built = trainer_profile.build_profile(X, [f"f{j}" for j in range(8)],
                                          np.zeros(1000, np.int64), ["a", "b"], bins=10,
                                          sample_rows=400, seed=0)
    return built, (rng.normal(size=(150, 8)) * 1.3 + 0.2).astype(np.float32)


@pytest.mark.parametrize("case", ["digits-many-ties", "gaussian-no-ties"])
def test_ks_matches_scipy_on_the_same_samples(digits: Digits, case: str) -> None:
    if case == "digits-many-ties":
        profile, rows = digits.profile, digits.X_test[:150]
    else:
        profile, rows = gaussian_profile()
    reference = np.array(profile["reference_sample"]["rows"], np.float32)
    # The window fits in the reservoir, so the KS sample is exactly the window's rows.
    config = DriftConfig(window_requests=150, reservoir_size=256)
    (w,) = DriftMonitor("m", 1, profile, config).observe(rows, np.zeros(150, np.int64), 0.0)

    m, n = len(reference), len(rows)
    en = m * n / (m + n)
    for j, name in enumerate(w.feature_ks_p):
        ks = scipy_stats.ks_2samp(rows[:, j], reference[:, j], method="asymp")
        # Same statistic D: the documented p-value formula applied to scipy's D agrees exactly.
        want = scipy_special.kolmogorov((np.sqrt(en) + 0.12 + 0.11 / np.sqrt(en)) * ks.statistic)
        assert w.feature_ks_p[name] == pytest.approx(min(1.0, want), abs=1e-9)
        assert w.feature_ks_p[name] == pytest.approx(ks.pvalue, abs=0.02)


def test_kolmogorov_sf_matches_scipy() -> None:
    x = np.concatenate([np.linspace(0, 3, 301), [5.0, 10.0]])
    assert np.allclose(kolmogorov_sf(x), scipy_special.kolmogorov(x), rtol=1e-10, atol=1e-14)


# --- windows ---------------------------------------------------------------------------------


def test_windows_close_by_count_and_by_time(digits: Digits) -> None:
    config = DriftConfig(window_requests=100, window_seconds=10.0, min_rows=20)
    monitor = DriftMonitor("digits", 3, digits.profile, config)
    X, y = digits.X_test, digits.y_test

    by_count = monitor.observe(X[:250], y[:250], now=1.0)  # one batch spans two windows
    assert [(w.rows, w.start, w.end) for w in by_count] == [(100, 1.0, 1.0), (100, 1.0, 1.0)]
    assert all(w.model == "digits" and w.version == 3 for w in by_count)
    assert monitor.observe(X[250:280], y[250:280], now=5.0) == []  # 80 rows, 4 s: still open

    (by_time,) = monitor.observe(X[280:281], y[280:281], now=11.0)  # 10 s after it opened
    assert (by_time.rows, by_time.start, by_time.end) == (80, 1.0, 11.0)
    assert monitor.observe(X[281:285], y[281:285], now=12.0) == []  # that row opened a new one


def test_a_window_below_min_rows_is_not_scored(digits: Digits) -> None:
    config = DriftConfig(window_requests=100, window_seconds=10.0, min_rows=20)
    monitor = DriftMonitor("digits", 1, digits.profile, config)
    X, y = digits.X_test, digits.y_test

    for i in range(5):  # one request at a time
        assert monitor.observe(X[i:i + 1], y[i:i + 1], now=float(i)) == []
    assert monitor.flush(now=6.0) is None  # 5 rows < min_rows: flush keeps it open
    assert monitor.observe(X[5:30], y[5:30], now=10.0) == []  # closed by time, 5 rows: dropped
    assert monitor.skipped_windows == 1

    w = monitor.flush(now=12.0)  # the 25 rows of the window opened at t=10
    assert w is not None and (w.rows, w.start, w.end) == (25, 10.0, 12.0)
    assert monitor.flush(now=13.0) is None  # nothing left


def test_to_dict_is_the_telemetry_payload(digits: Digits) -> None:
    (w, *_) = feed(DriftMonitor("digits", 2, digits.profile, WINDOW), digits.X_test,
                   digits.y_test)
    doc = json.loads(json.dumps(w.to_dict()))
    assert doc["model"] == "digits" and doc["version"] == 2 and doc["rows"] == 200
    assert set(doc["feature_psi"]) == set(doc["feature_ks_p"]) == set(NAMES)
    assert {"start", "end", "score", "drifted", "prediction_psi", "drifted_features"} <= set(doc)


def test_memory_does_not_grow_with_rows(digits: Digits) -> None:
    monitor = DriftMonitor("digits", 1, digits.profile)
    rows = np.tile(digits.X_train, (8, 1))[:10_000]
    predicted = np.tile(digits.y_train, 8)[:10_000]
    monitor.observe(rows[:1000], predicted[:1000], 0.0)
    after_1k = monitor.memory_bytes
    for i in range(1000, 1100):  # and some single requests, staged
        monitor.observe(rows[i:i + 1], predicted[i:i + 1], 0.0)
    for _ in range(10):
        monitor.observe(rows, predicted, 0.0)
    assert monitor.memory_bytes == after_1k < 2 * 1024 * 1024


def test_wrong_shapes_are_a_caller_error(digits: Digits) -> None:
    monitor = DriftMonitor("digits", 1, digits.profile)
    with pytest.raises(ValueError, match="expected rows"):
        monitor.observe(digits.X_test[:, :10], digits.y_test, 0.0)
    with pytest.raises(ValueError, match="expected rows"):
        monitor.observe(digits.X_test, digits.y_test[:5], 0.0)
    with pytest.raises(ValueError, match="integer class ids"):
        monitor.observe(digits.X_test, digits.y_test.astype(np.float32), 0.0)
    with pytest.raises(ValueError, match="min_rows"):
        DriftConfig(window_requests=10, min_rows=50)


# --- hostile profiles ------------------------------------------------------------------------


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value
    return mutate


def _many_features(doc: dict[str, Any]) -> None:
    doc["features"] = [dict(doc["features"][1], name=f"f{i}") for i in range(MAX_FEATURES + 1)]


@dataclass(frozen=True)
class Hostile:
    name: str
    error: str  # a part of the message
    mutate: Callable[[dict[str, Any]], None] | None = None  # applied to the good profile
    raw: bytes | None = None  # or these bytes instead


HOSTILE = [
    Hostile("not-json", "not valid JSON", raw=b"{format: edgefleet"),
    Hostile("not-utf8", "not UTF-8", raw=b'{"format": "\xff\xfe"}'),
    Hostile("deeply-nested", "recursion depth", raw=b"[" * 200_000 + b"]" * 200_000),
    Hostile("oversized", "limit is", raw=b" " * (16 * 1024 * 1024 + 1)),
    Hostile("not-an-object", "JSON object", raw=b"[1, 2, 3]"),
    Hostile("duplicate-keys", "duplicate key 'format'",
            raw=b'{"format": "edgefleet.profile/v1", "format": "x"}'),
    Hostile("nan-literal", "NaN is not a JSON number", raw=b'{"format": NaN}'),
    Hostile("wrong-format", "format must be", _set("format", "edgefleet.profile/v9")),
    Hostile("unsorted-edges", "strictly increasing", _set("features.3.edges", [9.0, 5.0, 1.0])),
    Hostile("repeated-edges", "strictly increasing", _set("features.3.edges", [1.0, 1.0])),
    Hostile("string-edge", "only numbers", _set("features.3.edges", ["1"])),
    Hostile("boolean-edge", "only numbers", _set("features.3.edges", [True])),
    Hostile("proportions-too-short", "expected", _set("features.3.proportions", [1.0])),
    Hostile("negative-proportion", "negative", _set("features.0.proportions", [-0.5, 1.5])),
    Hostile("proportions-not-summing-to-1", "sums to",
            _set("features.0.proportions", [0.5, 0.6])),
    Hostile("too-many-edges", "the limit is", _set("features.3.edges", list(range(300)))),
    Hostile("feature-without-name", "name", _set("features.2.name", "")),
    Hostile("duplicate-feature-names", "unique", _set("features.2.name", "pixel_0_0")),
    Hostile("sample-row-too-short", "list of 64 numbers",
            _set("reference_sample.rows.0", [0.0] * 63)),
    Hostile("sample-row-not-a-list", "list of 64 numbers", _set("reference_sample.rows.4", 7)),
    Hostile("empty-sample", "reference_sample has 0 rows", _set("reference_sample.rows", [])),
    Hostile("too-many-features", "features; expected", _many_features),
    Hostile("no-features", "features; expected", _set("features", [])),
    Hostile("prediction-shares-mismatch", "expected 10", _set("prediction.proportions", [1.0])),
    Hostile("no-prediction", "prediction must be", _set("prediction", None)),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[c.name for c in HOSTILE])
def test_hostile_profiles_are_refused(digits: Digits, case: Hostile) -> None:
    if case.raw is not None:
        data = case.raw
    else:
        assert case.mutate is not None
        doc = json.loads(digits.profile_bytes)
        case.mutate(doc)
        data = json.dumps(doc).encode()
    with pytest.raises(InvalidInputError, match=case.error):
        parse_profile(data)
    if case.mutate is not None:  # the monitor checks a profile dict the same way
        with pytest.raises(InvalidInputError, match=case.error):
            DriftMonitor("digits", 1, json.loads(data))


def test_the_trainer_profile_is_accepted(digits: Digits) -> None:
    assert PROFILE_FORMAT == trainer_profile.PROFILE_FORMAT
    assert parse_profile(digits.profile_bytes) == json.loads(digits.profile_bytes)


def test_bench_update_cost_measures_something(digits: Digits) -> None:
    rows = digits.X_test[:300]
    for batch in (1, 64):
        assert bench_update_cost(digits.profile, rows, batch, repeats=1) > 0
