"""The trainer's feature store and data sources: content-addressed snapshots, lineage, PII
pseudonymization, data-locality policy, tamper detection and hostile CSV input.

Security tests are named after the attack they refuse; after each refusal the store's catalog,
data files, key and policy must be exactly as before.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sqlite3
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from fleetcore import regions
from fleetcore.errors import InvalidInputError, NotFoundError
from fleetcore.pseudonym import pseudonymize
from scripts.make_example_csv import CSV_PATH, LABEL, PII_COLUMNS, render
from trainer.sources import CsvLimits, RawTable, load_source
from trainer.store import FeatureStore, RegionNotAllowedError, Snapshot

REPO = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
NOW_ISO = "2026-01-02T03:04:05.000000Z"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FeatureStore]:
    with FeatureStore(tmp_path / "store") as fs:
        yield fs


@pytest.fixture(scope="module")
def digits() -> RawTable:
    return load_source("sklearn:digits", label=None, pii=[], base_dir=REPO)


@pytest.fixture(scope="module")
def wine_csv() -> RawTable:
    rel = CSV_PATH.relative_to(REPO)
    return load_source(f"csv:{rel}", label=LABEL, pii=list(PII_COLUMNS), base_dir=REPO)


def state(fs: FeatureStore) -> tuple[object, ...]:
    """Everything a refused operation must leave untouched."""
    conn = sqlite3.connect(fs.path / "catalog.db")
    try:
        rows = conn.execute("SELECT * FROM snapshots ORDER BY id").fetchall()
    finally:
        conn.close()
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in fs.data_dir.iterdir())
    return rows, files, fs.key_path.read_bytes(), fs.policy_path.read_bytes()


def store_bytes(root: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()]


def leaks(root: Path, values: list[str]) -> list[tuple[str, Path]]:
    """Values found in any file under root, as UTF-8 or as NumPy's UTF-32 unicode arrays."""
    found = []
    for path, data in store_bytes(root):
        for v in values:
            if v.encode("utf-8") in data or v.encode("utf-32-le") in data:
                found.append((v, path))
    return found


# --- content addressing and lineage ---------------------------------------------------------


def test_reingesting_identical_data_returns_the_existing_snapshot(
    store: FeatureStore, digits: RawTable
) -> None:
    first = store.ingest(digits, region="eu-west-1", now=NOW)
    before = state(store)
    again = store.ingest(digits, region="eu-west-1", now=NOW + timedelta(hours=1))
    assert again.id == first.id
    assert again.lineage["ingested_at"] == NOW_ISO  # the first ingest's time, not the second's
    assert state(store) == before  # nothing rewritten
    assert [r["id"] for r in store.list()] == [first.id]


def test_snapshot_id_does_not_depend_on_the_store_or_ingest_time(
    tmp_path: Path, digits: RawTable
) -> None:
    with FeatureStore(tmp_path / "a") as a, FeatureStore(tmp_path / "b") as b:
        id_a = a.ingest(digits, region="eu-west-1", now=NOW).id
        id_b = b.ingest(digits, region="eu-west-1", now=NOW + timedelta(days=3)).id
    assert id_a == id_b
    assert id_a.startswith("sha256:") and len(id_a) == len("sha256:") + 64


def test_snapshot_id_covers_data_region_transform_and_parent(
    store: FeatureStore, wine_csv: RawTable
) -> None:
    base = store.ingest(wine_csv, region="eu-west-1", now=NOW)
    X = wine_csv.X.copy()
    X[0, 0] += 1
    ids = {
        base.id,
        store.ingest(replace(wine_csv, X=X), region="eu-west-1", now=NOW).id,
        store.ingest(wine_csv, region="eu-central-1", now=NOW).id,
        store.ingest(wine_csv, region="eu-west-1", pii_action="drop", now=NOW).id,
        store.ingest(wine_csv, region="eu-west-1", parent=base.id, now=NOW).id,
    }
    assert len(ids) == 5
    # the source's name is lineage, not content
    renamed = replace(wine_csv, source="csv:/elsewhere.csv")
    assert store.ingest(renamed, region="eu-west-1", now=NOW).id == base.id


