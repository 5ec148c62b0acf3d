"""The sklearn, torch and onnx model kinds, for classification and regression, end to end on
scikit-learn's bundled data: each run ends in a signed bundle that the reference verifier
accepts, whose ONNX model answers what the original estimator / module answers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleetcore.bundle import parse_manifest
from tests.trainer_support import verify_bundle, write_kind_pipeline
from trainer.config import Pipeline
from trainer.onnx_tools import run_onnx
from trainer.pipeline import Run, Workdir

REPO = Path(__file__).resolve().parent.parent


def _run(pipeline: Path, workdir: Path) -> tuple[Run, dict[str, Any]]:
    run = Run(Pipeline.load(pipeline), Workdir(workdir), progress=lambda m: None)
    return run, run.run_all()


def _bundle(work: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    manifest = parse_manifest((work / "bundle" / "manifest.json").read_bytes())
    profile = json.loads((work / "bundle" / "profile.json").read_text())
    return manifest, profile


def _split(run: Run) -> Any:
    run2 = Run(run.pipeline, run.workdir, progress=lambda m: None)
    try:
        return run2.split()
    finally:
        run2.close()


def _make_imported() -> Any:
    spec = importlib.util.spec_from_file_location("make_imported_onnx",
                                                  REPO / "examples/make_imported_onnx.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- sklearn classification
HGB = """kind = "sklearn"
estimator = "sklearn.ensemble.HistGradientBoostingClassifier"
params = { max_iter = 30, max_leaf_nodes = 8 }"""


@pytest.fixture(scope="module")
def hgb(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Run, dict[str, Any]]:
    base = tmp_path_factory.mktemp("hgb")
    pipeline = write_kind_pipeline(base, source="sklearn:breast_cancer", task="classification",
                                   model=HGB)
    run, report = _run(pipeline, base / "work")
    return base, run, report


def test_sklearn_classifier_bundle_verifies_and_matches_predict_proba(
    hgb: tuple[Path, Run, dict[str, Any]],
) -> None:
    from sklearn.datasets import load_breast_cancer  # noqa: PLC0415
    from sklearn.ensemble import HistGradientBoostingClassifier  # noqa: PLC0415

    base, run, report = hgb
    work = base / "work"
    assert verify_bundle(work / "bundle", base / "publisher.pub").returncode == 0
    manifest, profile = _bundle(work)
    assert manifest["task"] == "classification"
    assert manifest["output"] == {"name": "probabilities", "kind": "probabilities",
                                  "labels": ["malignant", "benign"]}
    assert manifest["lineage"]["model_kind"] == "sklearn"
    assert manifest["lineage"]["estimator"] == "sklearn.ensemble.HistGradientBoostingClassifier"
    assert manifest["smoke_test"]["require_same_argmax"] is True
    assert profile["prediction"]["labels"] == ["malignant", "benign"]
    # Same estimator, same params and seed, same training rows: scikit-learn's answer.
    split = _split(run)
    est = HistGradientBoostingClassifier(max_iter=30, max_leaf_nodes=8, random_state=0)
    est.fit(split.X_train, split.y_train)
    X = load_breast_cancer().data.astype(np.float32)
    got = run_onnx(work / "bundle" / "model.onnx", X)
    # Tolerance: float32 tree thresholds and sums in ONNX Runtime vs float64 in scikit-learn.
    np.testing.assert_allclose(got, est.predict_proba(X), atol=1e-5)
    assert (got.argmax(1) == est.predict(X)).all()
    assert report["metrics"]["compressed"]["accuracy"] > 0.9
    recipe = report["compression"]
    assert recipe["prune"] == {"applies": False, "reason": recipe["prune"]["reason"]}
    assert recipe["quantize"]["applies"] is False
    assert "TreeEnsembleClassifier" in recipe["quantize"]["reason"]
    assert manifest["compression"] == recipe


def test_sklearn_unchanged_rerun_is_cached(hgb: tuple[Path, Run, dict[str, Any]]) -> None:
    base, _, _ = hgb
    run, _ = _run(base / "pipeline.toml", base / "work")
    assert set(run.outcomes.values()) == {"cached"}


# ---------------------------------------------------------------- sklearn regression
def test_sklearn_regressor_bundle(tmp_path: Path) -> None:
    from sklearn.datasets import load_diabetes  # noqa: PLC0415
    from sklearn.linear_model import Ridge  # noqa: PLC0415
    from sklearn.pipeline import make_pipeline  # noqa: PLC0415
    from sklearn.preprocessing import StandardScaler  # noqa: PLC0415

    pipeline = write_kind_pipeline(tmp_path, source="sklearn:diabetes", task="regression",
                                   model='kind = "sklearn"\n'
                                         'estimator = "sklearn.linear_model.Ridge"\n'
                                         "params = { alpha = 0.5 }")
    run, report = _run(pipeline, tmp_path / "work")
    work = tmp_path / "work"
    assert verify_bundle(work / "bundle", tmp_path / "publisher.pub").returncode == 0
    manifest, profile = _bundle(work)
    assert manifest["task"] == "regression"
    assert manifest["output"] == {"name": "prediction", "kind": "value", "shape": [-1, 1],
                                  "dtype": "float32", "target": "target"}
    smoke = manifest["smoke_test"]
    assert smoke["require_same_argmax"] is False
    assert smoke["atol"] == pytest.approx(max(1e-3, 1e-4 * 346.0))  # max |y| of diabetes
    assert np.asarray(smoke["expected"]).shape == (len(smoke["inputs"]), 1)
    for key in ("mae", "rmse", "r2"):
        assert key in manifest["metrics"]["fp32"] and key in manifest["metrics"]["compressed"]
    assert 30 < report["metrics"]["fp32"]["mae"] < 60 and report["metrics"]["fp32"]["r2"] > 0.3
    pred = profile["prediction"]
    assert pred["kind"] == "value" and len(pred["proportions"]) == len(pred["edges"]) + 1
    assert sum(pred["proportions"]) == pytest.approx(1.0)
    # Ridge is scale-sensitive: the StandardScaler is inside the graph; raw features in.
    assert report["model"]["scaled"] is True
    split = _split(run)
    ref = make_pipeline(StandardScaler(), __import__("sklearn.linear_model").linear_model
                        .Ridge(alpha=0.5)).fit(split.X_train, split.y_train)
    X = load_diabetes().data.astype(np.float32)
    got = run_onnx(work / "bundle" / "model.onnx", X)
    assert got.shape == (len(X), 1) and got.dtype == np.float32
    # float32 graph vs float64 scikit-learn on values of ~25..350: within 1e-3.
    np.testing.assert_allclose(got[:, 0], ref.predict(X), atol=1e-3)
    del Ridge


# ---------------------------------------------------------------- torch (user module)
NET = """
from torch import nn


