"""The trainer pipeline end to end on real digits data, with small settings."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fleetcore.bundle import parse_manifest
from fleetcore.errors import InvalidInputError
from tests.trainer_support import write_pipeline
from trainer.config import Pipeline
from trainer.onnx_tools import run_onnx
from trainer.pipeline import Run, Workdir, _write_json
from trainer.store import RegionNotAllowedError

MODEL_SIGNING = str(Path(sys.executable).parent / "model_signing")


def _run(pipeline: Path, workdir: Path) -> tuple[Run, dict]:
    run = Run(Pipeline.load(pipeline), Workdir(workdir), progress=lambda m: None)
    return run, run.run_all()


def _verify(bundle: Path, public_key: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MODEL_SIGNING, "verify", "key", str(bundle), "--signature", str(bundle / "model.sig"),
         "--public_key", str(public_key)],
        capture_output=True, text=True, timeout=60, check=False,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    base = tmp_path_factory.mktemp("digits")
    pipeline = write_pipeline(base)
    _, report = _run(pipeline, base / "work")
    return base, base / "work", report


def test_report_has_the_promised_fields(trained: tuple[Path, Path, dict]) -> None:
    _, work, report = trained
    assert report["dataset"]["snapshot"].startswith("sha256:")
    assert 0.85 <= report["metrics"]["fp32"]["accuracy"] <= 1.0
    metrics = report["metrics"]
    assert metrics["compressed"]["accuracy"] >= metrics["fp32"]["accuracy"] - 0.05
    assert 0 < report["sizes"]["onnx_compressed"] < report["sizes"]["onnx_fp32"]
    for kind in ("fp32", "compressed"):
        assert report["latency_us"][kind]["batch1"] > 0
        assert report["latency_us"][kind]["batch64"] > 0
    recipe = report["compression"]
    assert recipe["prune"]["fraction"] == 0.5
    assert recipe["prune"]["parameters_after"] < recipe["prune"]["parameters_before"]
    assert recipe["quantize"]["mode"] in ("static-qdq", "dynamic")
    assert set(recipe["quantize"]["candidates"]) == {"static-qdq", "dynamic"}
    assert json.loads((work / "report.json").read_text()) == report
    assert all(c["ok"] for c in report["checks"].values())


def test_bundle_verifies_with_the_reference_tool(trained: tuple[Path, Path, dict]) -> None:
    base, work, _ = trained
    bundle = work / "bundle"
    assert sorted(p.name for p in bundle.iterdir()) == [
        "manifest.json", "model.onnx", "model.sig", "profile.json",
    ]
    r = _verify(bundle, base / "publisher.pub")
    assert r.returncode == 0, r.stderr + r.stdout
    manifest = parse_manifest((bundle / "manifest.json").read_bytes())
    assert manifest["name"] == "digits" and manifest["version"] == 1
    assert len(manifest["input"]["features"]) == 64
    assert manifest["output"]["labels"] == [str(i) for i in range(10)]
    # Smoke inputs reproduce their expected outputs on the bundled model.
    got = run_onnx(bundle / "model.onnx", np.array(manifest["smoke_test"]["inputs"]))
    assert np.allclose(got, manifest["smoke_test"]["expected"],
                       atol=manifest["smoke_test"]["atol"])
    profile = json.loads((bundle / "profile.json").read_text())
    assert len(profile["features"]) == 64
    assert len(profile["reference_sample"]["rows"]) == 100
    assert abs(sum(profile["prediction"]["proportions"]) - 1) < 1e-9
    for feature in profile["features"]:
        assert abs(sum(feature["proportions"]) - 1) < 1e-9
        assert len(feature["proportions"]) == len(feature["edges"]) + 1


@pytest.mark.parametrize("victim", ["manifest.json", "model.onnx", "profile.json"])
def test_changing_any_byte_of_any_file_fails_verification(
    trained: tuple[Path, Path, dict], tmp_path: Path, victim: str
) -> None:
    base, work, _ = trained
    bundle = tmp_path / "bundle"
    shutil.copytree(work / "bundle", bundle)
    data = bytearray((bundle / victim).read_bytes())
    for offset in (0, len(data) // 2, len(data) - 1):
        tampered = bytearray(data)
        tampered[offset] ^= 0x01
        (bundle / victim).write_bytes(bytes(tampered))
        assert _verify(bundle, base / "publisher.pub").returncode != 0, (victim, offset)
    (bundle / victim).write_bytes(bytes(data))
    assert _verify(bundle, base / "publisher.pub").returncode == 0


def test_extra_or_missing_files_fail_verification(
    trained: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    base, work, _ = trained
    extra = tmp_path / "extra"
    shutil.copytree(work / "bundle", extra)
    (extra / "backdoor.py").write_text("print('hi')")
    assert _verify(extra, base / "publisher.pub").returncode != 0
    missing = tmp_path / "missing"
    shutil.copytree(work / "bundle", missing)
    (missing / "profile.json").unlink()
    assert _verify(missing, base / "publisher.pub").returncode != 0


def test_another_publisher_key_fails_verification(
    trained: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    _, work, _ = trained
    other = write_pipeline(tmp_path / "other").parent / "publisher.pub"
    assert _verify(work / "bundle", other).returncode != 0


def test_raw_features_in_give_the_trainers_predictions(
    trained: tuple[Path, Path, dict],
) -> None:
    """Scaling is inside the graph: raw pixel values (0..16) in, correct classes out."""
    from sklearn.datasets import load_digits  # noqa: PLC0415

    _, work, _ = trained
    digits = load_digits()
    probs = run_onnx(work / "bundle" / "model.onnx", digits.data.astype(np.float32))
    assert (probs.argmax(1) == digits.target).mean() >= 0.85
    # When export keeps the int8 variant (it does when it measures faster), the softmax output
    # is quantized in steps of 1/255 per class: 10 classes may sum to 1 +- 10/510.
    assert np.allclose(probs.sum(1), 1, atol=10 / 510 + 1e-6)


def test_rerun_with_nothing_changed_does_no_work(trained: tuple[Path, Path, dict]) -> None:
    base, work, _ = trained
    run, report = _run(base / "pipeline.toml", work)
    assert set(run.outcomes.values()) == {"cached"}
    assert report["steps"] == {s: "cached" for s in run.outcomes}


def test_changed_setting_reruns_that_step_and_later_ones(tmp_path: Path) -> None:
    pipeline = write_pipeline(tmp_path, epochs=2)
    _run(pipeline, tmp_path / "work")
    text = pipeline.read_text().replace("prune = 0.5", "prune = 0.25")
    pipeline.write_text(text)
    run, report = _run(pipeline, tmp_path / "work")
    assert run.outcomes == {
        "ingest": "cached", "train": "cached", "evaluate": "cached",
        "compress": "ran", "export": "ran", "profile": "ran", "bundle": "ran",
    }
    assert report["compression"]["prune"]["fraction"] == 0.25


def test_disallowed_region_is_refused(tmp_path: Path) -> None:
    pipeline = write_pipeline(tmp_path, region="us-east")
    with pytest.raises(RegionNotAllowedError, match="us-east"):
        _run(pipeline, tmp_path / "work")
    assert not (tmp_path / "work" / "train").exists()


def test_cnn_pipeline_with_tflite(tmp_path: Path) -> None:
    pipeline = write_pipeline(tmp_path, kind="cnn", hidden="32", epochs=2, prune=0.25,
                              formats='"onnx", "tflite"')
    _, report = _run(pipeline, tmp_path / "work")
    bundle = tmp_path / "work" / "bundle"
    assert (bundle / "model.tflite").exists()
    assert report["checks"]["tflite"]["ok"]
    assert report["sizes"]["tflite"] == (bundle / "model.tflite").stat().st_size
    manifest = parse_manifest((bundle / "manifest.json").read_bytes())
    assert manifest["runtime"]["tflite"]["file"] == "model.tflite"
    assert _verify(bundle, tmp_path / "publisher.pub").returncode == 0
    assert report["model"]["spec"]["kind"] == "cnn"
    assert report["compression"]["prune"]["spec_after"]["channels"] == [6, 12]
    assert report["metrics"]["compressed"]["accuracy"] > 0.8


def test_csv_example_pipeline(tmp_path: Path) -> None:
    """The repository's CSV example: PII columns are pseudonymized and never model inputs."""
    repo = Path(__file__).resolve().parent.parent
    key = write_pipeline(tmp_path).parent / "publisher.key"
    run = Run(Pipeline.load(repo / "examples/pipelines/wine-csv.toml"), Workdir(tmp_path / "w"),
              publisher_key=key, progress=lambda m: None)
    report = run.run_all()
    manifest = parse_manifest((tmp_path / "w/bundle/manifest.json").read_bytes())
    names = [f["name"] for f in manifest["input"]["features"]]
    assert "customer_email" not in names and len(names) == 13
    assert {p["name"] for p in manifest["input"]["pii_columns"]} == {"customer_email",
                                                                      "customer_name"}
    assert report["metrics"]["compressed"]["accuracy"] >= 0.85
    raw = (repo / "examples/data/wine_customers.csv").read_text().splitlines()[1]
    assert "@example.com" in raw
    for path in (tmp_path / "w").rglob("*"):
        if path.is_file():
            assert b"@example.com" not in path.read_bytes(), path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[data]\nsource = 'sklearn:digits'\n[nope]\n", "unknown section"),
        ("[data]\nsource = 'sklearn:digits'\nsurprise = 1\n", "unknown key"),
        ("[model]\nkind = 'mlp'\n", "source is required"),
        ("[data]\nsource = 'sklearn:digits'\n[model]\nkind = 'rnn'\n", "'torch' or 'onnx'"),
        ("[data]\nsource = 'sklearn:digits'\n[train]\nepochs = 0\n", "epochs"),
        ("[data]\nsource = 'sklearn:digits'\n[compress]\nprune = 1.5\n", "prune"),
        ("[data]\nsource = 'sklearn:digits'\n[export]\nformats = ['pt']\n", "formats"),
        ("[data\nsource=", "not valid TOML"),
    ],
    ids=["section", "key", "no-source", "kind", "epochs", "prune", "formats", "syntax"],
)
def test_bad_pipeline_files_are_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(InvalidInputError, match=message):
        Pipeline.load(path)