def test_lineage_is_recorded(store: FeatureStore, wine_csv: RawTable) -> None:
    parent = store.ingest(wine_csv, region="eu-west-1", now=NOW)
    assert parent.lineage == {
        "source": f"csv:{CSV_PATH}",
        "source_digest": "sha256:" + hashlib.sha256(CSV_PATH.read_bytes()).hexdigest(),
        "ingested_at": NOW_ISO,
        "transform": {"pii": list(PII_COLUMNS), "pii_action": "hmac"},
        "parent": None,
        "origin": {},
    }
    later = NOW + timedelta(minutes=5)
    origin = {"devices": {"dev-1@v1": 3}}
    child = store.ingest(wine_csv, region="eu-west-1", parent=parent.id, now=later,
                         origin=origin)
    assert child.lineage["parent"] == parent.id
    assert child.lineage["origin"] == origin
    assert store.get(child.id).lineage == child.lineage
    assert store.list() == [
        {"id": parent.id, "region": "eu-west-1", "rows": 178, "created": NOW_ISO,
         "source": f"csv:{CSV_PATH}", "parent": None},
        {"id": child.id, "region": "eu-west-1", "rows": 178,
         "created": "2026-01-02T03:09:05.000000Z", "source": f"csv:{CSV_PATH}",
         "parent": parent.id},
    ]  # fmt: skip


def test_snapshot_round_trips_data_schema_and_stats(store: FeatureStore, digits: RawTable) -> None:
    stored = store.ingest(digits, region="eu-west-1", now=NOW)
    snap = store.get(stored.id)
    assert np.array_equal(snap.X, digits.X) and snap.X.dtype == np.float32
    assert np.array_equal(snap.y, digits.y) and snap.y.dtype == np.int64
    assert snap.labels == [str(d) for d in range(10)]
    assert snap.image_shape == (8, 8)
    assert snap.feature_names == digits.feature_names
    assert not snap.X.flags.writeable  # snapshots are immutable
    assert snap.schema["rows"] == 1797
    assert snap.schema["features"][0] == {"name": "pixel_0_0", "dtype": "float32", "pii": False}
    assert snap.schema["label"]["classes"] == snap.labels
    center = snap.stats["features"]["pixel_4_4"]
    column = digits.X[:, digits.feature_names.index("pixel_4_4")].astype(np.float64)
    assert center["mean"] == pytest.approx(column.mean())
    assert center["std"] == pytest.approx(column.std())
    assert (center["min"], center["max"], center["missing"]) == (0.0, 16.0, 0)
    counts = snap.stats["class_counts"]
    assert sum(counts.values()) == 1797 and counts["0"] == int((digits.y == 0).sum())


@pytest.mark.parametrize(
    ("name", "shape", "labels", "image_shape"),
    [
        ("digits", (1797, 64), [str(d) for d in range(10)], (8, 8)),
        ("wine", (178, 13), ["class_0", "class_1", "class_2"], None),
        ("breast_cancer", (569, 30), ["malignant", "benign"], None),
    ],
)
def test_sklearn_sources(
    name: str, shape: tuple[int, int], labels: list[str], image_shape: tuple[int, int] | None
) -> None:
    t = load_source(f"sklearn:{name}", label=None, pii=(), base_dir=REPO)
    assert (t.X.shape, t.X.dtype, t.y.dtype) == (shape, np.float32, np.int64)
    assert (t.labels, t.image_shape, t.pii) == (labels, image_shape, {})
    assert t.source == f"sklearn:{name}"
    assert len(t.feature_names) == shape[1]
    again = load_source(f"sklearn:{name}", label=None, pii=(), base_dir=REPO)
    assert t.source_digest == again.source_digest and t.source_digest.startswith("sha256:")


def test_csv_labels_are_sorted_class_names(wine_csv: RawTable) -> None:
    assert wine_csv.labels == ["barbera", "barolo", "grignolino"]
    sk = load_source("sklearn:wine", label=None, pii=(), base_dir=REPO)
    assert wine_csv.feature_names == sk.feature_names  # the PII and label columns are not features
    assert np.array_equal(wine_csv.X, sk.X)
    barolo = wine_csv.labels.index("barolo")
    assert np.array_equal(wine_csv.y == barolo, sk.y == 0)
    assert list(wine_csv.pii) == list(PII_COLUMNS)