def build(features, outputs):
    return nn.Sequential(nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                         nn.Linear(16, outputs))
"""


def test_torch_user_module_regression_matches_forward_and_reruns_on_edit(
    tmp_path: Path,
) -> None:
    import torch  # noqa: PLC0415

    from trainer.kinds.torchnet import load_model  # noqa: PLC0415
    from trainer.models import serving  # noqa: PLC0415

    (tmp_path / "nets").mkdir()
    (tmp_path / "nets" / "net.py").write_text(NET)
    pipeline = write_kind_pipeline(tmp_path, source="sklearn:diabetes", task="regression",
                                   model='kind = "torch"\nmodule = "nets/net.py:build"',
                                   extra='quantize = "none"')
    run, report = _run(pipeline, tmp_path / "work")
    work = tmp_path / "work"
    assert verify_bundle(work / "bundle", tmp_path / "publisher.pub").returncode == 0
    manifest, _ = _bundle(work)
    lineage = manifest["lineage"]
    assert lineage["model_kind"] == "torch" and lineage["module"] == "nets/net.py:build"
    import hashlib  # noqa: PLC0415

    assert lineage["module_sha256"] == hashlib.sha256(NET.encode()).hexdigest()
    # The defaults converge on diabetes (target standardized in training, mapped back in the
    # graph): clearly better than predicting the mean (R² 0).
    assert report["metrics"]["fp32"]["r2"] > 0.15
    model, spec = load_model(work / "train" / "model.pt")
    X = _split(run).X_test
    with torch.no_grad():
        want = serving(model, spec)(torch.as_tensor(X)).numpy()
    got = run_onnx(work / "bundle" / "model.onnx", X)
    np.testing.assert_allclose(got, want, atol=1e-3)  # values ~25..350, float32
    # Editing the user's file reruns train (and what follows), nothing before it.
    (tmp_path / "nets" / "net.py").write_text(NET.replace("32", "24"))
    run2, _ = _run(pipeline, work)
    assert run2.outcomes["ingest"] == "cached" and run2.outcomes["train"] == "ran"
    assert _bundle(work)[0]["lineage"]["module_sha256"] != lineage["module_sha256"]


def test_torch_user_module_classification_is_pruned_where_it_can_be(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text(NET + """

