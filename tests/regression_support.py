"""A signed regression bundle for the loop's tests (issue 14's manifest/profile contract).

A scikit-learn ``Ridge`` fitted on the bundled diabetes data, converted with skl2onnx to a
float32 ``[n, 1]`` output, with the manifest and profile the trainer writes for regression.
Small on purpose: once the trainer builds regression bundles, its output replaces this.
"""

from __future__ import annotations

import datetime as dt
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_diabetes
from sklearn.linear_model import Ridge

from trainer.bundle import build_bundle
from trainer.profile import PROFILE_FORMAT, feature_bins
from trainer.tflite import INPUT_KEY, OUTPUT_KEY, SIGNATURES

__all__ = ["RegressionBundle", "diabetes_split", "regression_bundle"]

BINS = 10


@dataclass(frozen=True)
class RegressionBundle:
    path: Path
    model: Ridge
    X_test: np.ndarray  # float32 rows the model never saw
    y_test: np.ndarray  # their true targets (float64)


def diabetes_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    data = load_diabetes()
    X, y = data.data.astype(np.float32), data.target.astype(np.float64)
    order = np.random.default_rng(0).permutation(len(X))
    train, test = order[:340], order[340:]
    return X[train], y[train], X[test], y[test], list(data.feature_names)


def regression_bundle(out: Path, private_key: Path, *, name: str = "diabetes",
                      version: int = 1, alpha: float = 0.1, shift: float = 0.0,
                      output: str = "prediction", tflite: bool = False) -> RegressionBundle:
    """Fit, convert and sign. ``shift`` is added to every prediction (a deliberately worse
    model); ``alpha`` is Ridge's regularization. ``tflite``: also a model.tflite (the same
    linear model as a torch ``nn.Linear``, converted with litert-torch)."""
    X_train, y_train, X_test, y_test, names = diabetes_split()
    model = Ridge(alpha=alpha).fit(X_train, y_train)
    model.intercept_ = float(model.intercept_) + shift
    onx = convert_sklearn(model, initial_types=[("input", FloatTensorType([None, len(names)]))],
                          final_types=[(output, FloatTensorType([None, 1]))],
                          target_opset=17)
    work = out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    onnx_path = work / "model.onnx"
    onnx_path.write_bytes(onx.SerializeToString())
    tflite_path = _tflite(model, len(names), work / "model.tflite") if tflite else None
    predicted = model.predict(X_train).astype(np.float32)
    smoke = X_test[:8]
    bound = float(np.abs(y_train).max())
    manifest: dict[str, Any] = {
        "name": name,
        "version": version,
        "task": "regression",
        "input": {"name": "input", "dtype": "float32", "shape": [-1, len(names)],
                  "features": [{"name": n, "dtype": "float32", "pii": False} for n in names],
                  "pii_columns": []},
        "output": {"name": output, "kind": "value", "shape": [-1, 1], "dtype": "float32",
                   "target": "target"},
        "metrics": {"fp32": _metrics(model.predict(X_test), y_test),
                    "compressed": _metrics(model.predict(X_test), y_test)},
        "lineage": {"model_kind": "sklearn", "estimator": "sklearn.linear_model.Ridge"},
        "compression": {},
        "runtime": {"onnx": {"file": "model.onnx", "intra_op_num_threads": 1},
                    "tflite": {"file": "model.tflite", "signatures": SIGNATURES,
                               "input": INPUT_KEY, "output": OUTPUT_KEY} if tflite else None,
                    "preferred": "onnx"},
        "smoke_test": {"file": "model.onnx", "inputs": smoke.astype(float).tolist(),
                       "expected": [[float(v)] for v in model.predict(smoke)],
                       "atol": max(1e-3, 1e-4 * bound), "require_same_argmax": False},
    }
    build_bundle(out, manifest=manifest, onnx_model=onnx_path,
                 profile=_profile(X_train, names, predicted), private_key=private_key,
                 tflite_model=tflite_path,
                 now=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    return RegressionBundle(out, model, X_test, y_test)


def _tflite(model: Ridge, features: int, path: Path) -> Path:
    import torch  # noqa: PLC0415 (only for the bundles that carry a model.tflite)

    linear = torch.nn.Linear(features, 1)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(model.coef_, dtype=torch.float32).reshape(1, -1))
        linear.bias.fill_(float(model.intercept_))
    # Not trainer.tflite.export_tflite: that one puts a softmax on top (classifiers' output).
    converter: Any = importlib.import_module("litert_torch")
    for signature, batch in SIGNATURES.items():
        converter = converter.signature(signature, linear.eval(), (torch.zeros(batch, features),))
    converter.convert().export(str(path))
    return path


def _metrics(predicted: np.ndarray, y: np.ndarray) -> dict[str, float]:
    err = predicted - y
    return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err**2).mean())),
            "r2": float(1 - (err**2).sum() / ((y - y.mean()) ** 2).sum())}


def _profile(X: np.ndarray, names: list[str], predicted: np.ndarray) -> dict[str, Any]:
    features = []
    for j, n in enumerate(names):
        edges, proportions = feature_bins(X[:, j], BINS)
        col = X[:, j]
        features.append({"name": n, "edges": edges, "proportions": proportions,
                         "mean": float(col.mean()), "std": float(col.std()),
                         "min": float(col.min()), "max": float(col.max())})
    edges, proportions = feature_bins(predicted, BINS)
    return {
        "format": PROFILE_FORMAT, "rows": len(X), "bins": BINS, "features": features,
        "reference_sample": {"rows": X[:64].astype(float).tolist()},
        "prediction": {"kind": "value", "edges": edges, "proportions": proportions,
                       "mean": float(predicted.mean()), "std": float(predicted.std()),
                       "min": float(predicted.min()), "max": float(predicted.max())},
    }