def test_example_csv_is_what_the_script_writes() -> None:
    assert CSV_PATH.read_text(encoding="utf-8") == render()


# --- PII ------------------------------------------------------------------------------------


def test_leak_scanner_sees_utf8_and_numpy_unicode(tmp_path: Path) -> None:
    """The PII tests below would be vacuous if the scanner missed NumPy's UTF-32 strings."""
    np.savez(tmp_path / "leak.npz", names=np.array(["Giulia Rossi"]))
    (tmp_path / "leak.txt").write_text("x customer0001@example.com x")
    found = leaks(tmp_path, ["Giulia Rossi", "customer0001@example.com"])
    assert {v for v, _ in found} == {"Giulia Rossi", "customer0001@example.com"}


@pytest.mark.parametrize("action", ["hmac", "drop"])
def test_raw_pii_never_reaches_the_store(
    store: FeatureStore, wine_csv: RawTable, action: str
) -> None:
    raw = sorted({v for col in wine_csv.pii.values() for v in col.tolist()})
    assert len(raw) > 100 and "customer0042@example.com" in raw
    assert leaks(CSV_PATH.parent, raw)  # they are in the source ...

    snap = store.ingest(wine_csv, region="eu-west-1", pii_action=action, now=NOW)
    loaded = store.get(snap.id)
    assert leaks(store.path, raw) == []  # ... and nowhere in the store's bytes

    assert [p["name"] for p in loaded.schema["pii"]] == list(PII_COLUMNS)
    assert {p["action"] for p in loaded.schema["pii"]} == {action}
    assert not set(PII_COLUMNS) & set(loaded.feature_names)
    if action == "drop":
        assert loaded.pii == {}
    else:
        key = store.key_path.read_bytes()
        emails = wine_csv.pii["customer_email"].tolist()
        expected = [hmac.new(key, e.encode(), hashlib.sha256).hexdigest() for e in emails]
        assert loaded.pii["customer_email"].tolist() == expected


def test_store_key_is_private_and_never_inside_a_snapshot(
    store: FeatureStore, wine_csv: RawTable
) -> None:
    store.ingest(wine_csv, region="eu-west-1", now=NOW)
    key = store.key_path.read_bytes()
    assert len(key) == 32
    assert stat.S_IMODE(store.key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o700
    for path, data in store_bytes(store.path):
        if path != store.key_path:
            assert key not in data and key.hex().encode() not in data, path
    with FeatureStore(store.path) as reopened:  # the key is created once
        assert reopened.key_path.read_bytes() == key


def test_pii_on_a_source_without_pii_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="no PII columns"):
        load_source("sklearn:wine", label=None, pii=["customer_email"], base_dir=REPO)


def test_silently_regenerating_a_lost_key_is_refused(
    store: FeatureStore, wine_csv: RawTable
) -> None:
    store.ingest(wine_csv, region="eu-west-1", now=NOW)
    store.key_path.unlink()
    with pytest.raises(InvalidInputError, match="restore the key"):
        FeatureStore(store.path)
    assert not store.key_path.exists()


# --- data locality --------------------------------------------------------------------------


def test_training_on_a_snapshot_from_a_disallowed_region_is_refused(
    tmp_path: Path, digits: RawTable
) -> None:
    with FeatureStore(tmp_path / "s", allowed_regions=["eu-west-1", "eu-central-1"]) as fs:
        assert fs.allowed_regions == ["eu-west-1", "eu-central-1"]
        fs.check_region(fs.ingest(digits, region="eu-central-1", now=NOW))
        abroad = fs.ingest(digits, region="us-east-1", now=NOW)
        with pytest.raises(
            RegionNotAllowedError, match=r"'us-east-1'.*'eu-west-1', 'eu-central-1'"
        ):
            fs.check_region(fs.get(abroad.id))
        assert isinstance(RegionNotAllowedError("x"), InvalidInputError)


