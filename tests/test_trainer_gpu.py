"""The CUDA and NCCL training paths: collected only where a CUDA device exists (conftest)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer_support import write_pipeline

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.gpu


def _cuda_pipeline(tmp_path: Path) -> Path:
    pipeline = write_pipeline(tmp_path, epochs=5, hidden="256", store="../store")
    pipeline.write_text(pipeline.read_text().replace('device = "cpu"', 'device = "cuda"'))
    return pipeline


def _trainer(*args: str) -> None:
    subprocess.run([str(BIN / "trainer"), *args], check=True, capture_output=True, timeout=600)


def test_training_runs_on_cuda(tmp_path: Path) -> None:
    pipeline = _cuda_pipeline(tmp_path)
    work = tmp_path / "work"
    _trainer("ingest", str(pipeline), "--workdir", str(work))
    _trainer("train", str(pipeline), "--workdir", str(work))
    _trainer("evaluate", str(pipeline), "--workdir", str(work))
    info = json.loads((work / "train" / "train.json").read_text())
    assert info["device"].startswith("cuda")
    assert json.loads((work / "evaluate.json").read_text())["fp32"]["accuracy"] >= 0.9


@pytest.mark.gpu(devices=2)  # NCCL needs one GPU per process
def test_two_process_nccl_torchrun(tmp_path: Path) -> None:
    pipeline = _cuda_pipeline(tmp_path)
    work = tmp_path / "work"
    _trainer("ingest", str(pipeline), "--workdir", str(work))
    r = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python",
         str(BIN / "trainer"), "train", str(pipeline), "--workdir", str(work)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((work / "train" / "train.json").read_text())
    assert info["world_size"] == 2 and info["device"].startswith("cuda")