class Odd(nn.Module):
    def __init__(self, features, outputs):
        super().__init__()
        self.body = build(features, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, outputs)

    def forward(self, x):
        return self.head(self.norm(self.body(x)))


def odd(features, outputs):
    return Odd(features, outputs)
""")
    pipeline = write_kind_pipeline(tmp_path, source="sklearn:wine", task="classification",
                                   model='kind = "torch"\nmodule = "net.py:odd"',
                                   extra="prune = 0.5\nfinetune_epochs = 2")
    _, report = _run(pipeline, tmp_path / "work")
    prune = report["compression"]["prune"]
    assert prune["pruned_layers"] == ["net.body.0", "net.body.2"]
    skipped = {s["module"]: s["reason"] for s in prune["skipped"]}
    assert set(skipped) == {"net.norm", "net.head"}  # body.4 lost input columns only
    assert prune["parameters_after"] < prune["parameters_before"]
    assert report["checks"]["onnx_pruned_fp32"]["ok"]
    assert report["metrics"]["compressed"]["accuracy"] > 0.8
    assert verify_bundle(tmp_path / "work" / "bundle", tmp_path / "publisher.pub").returncode == 0


# ---------------------------------------------------------------- imported ONNX
def test_imported_onnx_bundle_matches_the_original_and_reruns_on_change(tmp_path: Path) -> None:
    from sklearn.datasets import load_wine  # noqa: PLC0415

    maker = _make_imported()
    maker.make(tmp_path)
    pipeline = write_kind_pipeline(tmp_path, source="sklearn:wine", task="classification",
                                   model='kind = "onnx"\npath = "wine-logreg.onnx"')
    _, report = _run(pipeline, tmp_path / "work")
    work = tmp_path / "work"
    assert verify_bundle(work / "bundle", tmp_path / "publisher.pub").returncode == 0
    manifest, _ = _bundle(work)
    import hashlib  # noqa: PLC0415

    digest = hashlib.sha256((tmp_path / "wine-logreg.onnx").read_bytes()).hexdigest()
    assert manifest["lineage"]["model_kind"] == "onnx"
    assert manifest["lineage"]["imported_onnx_sha256"] == digest
    import onnx  # noqa: PLC0415

    graph = onnx.load(str(work / "bundle" / "model.onnx")).graph
    assert [o.name for o in graph.output] == ["probabilities"]  # the label output is gone
    assert [i.name for i in graph.input] == ["input"]
    X = load_wine().data.astype(np.float32)
    np.testing.assert_allclose(run_onnx(work / "bundle" / "model.onnx", X),
                               maker.build_model().predict_proba(X), atol=1e-5)
    assert report["steps"]["train"] == "ran"
    # Another file at the same path: the import reruns.
    rerun, _ = _run(pipeline, work)
    assert set(rerun.outcomes.values()) == {"cached"}
    data = onnx.load(str(tmp_path / "wine-logreg.onnx"))
    data.producer_version = "changed"
    onnx.save(data, str(tmp_path / "wine-logreg.onnx"))
    rerun, _ = _run(pipeline, work)
    assert rerun.outcomes["train"] == "ran"


# ---------------------------------------------------------------- more estimators, int8 rule
@pytest.mark.parametrize("estimator", ["RandomForestRegressor", "HistGradientBoostingRegressor"])
def test_tree_regressors_match_predict(tmp_path: Path, estimator: str) -> None:
    from sklearn import ensemble  # noqa: PLC0415
    from sklearn.datasets import load_diabetes  # noqa: PLC0415

    params = {"RandomForestRegressor": {"n_estimators": 20, "max_depth": 5},
              "HistGradientBoostingRegressor": {"max_iter": 40}}[estimator]
    table = ", ".join(f"{k} = {v}" for k, v in params.items())
    pipeline = write_kind_pipeline(
        tmp_path, source="sklearn:diabetes", task="regression",
        model=f'kind = "sklearn"\nestimator = "sklearn.ensemble.{estimator}"\n'
              f"params = {{ {table} }}")
    run, report = _run(pipeline, tmp_path / "work")
    assert report["checks"]["onnx_vs_sklearn"]["ok"]
    split = _split(run)
    ref = getattr(ensemble, estimator)(random_state=0, **params).fit(split.X_train,
                                                                     split.y_train)
    X = load_diabetes().data.astype(np.float32)
    got = run_onnx(tmp_path / "work" / "bundle" / "model.onnx", X)
    # float32 thresholds and leaf sums in ONNX Runtime vs float64 in scikit-learn.
    np.testing.assert_allclose(got[:, 0], ref.predict(X), atol=1e-3)


def test_int8_is_tried_where_it_applies_and_kept_only_by_the_rule(tmp_path: Path) -> None:
    pipeline = write_kind_pipeline(
        tmp_path, source="sklearn:wine", task="classification",
        model='kind = "sklearn"\nestimator = "sklearn.neural_network.MLPClassifier"\n'
              "params = { hidden_layer_sizes = [32], max_iter = 300 }")
    _, report = _run(pipeline, tmp_path / "work")
    q = report["compression"]["quantize"]
    assert q["applies"] is True and "MatMul" in q["reason"]
    assert set(q["candidates"]) == {"none", "static-qdq", "dynamic"}
    assert q["calibration"]["rows"] == 128 and q["calibration"]["split"] == "train"
    c = q["candidates"]
    if q["mode"] != "none":  # kept only if faster than fp32 and within one accuracy point
        assert c[q["mode"]]["latency_us_batch64"] < c["none"]["latency_us_batch64"]
        assert c[q["mode"]]["accuracy_drop"] <= 0.01
    assert report["model"]["scaled"] is True  # a StandardScaler in front, inside the graph
    assert report["metrics"]["compressed"]["accuracy"] > 0.9


def test_csv_regression_source(tmp_path: Path) -> None:
    from fleetcore.errors import InvalidInputError  # noqa: PLC0415
    from trainer.sources import load_source  # noqa: PLC0415

    (tmp_path / "d.csv").write_text("a,b,wait_minutes\n1,2,3.5\n2,3,4.25\n3,4,-1e2\n")
    table = load_source("csv:d.csv", label="wait_minutes", pii=[], base_dir=tmp_path,
                        task="regression")
    assert table.task == "regression" and table.target == "wait_minutes"
    assert table.labels == [] and table.y.tolist() == [3.5, 4.25, -100.0]
    (tmp_path / "bad.csv").write_text("a,b,wait_minutes\n1,2,3.5\n2,3,late\n")
    with pytest.raises(InvalidInputError, match="line 3, column 'wait_minutes'"):
        load_source("csv:bad.csv", label="wait_minutes", pii=[], base_dir=tmp_path,
                    task="regression")
    with pytest.raises(InvalidInputError, match="regression data set"):
        load_source("sklearn:diabetes", label=None, pii=[], base_dir=tmp_path)


def test_imported_regression_model_with_a_flat_output(tmp_path: Path) -> None:
    """An ONNX regressor answering [batch] (not [batch, 1]), with two inputs' worth of names
    to pick from: reshaped to [batch, 1] under the manifest's name."""
    import onnx  # noqa: PLC0415
    from onnx import helper, numpy_helper  # noqa: PLC0415
    from sklearn.datasets import load_diabetes  # noqa: PLC0415

    data = load_diabetes()
    w = np.linalg.lstsq(np.c_[data.data, np.ones(len(data.data))], data.target, rcond=None)[0]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "w"], ["xw"]),
         helper.make_node("Add", ["xw", "b"], ["y"])], "linear",
        [helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, ["n", 10])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n"])],
        initializer=[numpy_helper.from_array(w[:10].astype(np.float32), "w"),
                     numpy_helper.from_array(np.asarray(w[10], dtype=np.float32), "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              str(tmp_path / "linear.onnx"))
    pipeline = write_kind_pipeline(tmp_path, source="sklearn:diabetes", task="regression",
                                   model='kind = "onnx"\npath = "linear.onnx"',
                                   extra='quantize = "none"')
    _, report = _run(pipeline, tmp_path / "work")
    manifest, profile = _bundle(tmp_path / "work")
    assert manifest["output"]["name"] == "prediction" and manifest["output"]["kind"] == "value"
    assert profile["prediction"]["kind"] == "value"
    X = data.data.astype(np.float32)
    got = run_onnx(tmp_path / "work" / "bundle" / "model.onnx", X)
    assert got.shape == (len(X), 1)
    np.testing.assert_allclose(got[:, 0], X @ w[:10].astype(np.float32) + w[10], rtol=1e-4,
                               atol=1e-2)
    assert report["metrics"]["fp32"]["r2"] > 0.3  # least squares, measured on the test split
    assert report["compression"]["quantize"]["mode"] == "none"
    assert verify_bundle(tmp_path / "work" / "bundle", tmp_path / "publisher.pub").returncode == 0


def test_torch_user_module_exports_tflite(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text(NET)
    pipeline = write_kind_pipeline(tmp_path, source="sklearn:diabetes", task="regression",
                                   model='kind = "torch"\nmodule = "net.py:build"')
    pipeline.write_text(pipeline.read_text() + '\n[export]\nformats = ["onnx", "tflite"]\n')
    _, report = _run(pipeline, tmp_path / "work")
    assert report["checks"]["tflite"]["ok"]
    manifest, _ = _bundle(tmp_path / "work")
    assert manifest["runtime"]["tflite"]["file"] == "model.tflite"
    # The smoke tolerance covers the TFLite file's distance from the model too.
    checks = report["checks"]
    assert manifest["smoke_test"]["atol"] >= min(
        checks["onnx_compressed"]["max_abs_diff"] + checks["tflite"]["max_abs_diff"],
        0.01 * 346.0)


def test_logistic_regression_with_its_capital_c(tmp_path: Path) -> None:
    from sklearn.datasets import load_wine  # noqa: PLC0415
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415
    from sklearn.pipeline import make_pipeline  # noqa: PLC0415
    from sklearn.preprocessing import StandardScaler  # noqa: PLC0415

    pipeline = write_kind_pipeline(
        tmp_path, source="sklearn:wine", task="classification",
        model='kind = "sklearn"\nestimator = "sklearn.linear_model.LogisticRegression"\n'
              "params = { C = 0.5, max_iter = 500 }")
    run, _ = _run(pipeline, tmp_path / "work")
    split = _split(run)
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=500,
                                                             random_state=0))
    ref.fit(split.X_train, split.y_train)
    X = load_wine().data.astype(np.float32)
    np.testing.assert_allclose(run_onnx(tmp_path / "work" / "bundle" / "model.onnx", X),
                               ref.predict_proba(X), atol=1e-5)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "examples/pipelines")
                                        .glob("*.toml")))