def test_missing_publisher_key_is_a_clear_error(tmp_path: Path) -> None:
    pipeline = write_pipeline(tmp_path, epochs=1)
    (tmp_path / "publisher.key").unlink()
    with pytest.raises(InvalidInputError, match="publisher key"):
        _run(pipeline, tmp_path / "work")


@pytest.mark.parametrize(("text", "words"), [
    ('{"key": "a", "key": "b", "digest": "c"}', "duplicate key 'key'"),
    ('{"key": NaN, "digest": "c"}', "NaN is not a JSON number"),
    ('{"key": ', "not valid JSON"),
], ids=["duplicate-key", "nan", "truncated"])
def test_workdir_json_is_read_strictly(tmp_path: Path, text: str, words: str) -> None:
    """A step's state (like every workdir document) goes through fleetcore.strict_json."""
    run = Run(Pipeline.load(write_pipeline(tmp_path)), Workdir(tmp_path / "work"))
    state = run.workdir.step_state("ingest")
    state.parent.mkdir(parents=True)
    state.write_text(text)
    with pytest.raises(InvalidInputError, match=words) as refused:
        run.run_step("train")
    assert str(state) in str(refused.value)


def test_workdir_json_is_written_strictly(tmp_path: Path) -> None:
    """NaN is refused when a workdir document is written, not steps later when it is read."""
    path = tmp_path / "train.json"
    with pytest.raises(InvalidInputError, match=r"train\.json.*not JSON compliant"):
        _write_json(path, {"losses": [0.5, float("nan")]})
    assert not path.exists()
