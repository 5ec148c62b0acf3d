"""Bad model settings and hostile model files for the sklearn / torch / onnx kinds: each is one
`error:` line from the real CLI entry point (no traceback), naming what is wrong."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.trainer_support import write_kind_pipeline
from trainer import cli, onnx_graph

REPO = Path(__file__).resolve().parent.parent


def _error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], pipeline: Path) -> str:
    rc = cli.main(["run", str(pipeline), "--workdir", str(tmp_path / "work")])
    err = capsys.readouterr().err
    assert rc != 0
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _sk(model: str, *, task: str = "classification", source: str = "sklearn:wine",
        extra: str = "") -> dict[str, str]:
    return {"model": model, "task": task, "source": source, "extra": extra}


SKLEARN_CASES = [
    (_sk('kind = "sklearn"\nestimator = "os.system"'),
     ["model.estimator", "scikit-learn estimator class"]),
    (_sk('kind = "sklearn"\nestimator = "sklearn.ensemble.NoSuchForest"'),
     ["sklearn.ensemble has no estimator class 'NoSuchForest'"]),
    (_sk('kind = "sklearn"\nestimator = "sklearn.neighbors.NearestCentroid"'),
     ["cannot convert NearestCentroid", "skl2onnx"]),
    (_sk('kind = "sklearn"\nestimator = "sklearn.ensemble.RandomForestRegressor"'),
     ["RandomForestRegressor", "is not a classifier"]),
    (_sk('kind = "sklearn"\nestimator = "sklearn.ensemble.HistGradientBoostingClassifier"\n'
         "params = { max_iters = 10 }"),
     ["model.params.max_iters", "did you mean max_iter"]),
    (_sk('kind = "sklearn"\nestimator = "sklearn.ensemble.HistGradientBoostingClassifier"\n'
         "params = { learning_rate = -1 }"),
     ["model.params", "learning_rate"]),
    (_sk('kind = "sklearn"\nestimator = "sklearn.linear_model.LogisticRegression"',
         extra="prune = 0.5"),
     ["compress.prune = 0.5 does not apply", 'kind = "sklearn"']),
    (_sk('kind = "sklearn"'), ["model.estimator is required"]),
    (_sk('kind = "mlp"\nestimator = "sklearn.linear_model.LogisticRegression"'),
     ["model.estimator applies to model.kind = \"sklearn\" only"]),
    (_sk('kind = "mlp"', task="regression"),
     ["data.task = \"regression\"", "classification data set"]),
]


@pytest.mark.parametrize(("case", "words"), SKLEARN_CASES,
                         ids=[w[0][:40] for _, w in SKLEARN_CASES])
def test_bad_sklearn_settings_are_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: dict[str, str], words: list[str],
) -> None:
    pipeline = write_kind_pipeline(tmp_path, **case)
    line = _error_line(tmp_path, capsys, pipeline)
    for word in words:
        assert word in line, line


def test_tflite_is_refused_for_sklearn(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    pipeline = write_kind_pipeline(tmp_path, **_sk(
        'kind = "sklearn"\nestimator = "sklearn.linear_model.LogisticRegression"'))
    pipeline.write_text(pipeline.read_text() + '\n[export]\nformats = ["onnx", "tflite"]\n')
    line = _error_line(tmp_path, capsys, pipeline)
    assert "export.formats" in line and "tflite" in line
    assert not (tmp_path / "work" / ".steps").exists()


TORCH_CASES = {
    "raises-on-import": ("raise RuntimeError('no GPU here')\n", "build",
                         ["importing net.py raised RuntimeError: no GPU here"]),
    "raises-when-called": ("def build(f, o):\n    raise ValueError('bad width')\n", "build",
                           ["raised ValueError: bad width"]),
    "not-a-module": ("def build(f, o):\n    return [f, o]\n", "build",
                     ["returned list, not a torch.nn.Module"]),
    "no-function": ("x = 1\n", "build", ["has no function 'build'"]),
    "wrong-shape": ("from torch import nn\n\ndef build(f, o):\n    return nn.Linear(f, 7)\n",
                    "build", ["maps [2, 13] to [2, 7]", "expected [2, 3]"]),
    "missing-file": (None, "build", ["model.module", "no such file"]),
}


@pytest.mark.parametrize("case", sorted(TORCH_CASES))
def test_hostile_torch_modules_are_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str,
) -> None:
    source, function, words = TORCH_CASES[case]
    if source is not None:
        (tmp_path / "net.py").write_text(source)
    pipeline = write_kind_pipeline(tmp_path, source="sklearn:wine", task="classification",
                                   model=f'kind = "torch"\nmodule = "net.py:{function}"')
    line = _error_line(tmp_path, capsys, pipeline)
    for word in words:
        assert word in line, line


def _wine_onnx(directory: Path) -> Path:
    spec = importlib.util.spec_from_file_location("make_imported_onnx",
                                                  REPO / "examples/make_imported_onnx.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path: Path = module.make(directory)
    return path


def _onnx_pipeline(tmp_path: Path, *, path: str = "wine-logreg.onnx",
                   source: str = "sklearn:wine", more: str = "") -> Path:
    return write_kind_pipeline(tmp_path, source=source, task="classification",
                               model=f'kind = "onnx"\npath = "{path}"\n{more}')


def test_a_file_that_is_not_onnx(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "model.onnx").write_bytes(b"\x00GIF89a not a model at all" * 10)
    line = _error_line(tmp_path, capsys, _onnx_pipeline(tmp_path, path="model.onnx"))
    assert "model.path" in line and "not an ONNX model" in line


def test_a_missing_onnx_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _error_line(tmp_path, capsys, _onnx_pipeline(tmp_path, path="gone.onnx"))
    assert "model.path" in line and "gone.onnx" in line
    assert not (tmp_path / "work" / ".steps").exists()  # found in preflight


def test_an_onnx_file_over_the_size_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _wine_onnx(tmp_path)
    monkeypatch.setattr(onnx_graph, "MAX_ONNX_BYTES", 200)
    line = _error_line(tmp_path, capsys, _onnx_pipeline(tmp_path))
    assert "the limit is 200" in line


def test_an_onnx_model_for_other_features(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    _wine_onnx(tmp_path)  # 13 wine features; breast cancer has 30
    line = _error_line(tmp_path, capsys, _onnx_pipeline(tmp_path,
                                                        source="sklearn:breast_cancer"))
    assert "float_input" in line and "expected float [batch, 30]" in line


def test_an_onnx_output_name_that_is_not_there(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    _wine_onnx(tmp_path)
    line = _error_line(tmp_path, capsys, _onnx_pipeline(tmp_path, more='output = "scores"'))
    assert "no graph output named 'scores'" in line and "probabilities" in line


def test_an_onnx_output_that_does_not_fit_the_classes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    _wine_onnx(tmp_path)
    line = _error_line(tmp_path, capsys, _onnx_pipeline(tmp_path, more='output = "label"'))
    assert "no output fits float [batch, 3]" in line and "'label' int64" in line


def _external_model(model_dir: Path, location: str) -> Path:
    """A MatMul model [?, 13] -> [?, 3] whose weights live in external data at ``location``."""
    import numpy as np  # noqa: PLC0415
    import onnx  # noqa: PLC0415
    from onnx import helper, numpy_helper  # noqa: PLC0415

    model_dir.mkdir(parents=True, exist_ok=True)
    weights = numpy_helper.from_array(np.zeros((13, 3), dtype="float32"), "w")
    weights.ClearField("raw_data")
    weights.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "156")):
        entry = weights.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 13])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 3])],
        initializer=[weights])
    path = model_dir / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_external_data_outside_the_models_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "secret.bin").write_bytes(b"\x00" * 156)
    _external_model(tmp_path / "models", "../secret.bin")
    line = _error_line(tmp_path, capsys, _onnx_pipeline(tmp_path, path="models/m.onnx"))
    assert "'../secret.bin'" in line and "outside the model's folder" in line


def test_external_data_inside_the_models_folder_is_loaded(tmp_path: Path) -> None:
    import numpy as np  # noqa: PLC0415

    weights = np.arange(39, dtype="<f4").reshape(13, 3) / 100
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "weights.bin").write_bytes(weights.tobytes())
    _external_model(tmp_path / "models", "weights.bin")
    rc = cli.main(["run", str(_onnx_pipeline(tmp_path, path="models/m.onnx", more="")),
                   "--workdir", str(tmp_path / "work")])
    assert rc == 0
    from trainer.onnx_tools import run_onnx  # noqa: PLC0415

    rows = np.ones((2, 13), dtype=np.float32)
    # The bundle's model carries the weights inside it: no file next to it is needed.
    got = run_onnx(tmp_path / "work" / "bundle" / "model.onnx", rows)
    np.testing.assert_allclose(got, rows @ weights, atol=0.05)  # int8 may be kept
