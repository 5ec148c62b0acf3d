"""A scikit-learn estimator (``[model] kind = "sklearn"``): trained on the snapshot's training
split and converted to ONNX with skl2onnx.

``estimator`` names a class inside scikit-learn (the config refuses any other module, so a
pipeline file cannot import arbitrary code this way); ``params`` are its keyword arguments;
``random_state`` defaults to ``[train] seed`` where the estimator takes one. Estimators that are
sensitive to feature scale (modules linear_model, svm, neighbors, neural_network) are wrapped in
an sklearn Pipeline behind a StandardScaler, so the scaling is inside the exported graph too.
Classifiers are converted with ``zipmap=False`` and keep only the probabilities output.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fleetcore.errors import InvalidInputError
from trainer import metrics
from trainer.kinds.onnx_family import OnnxFamily

if TYPE_CHECKING:
    from trainer.config import Pipeline
    from trainer.kinds.base import RunContext as Run

__all__ = ["SCALED_MODULES", "SklearnKind", "estimator_class", "fit_estimator", "to_onnx"]

SCALED_MODULES = ("sklearn.linear_model", "sklearn.svm", "sklearn.neighbors",
                  "sklearn.neural_network")
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}


def estimator_class(path: str, task: str) -> type:
    """The class named by ``path`` (inside scikit-learn), checked to fit ``task``."""
    from sklearn.base import BaseEstimator, is_classifier, is_regressor

    where = f"model.estimator = {path!r}"
    if not path.startswith("sklearn."):
        raise InvalidInputError(f"{where}: only scikit-learn classes are allowed")
    module_name, _, name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise InvalidInputError(f"{where}: no module {module_name!r} in scikit-learn") from None
    cls = getattr(module, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, BaseEstimator)):
        raise InvalidInputError(f"{where}: {module_name} has no estimator class {name!r}")
    probe = cls()
    fits = is_classifier(probe) if task == "classification" else is_regressor(probe)
    if not fits:
        what = "classifier" if task == "classification" else "regressor"
        raise InvalidInputError(f"{where} is not a {what} (data.task = {task!r})")
    _check_convertible(cls, path)
    return cls


def _check_convertible(cls: type, path: str) -> None:
    import skl2onnx
    from skl2onnx._supported_operators import sklearn_operator_name_map

    if cls not in sklearn_operator_name_map:
        raise InvalidInputError(
            f"model.estimator = {path!r}: skl2onnx {skl2onnx.__version__} cannot convert "
            f"{cls.__name__} to ONNX; pick an estimator it supports (e.g. "
            "HistGradientBoostingClassifier, RandomForestRegressor, LogisticRegression)"
        )


def fit_estimator(path: str, params: dict[str, Any], task: str, X: np.ndarray, y: np.ndarray,
                  *, seed: int) -> Any:
    """The estimator (inside a scaling Pipeline where SCALED_MODULES says) fitted on X, y."""
    from sklearn.pipeline import Pipeline as SkPipeline
    from sklearn.preprocessing import StandardScaler

    cls = estimator_class(path, task)
    known = cls().get_params(deep=False)
    for key in params:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            raise InvalidInputError(
                f"model.params.{key} is not a parameter of {cls.__name__}"
                + (f" (did you mean {close[0]}?)" if close else "")
            )
    kwargs = dict(params)
    if "random_state" in known and "random_state" not in kwargs:
        kwargs["random_state"] = seed
    try:
        est = cls(**kwargs)
        model = SkPipeline([("scale", StandardScaler()), ("model", est)]) \
            if path.startswith(SCALED_MODULES) else est
        model.fit(X, y)
    except (ValueError, TypeError) as exc:
        raise InvalidInputError(f"model.params: {cls.__name__} refused them: {exc}") from None
    return model


def _patch_tree_ensemble() -> None:
    """skl2onnx 1.20 passes a Python bool for the leaves' ``nodes_missing_value_tracks_true``
    of a HistGradientBoosting tree, which current protobuf refuses in an ints attribute
    ("Expected an int, got a boolean"); hand it the integer ONNX wants."""
    from skl2onnx.common import tree_ensemble

    add_node = tree_ensemble.add_node
    if getattr(add_node, "_edgefleet_int_missing", False):
        return

    def fixed(*args: Any, **kwargs: Any) -> Any:
        if "nodes_missing_value_tracks_true" in kwargs:
            kwargs["nodes_missing_value_tracks_true"] = int(
                kwargs["nodes_missing_value_tracks_true"])
        return add_node(*args, **kwargs)

    fixed._edgefleet_int_missing = True  # type: ignore[attr-defined]
    tree_ensemble.add_node = fixed


def to_onnx(model: Any, features: int, task: str) -> Any:
    """The fitted estimator as an ONNX ModelProto (raw float features ``input`` in)."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    from trainer.onnx_tools import INPUT_NAME

    _patch_tree_ensemble()
    final = model.steps[-1][1] if hasattr(model, "steps") else model
    options = {type(final): {"zipmap": False}} if task == "classification" else None
    try:
        return convert_sklearn(model, initial_types=[(INPUT_NAME, FloatTensorType([None,
                                                                                    features]))],
                               options=options, target_opset=TARGET_OPSET)
    except Exception as exc:
        raise InvalidInputError(f"skl2onnx cannot convert {type(final).__name__}: "
                                f"{type(exc).__name__}: {str(exc)[:200]}") from None


