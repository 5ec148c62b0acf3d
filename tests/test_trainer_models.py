"""Models, structured pruning, ONNX export fidelity, determinism, resume after kill, DDP."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from tests.trainer_support import write_pipeline
from trainer.models import CNN, MLP, build, count_parameters, fit_scaler
from trainer.onnx_tools import export_onnx, run_onnx
from trainer.prune import prune
from trainer.tflite import export_tflite, run_tflite
from trainer.train import fit, predict_proba

BIN = Path(sys.executable).parent
MLP_SPEC = {"kind": "mlp", "features": 64, "hidden": [40, 30], "classes": 10}
CNN_SPEC = {"kind": "cnn", "features": 64, "hidden": [24], "classes": 10, "image": [8, 8],
            "channels": [8, 12]}


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    return d.data.astype(np.float32), d.target.astype(np.int64)


@pytest.mark.parametrize("spec", [MLP_SPEC, CNN_SPEC], ids=["mlp", "cnn"])
def test_pruning_really_removes_units(spec: dict) -> None:
    torch.manual_seed(0)
    model = build(spec)
    pruned, new_spec = prune(model, spec, 0.5)
    assert count_parameters(pruned) < 0.5 * count_parameters(model)
    if spec["kind"] == "mlp":
        assert new_spec["hidden"] == [20, 15]
        assert isinstance(pruned, MLP)
        assert [tuple(p.shape) for n, p in pruned.hidden.named_parameters() if "weight" in n] == [
            (20, 64), (15, 20)
        ]
        assert tuple(pruned.out.weight.shape) == (10, 15)
    else:
        assert new_spec["channels"] == [4, 6] and new_spec["hidden"] == [12]
        assert isinstance(pruned, CNN)
        assert tuple(pruned.convs.get_parameter("1.weight").shape) == (6, 4, 3, 3)
        assert tuple(pruned.fc.weight.shape) == (12, 6 * 16)
    # No masks: every remaining weight is a real parameter of a smaller tensor.
    assert not any("mask" in name for name, _ in pruned.named_buffers())
    # The pruned model rebuilds from its spec with the same shapes.
    rebuilt = build(new_spec)
    rebuilt.load_state_dict(pruned.state_dict())


@pytest.mark.parametrize("spec", [MLP_SPEC, CNN_SPEC], ids=["mlp", "cnn"])
def test_pruning_dead_units_keeps_outputs_exactly(spec: dict) -> None:
    """Units whose weights are zero contribute nothing: removing them changes no output."""
    torch.manual_seed(1)
    model = build(spec).eval()
    with torch.no_grad():
        if spec["kind"] == "mlp":
            assert isinstance(model, MLP)
            for name, param in model.hidden.named_parameters():
                param[::2] = 0  # half of each layer's units (rows and biases) are dead
                assert name.endswith(("weight", "bias"))
        else:
            assert isinstance(model, CNN)
            for param in model.convs.parameters():
                param[::2] = 0
            model.fc.weight[::2] = 0
            model.fc.bias[::2] = 0
    pruned, _ = prune(model, spec, 0.5)
    x = torch.randn(16, 64) * 5 + 8
    assert torch.allclose(model(x), pruned.eval()(x), atol=1e-5)


@pytest.mark.parametrize("spec", [MLP_SPEC, CNN_SPEC], ids=["mlp", "cnn"])
def test_onnx_export_matches_pytorch(spec: dict, tmp_path: Path,
                                     digits: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = digits
    torch.manual_seed(0)
    model = build(spec)
    fit_scaler(model, torch.as_tensor(X))
    fit(model, X[:500], y[:500], epochs=1, batch_size=64, lr=1e-3, seed=0)
    path = export_onnx(model, 64, tmp_path / "m.onnx")
    rows = X[1000:1200]
    assert np.abs(run_onnx(path, rows) - predict_proba(model, rows)).max() < 1e-5
    # Dynamic batch: one row and 64 rows both work.
    assert run_onnx(path, rows[:1]).shape == (1, 10)
    assert run_onnx(path, rows[:64], batch=64).shape == (64, 10)


def test_training_is_deterministic_for_a_seed(digits: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = digits

    def train() -> dict[str, torch.Tensor]:
        torch.manual_seed(3)
        model = build(MLP_SPEC)
        fit_scaler(model, torch.as_tensor(X))
        fit(model, X[:600], y[:600], epochs=2, batch_size=32, lr=1e-3, seed=3)
        return model.state_dict()

    a, b = train(), train()
    assert all(torch.equal(a[k], b[k]) for k in a)


class _Trainer:
    """`trainer train` as a subprocess whose progress lines can be awaited."""

    def __init__(self, pipeline: Path, workdir: Path) -> None:
        self.p = subprocess.Popen(
            [str(BIN / "trainer"), "train", str(pipeline), "--workdir", str(workdir)],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.p.stderr is not None
        for line in self.p.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, text: str) -> None:
        while True:
            line = self.lines.get(timeout=120)
            assert line is not None, f"trainer exited before {text!r}"
            if text in line:
                return


def _ingest(pipeline: Path, workdir: Path) -> None:
    subprocess.run([str(BIN / "trainer"), "ingest", str(pipeline), "--workdir", str(workdir)],
                   check=True, capture_output=True, timeout=120)


@pytest.mark.slow
def test_resume_after_kill_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    pipeline = write_pipeline(tmp_path, epochs=5, hidden="256, 256", store="../store")

    whole = tmp_path / "whole"
    _ingest(pipeline, whole)
    t = _Trainer(pipeline, whole)
    assert t.p.wait(timeout=300) == 0

    killed = tmp_path / "killed"
    _ingest(pipeline, killed)
    t = _Trainer(pipeline, killed)
    t.wait_for("epoch 2/5")  # epoch 2's checkpoint is on disk
    t.p.send_signal(signal.SIGKILL)
    t.p.wait(timeout=60)
    assert not (killed / "train" / "model.pt").exists()
    resumed = _Trainer(pipeline, killed)
    resumed.wait_for("resuming after epoch")
    assert resumed.p.wait(timeout=300) == 0

    a = torch.load(whole / "train" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(killed / "train" / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_process_torchrun_matches_single_process(tmp_path: Path) -> None:
    pipeline = write_pipeline(tmp_path, epochs=8, hidden="128", store="../store")
    single, double = tmp_path / "single", tmp_path / "double"
    for work in (single, double):
        _ingest(pipeline, work)
    subprocess.run([str(BIN / "trainer"), "train", str(pipeline), "--workdir", str(single)],
                   check=True, capture_output=True, timeout=300)
    r = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python",
         str(BIN / "trainer"), "train", str(pipeline), "--workdir", str(double)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    import json  # noqa: PLC0415

    info = json.loads((double / "train" / "train.json").read_text())
    assert info["world_size"] == 2
    for work in (single, double):
        subprocess.run([str(BIN / "trainer"), "evaluate", str(pipeline), "--workdir", str(work)],
                       check=True, capture_output=True, timeout=120)
    acc = {w.name: json.loads((w / "evaluate.json").read_text())["fp32"]["accuracy"]
           for w in (single, double)}
    assert abs(acc["single"] - acc["double"]) <= 0.01, acc


@pytest.mark.parametrize("spec", [MLP_SPEC, CNN_SPEC], ids=["mlp", "cnn"])
@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_tflite_export_matches_pytorch(spec: dict, int8: bool, tmp_path: Path,
                                       digits: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = digits
    torch.manual_seed(0)
    model = build(spec)
    fit_scaler(model, torch.as_tensor(X))
    fit(model, X[:1000], y[:1000], epochs=2, batch_size=64, lr=3e-3, seed=0)
    path = export_tflite(model, 64, tmp_path / "m.tflite", int8=int8)
    rows = X[1000:1130]  # two full batches of 64 and two single rows
    got, want = run_tflite(path, rows), predict_proba(model, rows)
    assert got.shape == want.shape == (130, 10)
    if int8:
        assert path.stat().st_size < 0.75 * export_tflite(model, 64, tmp_path / "f.tflite",
                                                         int8=False).stat().st_size
        assert (got.argmax(1) == want.argmax(1)).mean() >= 0.97
        assert np.abs(got - want).mean() < 0.02
    else:
        assert np.abs(got - want).max() < 1e-4