def test_default_policy_allows_any_region(store: FeatureStore, digits: RawTable) -> None:
    assert store.allowed_regions == ["*"]
    store.check_region(store.ingest(digits, region="ap-south-1", now=NOW))


def test_a_pipeline_overriding_the_store_region_policy_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s"
    FeatureStore(path, allowed_regions=["eu-west-1"]).close()
    policy = (path / "policy.toml").read_bytes()
    with pytest.raises(InvalidInputError, match=r"edit .*policy\.toml"):
        FeatureStore(path, allowed_regions=["*"])
    assert (path / "policy.toml").read_bytes() == policy
    with FeatureStore(path) as fs, FeatureStore(path, allowed_regions=["eu-west-1"]) as same:
        assert fs.allowed_regions == same.allowed_regions == ["eu-west-1"]


# policy.toml contents that fleetcore.regions refuses (the one parser of the policy)
BAD_POLICIES = {
    "not-a-list": 'allowed_regions = "eu-west-1"\n',
    "missing": "other = 1\n",
    "bad-name": 'allowed_regions = ["eu west"]\n',
    "not-a-string": "allowed_regions = [1]\n",
    "too-many": f"allowed_regions = {json.dumps([f'r{i}' for i in range(257)])}\n",
}


@pytest.mark.parametrize("text", BAD_POLICIES.values(), ids=list(BAD_POLICIES))
def test_a_policy_file_fleetcore_refuses_is_refused_with_its_message(
    tmp_path: Path, text: str
) -> None:
    path = tmp_path / "s"
    FeatureStore(path).close()
    (path / regions.POLICY_FILE).write_text(text)
    with pytest.raises(InvalidInputError) as expected:
        regions.read_policy_file(path / regions.POLICY_FILE)
    with pytest.raises(InvalidInputError) as refused:
        FeatureStore(path)
    assert str(refused.value) == str(expected.value)
    assert str(path / regions.POLICY_FILE) in str(refused.value)


@pytest.mark.parametrize("requested", [["eu west"], [""], [1], [f"r{i}" for i in range(257)]],
                         ids=["space", "empty", "int", "too-many"])
def test_a_requested_policy_fleetcore_refuses_is_refused_with_its_message(
    tmp_path: Path, requested: list[object]
) -> None:
    with pytest.raises(InvalidInputError) as expected:
        regions.check_regions(requested, "allowed_regions")
    with pytest.raises(InvalidInputError) as refused:
        FeatureStore(tmp_path / "s", allowed_regions=requested)  # type: ignore[arg-type]
    assert str(refused.value) == str(expected.value)
    assert not (tmp_path / "s" / regions.POLICY_FILE).exists()


def test_store_pseudonyms_are_fleetcore_pseudonyms(
    store: FeatureStore, wine_csv: RawTable
) -> None:
    snap = store.ingest(wine_csv, region="eu-west-1", now=NOW)
    key = (store.path / "store.key").read_bytes()
    assert snap.pii and set(snap.pii) == set(wine_csv.pii)
    for name, raw in wine_csv.pii.items():
        assert snap.pii[name].tolist() == [pseudonymize(key, v) for v in raw.tolist()]
        # and the keyed hash it always was, so stored snapshot ids do not change
        assert snap.pii[name][0] == hmac.new(
            key, str(raw[0]).encode(), hashlib.sha256
        ).hexdigest()


def test_relabelling_a_snapshot_region_in_the_catalog_is_detected(
    tmp_path: Path, digits: RawTable
) -> None:
    with FeatureStore(tmp_path / "s", allowed_regions=["eu-west-1"]) as fs:
        abroad = fs.ingest(digits, region="us-east-1", now=NOW)
        conn = sqlite3.connect(fs.path / "catalog.db")
        with conn:
            conn.execute("UPDATE snapshots SET region = 'eu-west-1' WHERE id = ?", (abroad.id,))
        conn.close()
        with pytest.raises(InvalidInputError, match="does not match its id"):
            fs.get(abroad.id)


