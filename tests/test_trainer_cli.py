"""`trainer` on the command line: a bad pipeline file or a missing input is one `error:` line
(no traceback) found before any step runs; a cached rerun imports no ML library."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer_support import write_pipeline
from trainer import cli

HEAVY = ("torch", "sklearn", "onnx", "onnxruntime")

# Runs the real CLI in a fresh interpreter, then reports which heavy modules it imported.
WRAPPER = f"""
import json, sys
from trainer.cli import main
rc = main(sys.argv[1:])
print(json.dumps({{"rc": rc, "imported": sorted(m for m in {HEAVY!r} if m in sys.modules)}}))
"""


def _trainer(*argv: str | Path, cwd: Path | None = None,
             **extra_env: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "EDGEFLEET_PUBLISHER_KEY"} | extra_env
    return subprocess.run([sys.executable, "-c", WRAPPER, *map(str, argv)], capture_output=True,
                          text=True, timeout=600, check=False, env=env, cwd=cwd)


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def _edit(pipeline: Path, old: str, new: str) -> None:
    text = pipeline.read_text()
    assert old in text, old
    pipeline.write_text(text.replace(old, new))


# (what to replace in tests/trainer_support.SMALL_DIGITS, with what, words the error must hold)
BAD_VALUES = [
    ('device = "cpu"', 'device = "gpu"', ["train.device", "'cpu'"]),
    ("test_fraction = 0.2", 'test_fraction = "0.2"', ["data.test_fraction", "without quotes"]),
    ("hidden = [64]", "hidden = 128", ["model.hidden", "[128]"]),
    ("epochs = 3", "epochs = -1", ["train.epochs", "out of range", "1..10000"]),
    ("epochs = 3", "epochs = 2.5", ["train.epochs", "an integer"]),
    ("lr = 0.003", "lr = true", ["train.lr", "a boolean"]),
    ("prune = 0.5", "prune = 1.0", ["compress.prune", "[0, 1)"]),
    ('quantize = "int8"', 'quantize = "int4"', ["compress.quantize", "'int8'"]),
    ('formats = ["onnx"]', 'formats = ["tflite"]', ["export.formats", "onnx"]),
    ("channels = [8, 16]", 'channels = [8, "16"]', ["model.channels", "not an integer"]),
    ("bins = 10", "bins = 1", ["profile.bins", "2..100"]),
    ('source = "sklearn:digits"', 'source = "sklearn:mnist"', ["data.source", "digits"]),
    ('region = "eu-west"', 'region = "eu west"', ["data.region"]),
    ('allowed_regions = ["eu-west"]', 'allowed_regions = "eu-west"', ["store.allowed_regions"]),
    ("version = 1", "version = 0", ["bundle.version"]),
    ("seed = 0", "seed = 0\nsurprise = 1", ["unknown key", "train.surprise"]),
    ("[profile]", "[profiles]", ["unknown section", "[profiles]"]),
    ("[data]", "data = 1\n[other]", ["unknown section"]),
    ("[model]", "[model", ["not valid TOML"]),
]


@pytest.mark.parametrize(("old", "new", "words"), BAD_VALUES,
                         ids=[w[0] for _, _, w in BAD_VALUES])
def test_bad_pipeline_values_are_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], old: str, new: str, words: list[str]
) -> None:
    pipeline = write_pipeline(tmp_path)
    _edit(pipeline, old, new)
    rc = cli.main(["run", str(pipeline), "--workdir", str(tmp_path / "work")])
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    assert rc != 0
    for word in words:
        assert word in line, line
    assert not (tmp_path / "work" / ".steps").exists()


def test_cuda_without_a_gpu_is_one_error_line_from_the_real_command(tmp_path: Path) -> None:
    pipeline = write_pipeline(tmp_path)
    _edit(pipeline, 'device = "cpu"', 'device = "cuda"')
    # No GPU visible to the command, also on a machine that has one.
    proc = _trainer("run", pipeline, "--workdir", tmp_path / "work", CUDA_VISIBLE_DEVICES="")
    line = _one_error_line(proc.stderr)
    assert "train.device = 'cuda'" in line and "no CUDA device" in line and "'cpu'" in line
    assert json.loads(proc.stdout.splitlines()[-1])["rc"] == 1
    assert not (tmp_path / "work" / ".steps").exists()
    assert not (tmp_path / "work" / "train").exists()


@pytest.mark.parametrize("case", ["missing-file", "directory", "no-source", "wrong-type"])
def test_unusable_pipeline_files_from_the_real_command(tmp_path: Path, case: str) -> None:
    path = tmp_path / "p.toml"
    if case == "directory":
        path.mkdir()
    elif case == "no-source":
        path.write_text("[data]\nregion = 'eu'\n")
    elif case == "wrong-type":
        path.write_text("[data]\nsource = 'sklearn:digits'\ntest_fraction = '0.2'\n")
    proc = _trainer("train", path, "--workdir", tmp_path / "w")
    line = _one_error_line(proc.stderr)
    assert proc.stdout and json.loads(proc.stdout.splitlines()[-1])["rc"] == 1
    expected = {"missing-file": "does not exist", "directory": "is a directory",
                "no-source": "data.source is required", "wrong-type": "without quotes"}[case]
    assert expected in line, line


def test_missing_csv_source_fails_in_preflight(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    pipeline = write_pipeline(tmp_path)
    _edit(pipeline, 'source = "sklearn:digits"', 'source = "csv:nothere.csv"\nlabel = "y"')
    assert cli.main(["run", str(pipeline), "--workdir", str(tmp_path / "work")]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "nothere.csv" in line and "no such file" in line
    assert not (tmp_path / "work" / "ingest.json").exists()


def test_without_a_publisher_key_nothing_runs(tmp_path: Path) -> None:
    """Preflight: the key is checked before training, not after export; no step output."""
    pipeline = write_pipeline(tmp_path, epochs=10_000)  # would train for many minutes
    (tmp_path / "publisher.key").unlink()
    proc = _trainer("run", pipeline, "--workdir", tmp_path / "work")
    line = _one_error_line(proc.stderr)
    assert "publisher key" in line and "publisher.key" in line and "does not exist" in line
    assert json.loads(proc.stdout.splitlines()[-1]) == {"rc": 1, "imported": []}
    work = tmp_path / "work"
    assert [p.name for p in work.iterdir()] == []  # no step ran, no store was created
    assert "running" not in proc.stderr


def test_unusable_publisher_key_and_unwritable_workdir(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    pipeline = write_pipeline(tmp_path)
    (tmp_path / "publisher.key").write_text("not a key\n")
    assert cli.main(["run", str(pipeline), "--workdir", str(tmp_path / "w")]) == 1
    assert "not a usable private key" in _one_error_line(capsys.readouterr().err)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["run", str(pipeline), "--workdir", str(blocker / "w"),
                     "--publisher-key", str(tmp_path / "publisher.key")]) == 1
    _one_error_line(capsys.readouterr().err)


def test_region_outside_the_store_policy_fails_before_ingest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pipeline = write_pipeline(tmp_path, region="us-east")
    assert cli.main(["run", str(pipeline), "--workdir", str(tmp_path / "work")]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "us-east" in line and "allowed_regions" in line
    assert not (tmp_path / "work" / "store").exists()


@pytest.mark.parametrize(("samples", "words"), [
    (b'{"model": "digits", "rows": [], "rows": []}', "duplicate key 'rows'"),
    (b'{"model": "digits", "rows": [{"device": "d", "version": 1, "region": "eu-west", '
     b'"features": [[NaN]], "labels": [0]}]}', "NaN is not a JSON number"),
], ids=["duplicate-key", "nan"])
def test_samples_file_that_is_not_strict_json_leaves_the_store_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], samples: bytes, words: str
) -> None:
    pipeline = write_pipeline(tmp_path)
    bad = tmp_path / "samples.json"
    bad.write_bytes(samples)
    work = tmp_path / "work"
    assert cli.main(["ingest", str(pipeline), "--workdir", str(work),
                     "--samples", str(bad)]) == 1
    err = capsys.readouterr().err
    line = _one_error_line(err)
    assert words in line and str(bad) in line
    assert "[ingest] snapshot" not in err
    assert not (work / "ingest.json").exists()
    assert not list((work / "store" / "data").iterdir())
    with sqlite3.connect(work / "store" / "catalog.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM snapshots").fetchone() == (0,)


@pytest.mark.slow
def test_cached_rerun_imports_no_ml_library(tmp_path: Path) -> None:
    pipeline = write_pipeline(tmp_path, epochs=1, hidden="16")
    first = _trainer("run", pipeline, "--workdir", tmp_path / "work")
    assert json.loads(first.stdout.splitlines()[-1])["rc"] == 0, first.stderr
    again = _trainer("run", pipeline, "--workdir", tmp_path / "work")
    assert json.loads(again.stdout.splitlines()[-1]) == {"rc": 0, "imported": []}, again.stderr
    for step in ("ingest", "train", "evaluate", "compress", "export", "profile", "bundle"):
        assert f"[{step}] cached" in again.stderr
    assert "running" not in again.stderr
    report = json.loads((tmp_path / "work" / "report.json").read_text())
    assert set(report["steps"].values()) == {"cached"}
    # The cache is still right: a changed setting reruns its step (and imports what it needs).
    _edit(pipeline, "bins = 10", "bins = 8")
    changed = _trainer("run", pipeline, "--workdir", tmp_path / "work")
    assert "[profile] running" in changed.stderr and "[train] cached" in changed.stderr
    assert json.loads(changed.stdout.splitlines()[-1])["rc"] == 0, changed.stderr


@pytest.mark.parametrize("kind", ["sklearn", "torch", "onnx"])
def test_cached_rerun_of_the_new_kinds_imports_no_ml_library(tmp_path: Path, kind: str) -> None:
    from tests.trainer_support import write_kind_pipeline  # noqa: PLC0415

    model = {
        "sklearn": 'kind = "sklearn"\nestimator = "sklearn.linear_model.Ridge"',
        "torch": 'kind = "torch"\nmodule = "net.py:build"',
        "onnx": 'kind = "onnx"\npath = "m.onnx"',
    }[kind]
    if kind == "torch":
        (tmp_path / "net.py").write_text(
            "from torch import nn\n\ndef build(f, o):\n    return nn.Linear(f, o)\n")
    if kind == "onnx":  # the first run's own export, imported by a second pipeline
        first = write_kind_pipeline(tmp_path / "src", source="sklearn:diabetes",
                                    task="regression", model='kind = "sklearn"\n'
                                    'estimator = "sklearn.linear_model.Ridge"')
        assert cli.main(["run", str(first), "--workdir", str(tmp_path / "src-work")]) == 0
        (tmp_path / "m.onnx").write_bytes((tmp_path / "src-work/bundle/model.onnx").read_bytes())
    pipeline = write_kind_pipeline(tmp_path, source="sklearn:diabetes", task="regression",
                                   model=model)
    first_run = _trainer("run", pipeline, "--workdir", tmp_path / "work")
    assert json.loads(first_run.stdout.splitlines()[-1])["rc"] == 0, first_run.stderr
    again = _trainer("run", pipeline, "--workdir", tmp_path / "work")
    assert json.loads(again.stdout.splitlines()[-1]) == {"rc": 0, "imported": []}, again.stderr
    assert "running" not in again.stderr
    assert "mae " in again.stdout and "r2 " in again.stdout