def test_example_pipelines_load(name: str) -> None:
    pipeline = Pipeline.load(REPO / "examples/pipelines" / name)
    assert pipeline.model.kind in ("mlp", "cnn", "sklearn", "torch", "onnx")
    if pipeline.model.kind == "torch":
        from trainer.kinds.user_module import module_file  # noqa: PLC0415

        assert module_file(pipeline.model.module or "", pipeline.base_dir).is_file()


def test_breast_cancer_example_runs(tmp_path: Path) -> None:
    from tests.trainer_support import write_publisher_key  # noqa: PLC0415

    key = write_publisher_key(tmp_path)
    run = Run(Pipeline.load(REPO / "examples/pipelines/breast-cancer-hgb.toml"),
              Workdir(tmp_path / "w"), publisher_key=key, progress=lambda m: None)
    report = run.run_all()
    assert report["metrics"]["compressed"]["accuracy"] >= 0.93
    assert verify_bundle(tmp_path / "w" / "bundle", tmp_path / "publisher.pub").returncode == 0


@pytest.mark.slow
def test_torch_user_module_trains_under_torchrun(tmp_path: Path) -> None:
    """The user's network goes through the same DDP path (gloo on CPU): two processes give
    a model as good as one."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    bin_dir = Path(sys.executable).parent
    (tmp_path / "net.py").write_text(NET)
    pipeline = write_kind_pipeline(tmp_path, source="sklearn:diabetes", task="regression",
                                   model='kind = "torch"\nmodule = "net.py:build"')
    pipeline.write_text(pipeline.read_text().replace('path = "store"', 'path = "../store"'))
    maes = {}
    for name, launcher in (("single", []), ("double", [
            str(bin_dir / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python"])):
        work = tmp_path / name
        for step in ("ingest", "train", "evaluate"):
            cmd = [str(bin_dir / "trainer"), step, str(pipeline), "--workdir", str(work)]
            r = subprocess.run([*launcher, *cmd] if step == "train" else cmd,
                               capture_output=True, text=True, timeout=300, check=False)
            assert r.returncode == 0, r.stderr[-3000:]
        maes[name] = json.loads((work / "evaluate.json").read_text())["fp32"]["mae"]
        info = json.loads((work / "train" / "train.json").read_text())
        assert info["world_size"] == (2 if name == "double" else 1)
    assert abs(maes["single"] - maes["double"]) <= 0.05 * maes["single"], maes
