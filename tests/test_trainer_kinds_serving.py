"""Bundles of the new model kinds, as the agent takes them: the smoke test passes in the
agent's isolated child, and the Open Inference Protocol answers over HTTP equal the original
scikit-learn estimator's / torch module's on the same rows."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from edge_agent.install.smoke import run_smoke_isolated
from edge_agent.serving import ServingCore, start_http
from fleetcore.bundle import parse_manifest
from tests.support import LoopThread
from tests.trainer_support import write_kind_pipeline
from trainer.config import Pipeline
from trainer.pipeline import Run, Workdir

REPO = Path(__file__).resolve().parent.parent

NET = """
from torch import nn


def build(features, outputs):
    return nn.Sequential(nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, outputs))
"""


def _train(base: Path, **kwargs: str) -> tuple[Path, Run]:
    pipeline = write_kind_pipeline(base, **kwargs)
    run = Run(Pipeline.load(pipeline), Workdir(base / "work"), progress=lambda m: None)
    run.run_all()
    fresh = Run(run.pipeline, run.workdir, progress=lambda m: None)
    return base / "work" / "bundle", fresh


class Served:
    def __init__(self, bundle: Path, name: str, prefer: str = "onnx") -> None:
        self.name = name
        self.loop = LoopThread()
        self.core = ServingCore(seed=0)
        self.core.set_model(name, [(1, 1.0, False)], {1: bundle}, prefer=prefer)
        self.server, port = self.loop.run(start_http(self.core, "127.0.0.1", 0))
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

    def infer(self, x: np.ndarray) -> dict[str, Any]:
        body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                            "data": x.astype(np.float32).tolist()}]}
        response = self.http.post(f"/v2/models/{self.name}/infer", json=body)
        assert response.status_code == 200, response.text
        out: dict[str, Any] = response.json()["outputs"][0]
        return out

    def stop(self) -> None:
        self.http.close()
        self.loop.run(self.server.stop())
        self.core.close()
        self.loop.close()


@pytest.fixture
def serve() -> Iterator[Any]:
    started: list[Served] = []

    def start(bundle: Path, prefer: str = "onnx") -> Served:
        served = Served(bundle, "kind-test", prefer)
        started.append(served)
        return served

    yield start
    for served in started:
        served.stop()


def _smoke(bundle: Path) -> None:
    manifest = parse_manifest((bundle / "manifest.json").read_bytes())
    result = run_smoke_isolated(bundle, manifest)
    assert result.ok, result


def test_sklearn_classifier_is_served_as_scikit_learn_answers(tmp_path: Path, serve: Any) -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier  # noqa: PLC0415

    bundle, run = _train(tmp_path, source="sklearn:breast_cancer", task="classification",
                         model='kind = "sklearn"\n'
                               'estimator = "sklearn.ensemble.HistGradientBoostingClassifier"\n'
                               "params = { max_iter = 30 }")
    _smoke(bundle)
    split = run.split()
    est = HistGradientBoostingClassifier(max_iter=30, random_state=0).fit(split.X_train,
                                                                        split.y_train)
    out = serve(bundle).infer(split.X_test)
    assert out["name"] == "probabilities" and out["shape"] == [len(split.X_test), 2]
    got = np.asarray(out["data"]).reshape(out["shape"])
    np.testing.assert_allclose(got, est.predict_proba(split.X_test), atol=1e-5)


def test_imported_onnx_is_served_as_the_original_answers(tmp_path: Path, serve: Any) -> None:
    spec = importlib.util.spec_from_file_location("make_imported_onnx",
                                                  REPO / "examples/make_imported_onnx.py")
    assert spec is not None and spec.loader is not None
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    maker.make(tmp_path)
    bundle, run = _train(tmp_path, source="sklearn:wine", task="classification",
                         model='kind = "onnx"\npath = "wine-logreg.onnx"')
    _smoke(bundle)
    X = run.split().X_test
    out = serve(bundle).infer(X)
    got = np.asarray(out["data"]).reshape(out["shape"])
    np.testing.assert_allclose(got, maker.build_model().predict_proba(X), atol=1e-5)


def test_torch_module_classifier_is_served_as_its_forward_answers(tmp_path: Path,
                                                                  serve: Any) -> None:
    import torch  # noqa: PLC0415

    from trainer.kinds.torchnet import load_model  # noqa: PLC0415
    from trainer.models import serving  # noqa: PLC0415

    (tmp_path / "net.py").write_text(NET)
    bundle, run = _train(tmp_path, source="sklearn:wine", task="classification",
                         model='kind = "torch"\nmodule = "net.py:build"',
                         extra='quantize = "none"')
    _smoke(bundle)
    model, model_spec = load_model(run.workdir.model)
    X = run.split().X_test
    with torch.no_grad():
        want = serving(model, model_spec)(torch.as_tensor(X)).numpy()
    out = serve(bundle).infer(X)
    np.testing.assert_allclose(np.asarray(out["data"]).reshape(out["shape"]), want, atol=1e-5)


@pytest.mark.parametrize("prefer", ["onnx", "tflite"])
def test_regression_bundles_are_served_with_their_values(tmp_path: Path, serve: Any,
                                                         prefer: str) -> None:
    import torch  # noqa: PLC0415

    from trainer.kinds.torchnet import load_model  # noqa: PLC0415
    from trainer.models import serving  # noqa: PLC0415
    (tmp_path / "net.py").write_text(NET)
    formats = '["onnx", "tflite"]' if prefer == "tflite" else '["onnx"]'
    bundle, run = _train(tmp_path, source="sklearn:diabetes", task="regression",
                         model='kind = "torch"\nmodule = "net.py:build"',
                         extra=f'quantize = "none"\n\n[export]\nformats = {formats}')
    _smoke(bundle)
    model, model_spec = load_model(run.workdir.model)
    X = run.split().X_test
    with torch.no_grad():
        want = serving(model, model_spec)(torch.as_tensor(X)).numpy()
    out = serve(bundle, prefer).infer(X)
    assert out["name"] == "prediction" and out["shape"] == [len(X), 1]
    np.testing.assert_allclose(np.asarray(out["data"]).reshape(-1, 1), want, atol=1e-2)