@pytest.mark.parametrize("region", ["", "../etc", "eu west", "x" * 65, "*", "-eu"])
def test_malformed_region_is_refused(store: FeatureStore, digits: RawTable, region: str) -> None:
    before = state(store)
    with pytest.raises(InvalidInputError, match="region"):
        store.ingest(digits, region=region, now=NOW)
    assert state(store) == before


# --- tampering ------------------------------------------------------------------------------


def _rewrite(path: Path, **changes: np.ndarray) -> None:
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays.update(changes)
    np.savez(path, **arrays)


def _poison_feature(path: Path, snap: Snapshot, other: Path) -> None:
    X = snap.X.copy()
    X[0, 0] = 99.0
    _rewrite(path, X=X)


def _flip_label(path: Path, snap: Snapshot, other: Path) -> None:
    y = snap.y.copy()
    y[0] = (y[0] + 1) % len(snap.labels)
    _rewrite(path, y=y)


def _truncate(path: Path, snap: Snapshot, other: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def _garbage(path: Path, snap: Snapshot, other: Path) -> None:
    path.write_bytes(b"\x00" * 4096)


def _substitute(path: Path, snap: Snapshot, other: Path) -> None:
    path.write_bytes(other.read_bytes())


def _pickled_object(path: Path, snap: Snapshot, other: Path) -> None:
    _rewrite(path, labels=np.array([object()] * len(snap.labels), dtype=object))


@pytest.mark.parametrize(
    "tamper",
    [_poison_feature, _flip_label, _truncate, _garbage, _substitute, _pickled_object],
    ids=lambda f: f.__name__.lstrip("_"),
)
def test_tampered_data_file_is_detected_on_load(
    store: FeatureStore, digits: RawTable, tamper: object
) -> None:
    snap = store.ingest(digits, region="eu-west-1", now=NOW)
    other = store.ingest(replace(digits, X=digits.X + 1), region="eu-west-1", now=NOW)
    path = store.data_dir / f"{snap.id.removeprefix('sha256:')}.npz"
    assert callable(tamper)
    tamper(path, snap, store.data_dir / f"{other.id.removeprefix('sha256:')}.npz")
    with pytest.raises(InvalidInputError, match="does not match its id"):
        store.get(snap.id)
    store.get(other.id)  # the untouched snapshot still loads


def test_deleted_data_file_is_reported(store: FeatureStore, digits: RawTable) -> None:
    snap = store.ingest(digits, region="eu-west-1", now=NOW)
    (store.data_dir / f"{snap.id.removeprefix('sha256:')}.npz").unlink()
    with pytest.raises(InvalidInputError, match="missing"):
        store.get(snap.id)


def test_unknown_snapshot_is_not_found(store: FeatureStore) -> None:
    with pytest.raises(NotFoundError):
        store.get("sha256:" + "0" * 64)


@pytest.mark.parametrize("bad_id", ["sha256:../../store.key", "0" * 64, "sha256:" + "A" * 64])
def test_path_traversal_through_a_snapshot_id_is_refused(store: FeatureStore, bad_id: str) -> None:
    with pytest.raises(InvalidInputError, match="expected 'sha256:<64 hex digits>'"):
        store.get(bad_id)


def test_unknown_parent_is_refused(store: FeatureStore, digits: RawTable) -> None:
    before = state(store)
    with pytest.raises(NotFoundError, match="parent"):
        store.ingest(digits, region="eu-west-1", parent="sha256:" + "1" * 64, now=NOW)
    assert state(store) == before


def _nan_feature(t: RawTable) -> RawTable:
    X = t.X.copy()
    X[3, 3] = np.nan
    return replace(t, X=X)


def _class_out_of_range(t: RawTable) -> RawTable:
    y = t.y.copy()
    y[0] = len(t.labels)
    return replace(t, y=y)


def _short_pii(t: RawTable) -> RawTable:
    return replace(t, pii={"customer_email": t.pii["customer_email"][:-1]})


def _pii_named_like_a_feature(t: RawTable) -> RawTable:
    return replace(t, pii={t.feature_names[0]: t.pii["customer_email"]})


def _no_rows(t: RawTable) -> RawTable:
    return replace(t, X=t.X[:0], y=t.y[:0], pii={})


@pytest.mark.parametrize(
    "corrupt",
    [_nan_feature, _class_out_of_range, _short_pii, _pii_named_like_a_feature, _no_rows],
    ids=lambda f: f.__name__.lstrip("_"),
)
def test_inconsistent_table_is_refused_before_anything_is_written(
    store: FeatureStore, wine_csv: RawTable, corrupt: object
) -> None:
    assert callable(corrupt)
    before = state(store)
    with pytest.raises(InvalidInputError):
        store.ingest(corrupt(wine_csv), region="eu-west-1", now=NOW)
    assert state(store) == before


def test_unknown_pii_action_and_naive_time_are_refused(
    store: FeatureStore, wine_csv: RawTable
) -> None:
    before = state(store)
    with pytest.raises(InvalidInputError, match="pii_action"):
        store.ingest(wine_csv, region="eu-west-1", pii_action="keep", now=NOW)
    with pytest.raises(InvalidInputError, match="time zone"):
        store.ingest(wine_csv, region="eu-west-1", now=NOW.replace(tzinfo=None))
    assert state(store) == before


# --- hostile CSV input ----------------------------------------------------------------------

GOOD_HEADER = "email,a,b,label\n"
GOOD_ROW = "x@example.com,1.5,2,cat\n"


@dataclass(frozen=True)
class CsvCase:
    name: str
    data: bytes
    error: str  # a regex the message must match
    label: str = "label"
    pii: tuple[str, ...] = ("email",)
    limits: CsvLimits = field(default_factory=CsvLimits)


def _csv(*lines: str) -> bytes:
    return "".join(lines).encode()


CSV_CASES = [
    CsvCase("empty_file", b"", "empty file"),
    CsvCase("whitespace_only", b" \n\n", "empty file"),
    CsvCase("byte_order_mark_only", b"\xef\xbb\xbf\n", "empty file"),
    CsvCase("header_only", _csv(GOOD_HEADER), "no data rows"),
    CsvCase("oversized_file", _csv(GOOD_HEADER, GOOD_ROW * 10), "the limit is 100",
            limits=CsvLimits(max_bytes=100)),
    CsvCase("too_many_columns", _csv(GOOD_HEADER, GOOD_ROW), "4 columns; the limit is 3",
            limits=CsvLimits(max_columns=3)),
    CsvCase("too_many_rows", _csv(GOOD_HEADER, GOOD_ROW * 3), "more than 2 data rows",
            limits=CsvLimits(max_rows=2)),
    CsvCase("non_numeric_feature", _csv(GOOD_HEADER, GOOD_ROW, "y@example.com,1,abc,dog\n"),
            r"line 3, column 'b': expected a number, got 'abc'"),
    CsvCase("empty_feature_cell", _csv(GOOD_HEADER, "y@example.com,,2,dog\n"),
            r"line 2, column 'a': expected a number"),
    CsvCase("nan_feature", _csv(GOOD_HEADER, "y@example.com,nan,2,dog\n"), "not a finite"),
    CsvCase("infinite_feature", _csv(GOOD_HEADER, "y@example.com,1,-inf,dog\n"), "not a finite"),
    CsvCase("float32_overflow", _csv(GOOD_HEADER, "y@example.com,1e39,2,dog\n"), "not a finite"),
    CsvCase("missing_label_column", _csv("email,a,b\n", "x@example.com,1,2\n"),
            "label column 'label' not in the header"),
    CsvCase("no_label_given", _csv(GOOD_HEADER, GOOD_ROW), "needs a label column", label=""),
    CsvCase("empty_label_value", _csv(GOOD_HEADER, "y@example.com,1,2,\n"), "empty label"),
    CsvCase("short_ragged_row", _csv(GOOD_HEADER, GOOD_ROW, "y@example.com,1,dog\n"),
            "line 3: 3 fields; the header has 4"),
    CsvCase("long_ragged_row", _csv(GOOD_HEADER, "y@example.com,1,2,dog,extra\n"),
            "line 2: 5 fields; the header has 4"),
    CsvCase("duplicate_column", _csv("email,a,a,label\n", GOOD_ROW), "names column 'a' twice"),
    CsvCase("unnamed_column", _csv("email,a,,label\n", GOOD_ROW), "column 3 has no name"),
    CsvCase("missing_pii_column", _csv(GOOD_HEADER, GOOD_ROW), r"PII column\(s\) \['phone'\]",
            pii=("email", "phone")),
    CsvCase("label_declared_pii", _csv(GOOD_HEADER, GOOD_ROW), "both the label and PII",
            pii=("email", "label")),
    CsvCase("no_feature_columns", _csv("email,label\n", "x@example.com,cat\n"),
            "no feature columns"),
    CsvCase("nul_byte", _csv(GOOD_HEADER, "x@exa\x00mple.com,1,2,cat\n"), "line 2: NUL"),
    CsvCase("unterminated_quote", _csv(GOOD_HEADER, 'x@example.com,1,2,"cat\n'), "not valid CSV"),
    CsvCase("oversized_field", _csv(GOOD_HEADER, "a" * 200_000, ",1,2,cat\n"), "not valid CSV"),
    CsvCase("not_utf8", GOOD_HEADER.encode() + b"\xff\xfe,1,2,cat\n", "not UTF-8"),
]  # fmt: skip


@pytest.mark.parametrize("case", CSV_CASES, ids=lambda c: c.name)
def test_hostile_csv_is_refused(
    store: FeatureStore, digits: RawTable, tmp_path: Path, case: CsvCase
) -> None:
    store.ingest(digits, region="eu-west-1", now=NOW)
    before = state(store)
    path = tmp_path / "hostile.csv"
    path.write_bytes(case.data)
    with pytest.raises(InvalidInputError, match=case.error):
        table = load_source(
            "csv:hostile.csv",
            label=case.label,
            pii=case.pii,
            base_dir=tmp_path,
            limits=case.limits,
        )
        store.ingest(table, region="eu-west-1", now=NOW)
    assert state(store) == before


def test_well_formed_csv_passes_the_same_checks(tmp_path: Path) -> None:
    """The hostile cases above differ from this accepted file in one way each."""
    (tmp_path / "ok.csv").write_bytes(
        _csv("\ufeff", GOOD_HEADER, GOOD_ROW, "\n", '"y@example.com",-3e2,"4",dog\n')
    )
    t = load_source("csv:ok.csv", label="label", pii=["email"], base_dir=tmp_path,
                    limits=CsvLimits(max_bytes=200, max_rows=2, max_columns=4))  # fmt: skip
    assert t.feature_names == ["a", "b"]
    assert t.X.tolist() == [[1.5, 2.0], [-300.0, 4.0]]
    assert (t.labels, t.y.tolist()) == (["cat", "dog"], [0, 1])
    assert t.pii["email"].tolist() == ["x@example.com", "y@example.com"]
    assert t.source == f"csv:{tmp_path / 'ok.csv'}"


@pytest.mark.parametrize("kind", ["directory", "fifo", "missing"])
def test_csv_source_that_is_not_a_regular_file_is_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "data.csv"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # opening must not block waiting for a writer
    with pytest.raises(InvalidInputError, match=r"not a regular file|no such file|cannot open"):
        load_source(f"csv:{path}", label="label", pii=[], base_dir=REPO)


@pytest.mark.parametrize(
    "source", ["digits", "sklearn:iris", "csv:", "https://example.com/x.csv", "parquet:x"]
)
def test_unknown_source_is_refused(source: str) -> None:
    with pytest.raises(InvalidInputError, match=r"source|data set"):
        load_source(source, label="label", pii=[], base_dir=REPO)


def test_catalog_lists_snapshots_as_json_ready_rows(store: FeatureStore, digits: RawTable) -> None:
    snap = store.ingest(digits, region="eu-west-1", now=NOW)
    rows = store.list()
    assert json.loads(json.dumps(rows)) == rows
    assert rows[0]["id"] == snap.id and rows[0]["source"] == "sklearn:digits"
