"""The paired acceptance test on real data: McNemar's exact test (classification) and the
Wilcoxon signed-rank test on absolute errors (regression), with alpha and a minimum effect."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.trainer_support import write_kind_pipeline
from trainer import cli
from trainer.acceptance import decide


@pytest.fixture(scope="module")
def cancer() -> dict[str, Any]:
    """Held-out breast cancer rows and two real models' probabilities: a depth-1 tree
    (weak) and a scaled logistic regression (strong)."""
    from sklearn.datasets import load_breast_cancer  # noqa: PLC0415
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415
    from sklearn.model_selection import train_test_split  # noqa: PLC0415
    from sklearn.pipeline import make_pipeline  # noqa: PLC0415
    from sklearn.preprocessing import StandardScaler  # noqa: PLC0415
    from sklearn.tree import DecisionTreeClassifier  # noqa: PLC0415

    X, y = load_breast_cancer(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.4, random_state=0, stratify=y)
    weak = DecisionTreeClassifier(max_depth=1, random_state=0).fit(Xtr, ytr)
    strong = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(Xtr, ytr)
    return {"y": yte, "weak": weak.predict_proba(Xte), "strong": strong.predict_proba(Xte)}


@pytest.fixture(scope="module")
def diabetes() -> dict[str, Any]:
    from sklearn.datasets import load_diabetes  # noqa: PLC0415
    from sklearn.dummy import DummyRegressor  # noqa: PLC0415
    from sklearn.linear_model import LinearRegression  # noqa: PLC0415
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    X, y = load_diabetes(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.4, random_state=0)
    mean = DummyRegressor().fit(Xtr, ytr).predict(Xte).reshape(-1, 1)
    linear = LinearRegression().fit(Xtr, ytr).predict(Xte).reshape(-1, 1)
    return {"y": yte, "weak": mean, "strong": linear}


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_clearly_better_candidate_is_accepted(task: str, cancer: dict[str, Any],
                                              diabetes: dict[str, Any]) -> None:
    d = cancer if task == "classification" else diabetes
    doc = decide(task, d["weak"], d["strong"], d["y"], margin=0.0, data="held-out")
    assert doc["accepted"] is True and doc["p_value"] < 0.01
    assert doc["alpha"] == 0.05 and doc["rows"] == len(d["y"]) and doc["data"] == "held-out"
    assert doc["summary"].endswith(": accepted")
    if task == "classification":
        assert doc["test"] == "mcnemar-exact"
        assert doc["candidate_accuracy"] > doc["baseline_accuracy"]
        assert doc["candidate_only_correct"] > doc["baseline_only_correct"]
        assert doc["summary"].startswith(f"McNemar exact p={doc['p_value']:.3g} on "
                                         f"{len(d['y'])} rows")
    else:
        assert doc["test"] == "wilcoxon-signed-rank"
        assert doc["candidate_mae"] < doc["baseline_mae"]
        assert doc["mae_reduction"] == pytest.approx(doc["baseline_mae"] - doc["candidate_mae"])
    json.dumps(doc, allow_nan=False)  # acceptance.json is strict JSON


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_equal_and_worse_candidates_are_rejected(task: str, cancer: dict[str, Any],
                                                 diabetes: dict[str, Any]) -> None:
    d = cancer if task == "classification" else diabetes
    same = decide(task, d["strong"], d["strong"].copy(), d["y"], margin=0.0)
    assert same["accepted"] is False and same["p_value"] == 1.0
    worse = decide(task, d["strong"], d["weak"], d["y"], margin=0.0)
    assert worse["accepted"] is False and worse["p_value"] > 0.5
    assert "not significant" in worse["summary"]


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_margin_is_a_minimum_effect(task: str, cancer: dict[str, Any],
                                    diabetes: dict[str, Any]) -> None:
    d = cancer if task == "classification" else diabetes
    base = decide(task, d["weak"], d["strong"], d["y"], margin=0.0)
    effect = base["accuracy_gain"] if task == "classification" else base["mae_reduction"]
    below = decide(task, d["weak"], d["strong"], d["y"], margin=effect * 0.9)
    above = decide(task, d["weak"], d["strong"], d["y"], margin=effect * 1.1)
    assert below["accepted"] is True
    assert above["accepted"] is False and "gain below the margin" in above["summary"]
    assert above["p_value"] == base["p_value"]  # significant, just not by enough


def test_alpha_sets_the_significance(cancer: dict[str, Any]) -> None:
    # Flip a few of the strong model's answers into a small gain only.
    y, strong = cancer["y"], cancer["strong"]
    wrong = np.flatnonzero(strong.argmax(1) == y)[:4]
    base = strong.copy()
    base[wrong] = base[wrong][:, ::-1]
    doc = decide("classification", base, strong, y, margin=0.0, alpha=0.05)
    assert doc["candidate_only_correct"] == 4 and doc["baseline_only_correct"] == 0
    assert doc["p_value"] == pytest.approx(1 / 16)  # P(4 of 4 discordant | p = 1/2)
    assert doc["accepted"] is False
    assert decide("classification", base, strong, y, margin=0.0, alpha=0.1)["accepted"]


def test_retraining_run_writes_acceptance_with_alpha(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    pipeline = write_kind_pipeline(tmp_path, source="sklearn:diabetes", task="regression",
                                   model='kind = "sklearn"\n'
                                         'estimator = "sklearn.linear_model.Ridge"')
    work = tmp_path / "work"
    assert cli.main(["run", str(pipeline), "--workdir", str(work)]) == 0
    baseline = tmp_path / "current"
    (work / "bundle").rename(baseline)
    rc = cli.main(["run", str(pipeline), "--workdir", str(work), "--baseline", str(baseline),
                   "--margin", "1.5", "--alpha", "0.01"])
    out = capsys.readouterr().out
    assert rc == 0
    doc = json.loads((work / "acceptance.json").read_text())
    assert doc["test"] == "wilcoxon-signed-rank" and doc["alpha"] == 0.01
    assert doc["margin"] == 1.5 and doc["accepted"] is False  # the same model again
    assert doc["candidate_mae"] == pytest.approx(doc["baseline_mae"])
    assert doc["data"] == "the base test split (no device samples)"
    assert doc["summary"] in out


@pytest.mark.parametrize("alpha", ["0", "1", "x"])
def test_bad_alpha_is_refused(tmp_path: Path, alpha: str,
                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["run", "p.toml", "--workdir", str(tmp_path), "--alpha", alpha])
    assert "--alpha" in capsys.readouterr().err


def _samples(path: Path, X: np.ndarray, y: list[Any]) -> Path:
    path.write_text(json.dumps({"model": "diabetes", "rows": [
        {"device": "dev-1", "version": 1, "region": "eu-west", "features": X.tolist(),
         "labels": y}]}))
    return path


def test_regression_samples_are_numbers(tmp_path: Path) -> None:
    from sklearn.datasets import load_diabetes  # noqa: PLC0415

    from fleetcore.errors import InvalidInputError  # noqa: PLC0415
    from trainer.samples import load_samples  # noqa: PLC0415

    data = load_diabetes()
    names = [str(n) for n in data.feature_names]
    X = data.data[:5]
    kwargs: dict[str, Any] = {"feature_names": names, "labels": [], "pii": [],
                              "image_shape": None, "target": "target"}
    (group,) = load_samples(_samples(tmp_path / "s.json", X, [151.0, 75, 141.5, 206, 135]),
                            **kwargs)
    assert group.table.y.dtype == np.float64 and group.table.target == "target"
    assert group.table.y.tolist() == [151.0, 75.0, 141.5, 206.0, 135.0]
    for bad in ([True, 1, 2, 3, 4], ["151", 1, 2, 3, 4]):
        with pytest.raises(InvalidInputError, match="finite numbers"):
            load_samples(_samples(tmp_path / "bad.json", X, bad), **kwargs)


def test_regression_retraining_is_judged_on_the_device_samples(tmp_path: Path) -> None:
    """Devices see the target shifted up by 60: a model retrained with their samples beats
    the current one on the held-out samples, by the paired test."""
    from sklearn.datasets import load_diabetes  # noqa: PLC0415

    data = load_diabetes()
    rng = np.random.default_rng(0)
    rows = rng.choice(len(data.target), 300, replace=False)
    samples = _samples(tmp_path / "samples.json", data.data[rows].astype(np.float32),
                       (data.target[rows] + 60.0).tolist())
    pipeline = write_kind_pipeline(tmp_path, source="sklearn:diabetes", task="regression",
                                   model='kind = "sklearn"\n'
                                         'estimator = "sklearn.linear_model.Ridge"')
    assert cli.main(["run", str(pipeline), "--workdir", str(tmp_path / "v1")]) == 0
    assert cli.main(["run", str(pipeline), "--workdir", str(tmp_path / "v2"), "--samples",
                     str(samples), "--baseline", str(tmp_path / "v1" / "bundle"),
                     "--margin", "5"]) == 0
    doc = json.loads((tmp_path / "v2" / "acceptance.json").read_text())
    assert doc["data"] == "held-out device samples" and doc["rows"] == 60
    assert doc["accepted"] is True, doc["summary"]
    assert doc["baseline_mae"] - doc["candidate_mae"] >= 5
