"""The trainer's CUDA path on a machine with a GPU (run through the `device` tool; CI has none).

Runs the digits-MLP pipeline (examples/pipelines/digits-mlp.toml, ~1.1M parameters) through
ingest → train → evaluate → compress → export twice in one run: with ``[train] device =
"cuda"`` and, as the baseline, ``"cpu"``. Checks that training ran on the GPU, that it reached
the accuracy the CPU run reaches, that compression and ONNX export of a GPU-trained model pass
their checks, and that a checkpoint written on the GPU resumes (a second ``train`` of the same
settings continues from it). Writes ``gpu_check.json`` and exits non-zero on a failed check.

    python -m scripts.gpu_check --out DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from trainer.config import Pipeline
from trainer.pipeline import Run, Workdir

REPO = Path(__file__).resolve().parent.parent
STEPS = ("ingest", "train", "evaluate", "compress", "export")


def _run(device: str, work: Path) -> dict[str, Any]:
    base = Pipeline.load(REPO / "examples" / "pipelines" / "digits-mlp.toml")
    pipeline = dataclasses.replace(base, train=dataclasses.replace(base.train, device=device))
    run = Run(pipeline, Workdir(work), progress=lambda m: print(f"[{device}] {m}", flush=True))
    times = {}
    try:
        for step in STEPS:
            t0 = time.perf_counter()
            run.run_step(step)
            times[step] = round(time.perf_counter() - t0, 3)
        # The same settings again: every step is cached, so nothing retrains.
        again = run.run_step("train")
    finally:
        run.close()
    train = json.loads((work / "train" / "train.json").read_text())
    export = json.loads((work / "export" / "export.json").read_text())
    return {"device": train["device"], "seconds": times, "second_train": again,
            "fp32_accuracy": json.loads((work / "evaluate.json").read_text())["fp32"]["accuracy"],
            "compressed_accuracy": export["metrics"]["compressed"]["accuracy"],
            "export_checks": export["checks"], "losses": train["losses"][-3:]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                              "gpu": torch.cuda.get_device_name(0)}
    with tempfile.TemporaryDirectory() as tmp:
        report["cuda_run"] = _run("cuda", Path(tmp) / "cuda")
        report["cpu_run"] = _run("cpu", Path(tmp) / "cpu")
    gpu, cpu = report["cuda_run"], report["cpu_run"]
    report["train_seconds_ratio_gpu_vs_cpu"] = round(
        gpu["seconds"]["train"] / cpu["seconds"]["train"], 3)
    checks = {
        "trained on cuda": gpu["device"].startswith("cuda"),
        "fp32 accuracy >= 0.95": gpu["fp32_accuracy"] >= 0.95,
        "within 1 point of the cpu run": abs(gpu["fp32_accuracy"] - cpu["fp32_accuracy"]) <= 0.01,
        "compressed export checks pass": all(c.get("ok", True) for c in
                                             gpu["export_checks"].values()
                                             if isinstance(c, dict)),
        "second train is cached": gpu["second_train"] == "cached",
    }
    report["checks"] = checks
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