def reference_output(model: Any, X: np.ndarray, task: str) -> np.ndarray:
    """What scikit-learn itself answers: predict_proba, or predict as [n, 1]."""
    if task == "classification":
        return np.asarray(model.predict_proba(X), dtype=np.float64)
    return np.asarray(model.predict(X), dtype=np.float64).reshape(-1, 1)


class SklearnKind(OnnxFamily):
    def fingerprint(self, pipeline: Pipeline) -> Any:
        return None  # the estimator and its params are in the [model] section

    def preflight(self, pipeline: Pipeline) -> None:
        return None

    def train(self, run: Run, key: str) -> None:
        import onnx

        from trainer import onnx_tools
        from trainer.onnx_graph import normalize

        m, t = run.pipeline.model, run.pipeline.train
        snap, split = run.snapshot(), run.split()
        assert m.estimator is not None
        features, classes = len(snap.feature_names), len(snap.labels)
        run.progress(f"[train] {m.estimator} on {len(split.y_train)} rows")
        model = fit_estimator(m.estimator, m.params, run.task, split.X_train, split.y_train,
                              seed=t.seed)
        proto, _, _ = normalize(to_onnx(model, features, run.task), task=run.task,
                                features=features, classes=classes, input_name=None,
                                output_name=None, out_name=onnx_tools.output_name(run.task),
                                where=m.estimator)
        path = self.model_onnx(run)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(proto, str(path))
        rows = split.X_test[: run.pipeline.export.check_rows]
        want = reference_output(model, rows, run.task)
        got = onnx_tools.run_onnx(path, rows)
        check = run.compare(got, want, run.tolerances()["converted"])
        run.write_json(run.workdir.train_json, {
            "estimator": m.estimator, "params": m.params,
            "scaled": m.estimator.startswith(SCALED_MODULES),
            "sklearn_test_metrics": metrics.measure(run.task,
                                                    reference_output(model, split.X_test,
                                                                     run.task), split.y_test),
            "checks": {"onnx_vs_sklearn": check},
            "onnx_bytes": Path(path).stat().st_size,
        })
        if not check["ok"]:
            raise InvalidInputError(f"the ONNX conversion of {m.estimator} does not match "
                                    f"scikit-learn: {check}")

    def lineage(self, run: Run) -> dict[str, Any]:
        return {"model_kind": "sklearn", "estimator": run.pipeline.model.estimator}

    def describe(self, run: Run) -> dict[str, Any]:
        train = run.read_json(run.workdir.train_json)
        return {"kind": "sklearn", "estimator": train["estimator"], "params": train["params"],
                "scaled": train["scaled"], "sklearn_test_metrics": train["sklearn_test_metrics"]}
