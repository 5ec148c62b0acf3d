"""Tables as businesses have them (trainer/ingest/table.py) and their other half on the
agent (edge_agent/serving/categorical.py): missing values, categories, a timestamp, types
checked with the column and row named; vocabularies that only grow along a chain."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from edge_agent.serving.categorical import clamp, encode, from_manifests
from edge_agent.serving.errors import BadRequestError
from fleetcore.errors import InvalidInputError
from trainer.ingest.table import Encoding, TableSpec, build_table
from trainer.ingest.urls import check_source, redact

SPEC = TableSpec(task="classification", label="label", categorical=("shop",),
                 timestamp="at", impute={"*": "mean", "b": "zero"})


def _columns(**extra: list[object]) -> dict[str, list[object]]:
    return {"at": ["2026-01-02T00:00:00", "2026-01-01T00:00:00", "2026-01-03T00:00:00"],
            "a": [1.0, None, 3.0], "b": ["2", "", 4], "shop": ["x", None, "y"],
            "label": ["no", "yes", "no"], **extra}


def _build(columns: dict[str, list[object]], spec: TableSpec = SPEC,
           prior: Encoding | None = None, prior_labels: tuple[str, ...] = ()) -> Any:
    return build_table(columns, spec, where="src", source="src", source_digest="d",
                       prior=prior, prior_labels=prior_labels)


def test_missing_values_categories_and_timestamp() -> None:
    table, enc, stamps = _build(_columns())
    assert table.feature_names == ["a", "b", "shop"]  # the timestamp is not a feature
    np.testing.assert_array_equal(table.X, [[1, 2, 1], [2, 0, 0], [3, 4, 2]])
    assert enc.fill == {"a": 2.0, "b": 0.0}
    assert enc.categories == {"shop": ["x", "y"]}
    assert table.labels == ["no", "yes"] and table.y.tolist() == [0, 1, 0]
    assert stamps is not None and stamps[1] == datetime(2026, 1, 1, tzinfo=UTC).timestamp()


def test_a_later_snapshot_keeps_codes_and_fill_values() -> None:
    _, first, _ = _build(_columns())
    columns = _columns(shop=["z", "y", "a"], a=[None, 10.0, 20.0])
    table, enc, _ = _build(columns, prior=first, prior_labels=("maybe", "no", "yes"))
    assert enc.categories == {"shop": ["x", "y", "a", "z"]}  # new ones appended, sorted
    np.testing.assert_array_equal(table.X[:, 2], [4, 2, 3])
    assert table.X[0, 0] == 2.0  # the chain's fill value, not this batch's mean
    assert table.labels == ["maybe", "no", "yes"]


@pytest.mark.parametrize(("change", "message"), [
    ({"a": [1.0, "heavy", 3.0]}, r"column 'a', row 2: expected a number, got 'heavy'"),
    ({"label": ["no", None, "no"]}, r"column 'label', row 2: missing label"),
    ({"a": [1.0, float("inf"), 3.0]}, r"column 'a', row 2: .* not a finite float32"),
    ({"at": ["2026-01-01", "noon", "2026-01-02"]}, r"column 'at', row 2: 'noon' is not an ISO"),
    ({"b": [1, [2], 3]}, r"column 'b', row 2: expected a number, got list"),
])
def test_types_are_checked_with_column_and_row(change: dict[str, list[object]],
                                               message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        _build(_columns(**change))


def test_missing_values_without_a_strategy_are_refused_with_a_hint() -> None:
    spec = TableSpec(task="classification", label="label", categorical=("shop",), timestamp="at")
    with pytest.raises(InvalidInputError, match=r"column 'a', row 2: missing value; set "
                                                r"data.impute"):
        _build(_columns(), spec)


def test_regression_label_and_strategies() -> None:
    spec = TableSpec(task="regression", label="y", impute={"a": "median", "b": "most_frequent"})
    table, enc, _ = _build({"a": [1.0, 5.0, None, 2.0], "b": [3, 3, None, 1],
                            "y": [0.5, 1.5, 2.5, 3.5]}, spec)
    assert enc.fill == {"a": 2.0, "b": 3.0} and table.target == "y"
    np.testing.assert_array_equal(table.y, [0.5, 1.5, 2.5, 3.5])


def test_urls_are_checked_and_redacted() -> None:
    assert check_source("postgresql://root@db:5432/sales") == "sql"
    assert check_source("postgresql+psycopg://root@db:5432/sales") == "sql"
    assert check_source("https://api.example/rows") == "http"
    assert check_source("nats://127.0.0.1:4222/till.rows") == "stream"
    assert check_source("mqtt://127.0.0.1:1883/#") == "stream"  # MQTT's wildcard, not a fragment
    assert redact("mqtt://h/sensors/#") == "mqtt://h/sensors/#"
    for bad, why in [("postgresql://u:pw@db/x", "password_env"), ("mqtt://host:1883", "topic"),
                     ("ftp://host/x", "unknown kind"), ("postgresql://db:99999/x", "port")]:
        with pytest.raises(InvalidInputError, match=why) as exc:
            check_source(bad)
        assert "pw@" not in str(exc.value)
    assert redact("https://u:pw@api.example/x?api_key=abc&page=2") == \
        "https://u:REDACTED@api.example/x?api_key=REDACTED&page=2"


def _manifest(*vocab: str | None) -> dict[str, Any]:
    features: list[dict[str, Any]] = [{"name": "n", "dtype": "float32"}]
    if vocab != (None,):
        features.append({"name": "shop", "dtype": "float32", "categories": list(vocab)})
    return {"input": {"features": features}}


def test_agent_encodes_raw_values_with_the_longest_vocabulary() -> None:
    categories, clamps = from_manifests("m", {1: _manifest("x", "y"),
                                              2: _manifest("x", "y", "z")})
    assert categories is not None and clamps == {1: {1: 2}}
    x = encode(["1.5", "z", 2, None, 3, "never-seen"], 3, categories)
    np.testing.assert_array_equal(x, [[1.5, 3], [2, 0], [3, 0]])
    np.testing.assert_array_equal(clamp(x, clamps[1])[:, 1], [0, 0, 0])  # v1 never saw z
    with pytest.raises(BadRequestError, match=r"row 0, feature 0: expected a number"):
        encode(["heavy", "x"], 1, categories)
    with pytest.raises(InvalidInputError, match="prefix"):
        from_manifests("m", {1: _manifest("x", "y"), 2: _manifest("y", "x")})
    assert from_manifests("m", {1: _manifest(None)}) == (None, {})
    assert Encoding.from_json(Encoding(categories={"s": ["a"]}, fill={"a": 1}).to_json()) \
        == Encoding(categories={"s": ["a"]}, fill={"a": 1.0})
