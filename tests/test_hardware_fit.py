"""Hardware fit (issue 19): ONNX Runtime threads from the cores the process may use, and, where
a bundle offers several ONNX variants (int8 and fp32), the fastest one on this host that passes
the manifest's smoke test, reported in the stats and the agent's status. Real ONNX models and
sessions; the affinity case runs in a child process pinned to one core.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edge_agent.cli import _runs_on
from edge_agent.serving import ServingCore
from edge_agent.serving.runtime import OnnxRuntime, load_runtime, usable_cores
from fleetcore.errors import InvalidInputError

REPO = Path(__file__).resolve().parent.parent


def _uniform_model(path: Path, features: int = 64, classes: int = 10) -> None:
    """A valid model of the right shape that answers 1/classes for every class: it runs, and
    fails any real smoke test."""
    weights = helper.make_tensor("w", TensorProto.FLOAT, [features, classes],
                                 [0.0] * (features * classes))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)],
        "uniform", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, classes])],
        initializer=[weights])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _bundle(trained_bundle: Path, dest: Path, variants: list[dict[str, Any]],
            precision: str = "int8") -> tuple[Path, dict[str, Any]]:
    shutil.copytree(trained_bundle, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    onnx_spec = manifest.setdefault("runtime", {}).setdefault("onnx", {})
    onnx_spec["precision"] = precision
    onnx_spec["variants"] = variants
    # The tiny digits model's int8 and fp32 answers agree within atol on every smoke row but
    # split one near-tie row's class: judged on atol alone here.
    manifest["smoke_test"]["require_same_argmax"] = False
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest, manifest


def test_the_fastest_variant_that_passes_the_smoke_test_is_served(
    trained_bundle: Path, tmp_path: Path
) -> None:
    bundle, manifest = _bundle(trained_bundle, tmp_path / "b", [
        {"file": "model.fp32.onnx", "precision": "fp32"},
        {"file": "model.broken.onnx", "precision": "fp32"},
        {"file": "model.missing.onnx", "precision": "int8"},
    ])
    # the fp32 model that was quantized (pruned, before int8): the same answers within atol
    shutil.copyfile(trained_bundle.parent / "compress" / "pruned_fp32.onnx",
                    bundle / "model.fp32.onnx")
    _uniform_model(bundle / "model.broken.onnx")
    # How far the fp32 file's answers lie from the int8 ones the smoke test holds depends on the
    # training run (CI once trained a model where they split by more than the bundle's atol):
    # the tolerance here covers that distance, and stays far below the broken file's.
    smoke = manifest["smoke_test"]
    x = np.asarray(smoke["inputs"], np.float32)
    want = np.asarray(smoke["expected"], np.float32)
    fp32 = OnnxRuntime(bundle / "model.fp32.onnx", manifest["version"], 64, 10, "input",
                       "probabilities")
    broken = OnnxRuntime(bundle / "model.broken.onnx", manifest["version"], 64, 10, "input",
                         "probabilities")
    fp32_gap = float(np.abs(fp32.predict(x) - want).max())
    broken_gap = float(np.abs(broken.predict(x) - want).max())
    smoke["atol"] = max(float(smoke.get("atol", 0.0)), 1.5 * fp32_gap)
    assert smoke["atol"] < broken_gap / 2
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    runtime = load_runtime(bundle, manifest)
    assert isinstance(runtime, OnnxRuntime)
    report = runtime.variants
    assert report["model.broken.onnx"]["accepted"] is False
    assert "smoke" in report["model.broken.onnx"]["reason"]
    assert report["model.missing.onnx"]["accepted"] is False
    accepted = {f: r for f, r in report.items() if r["accepted"]}
    assert set(accepted) == {"model.onnx", "model.fp32.onnx"}
    # The one served is the one measured fastest here, and answers like its own file does.
    assert runtime.file == min(accepted, key=lambda f: accepted[f]["row_latency_us"])
    assert runtime.precision == accepted[runtime.file]["precision"]
    alone = OnnxRuntime(bundle / runtime.file, manifest["version"], 64, 10, "input",
                        "probabilities")
    np.testing.assert_allclose(runtime.predict(x), alone.predict(x), rtol=1e-6)
    # The stats, the status and `edge-agent status` say which.
    core = ServingCore()
    core.set_model("digits", [(manifest["version"], 1.0, False)], {manifest["version"]: bundle})
    arm = core.stats()["models"]["digits"]["arms"][str(manifest["version"])]
    facts = core.runtimes()["digits"][str(manifest["version"])]
    assert arm["file"] == facts["file"] == core._model("digits").runtimes[
        manifest["version"]].file  # type: ignore[attr-defined]
    assert facts["graph_optimization"] == "all" and facts["threads"] >= 1
    assert facts["file"] in _runs_on(facts) and "onnx" in _runs_on(facts)
    core.close()


def test_no_variant_passing_fails_the_load(trained_bundle: Path, tmp_path: Path) -> None:
    bundle, manifest = _bundle(trained_bundle, tmp_path / "b", [
        {"file": "model.broken.onnx", "precision": "fp32"}])
    _uniform_model(bundle / "model.onnx")  # the main file too
    _uniform_model(bundle / "model.broken.onnx")
    with pytest.raises(InvalidInputError, match="no ONNX variant passes"):
        load_runtime(bundle, manifest)


_PINNED = """
import json, os, sys
from pathlib import Path
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
from edge_agent.serving.runtime import load_runtime, usable_cores
bundle = Path(sys.argv[1])
manifest = json.loads((bundle / "manifest.json").read_text())
manifest["runtime"]["onnx"]["intra_op_num_threads"] = 4
print(json.dumps({"cores": usable_cores(), "threads": load_runtime(bundle, manifest).threads}))
"""


def test_threads_come_from_the_cores_the_process_may_use(trained_bundle: Path) -> None:
    out = subprocess.run([sys.executable, "-c", _PINNED, str(trained_bundle)], cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"cores": 1, "threads": 1}
    assert usable_cores() >= 1
