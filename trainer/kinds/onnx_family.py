"""What the sklearn and onnx kinds share: their train step leaves an fp32 ONNX graph
(``train/model.onnx``, raw features in, the task's output out), and the later steps work on
ONNX alone.

compress: ONNX Runtime's basic graph optimisation, then int8 (static QDQ calibrated on the
snapshot's training rows, and dynamic) only where the graph has ops int8 rewrites
(MatMul/Gemm/Conv; not tree ensembles or ai.onnx.ml linear ops); an int8 variant is kept only
if it is faster at batch 64 than the fp32 graph and within the task's tolerance
(trainer.metrics). Pruning does not apply (the config refuses compress.prune > 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trainer import metrics

if TYPE_CHECKING:
    from trainer.kinds.base import RunContext as Run

__all__ = ["OnnxFamily"]

PRUNE_NOT_APPLICABLE = ("pruning removes units of PyTorch layers; this model is an ONNX graph "
                        "(no trainable layers to shrink)")


class OnnxFamily:
    """Shared steps; subclasses provide fingerprint, preflight, train, lineage, describe."""

    def model_onnx(self, run: Run) -> Path:
        return run.workdir.root / "train" / "model.onnx"

    def train_outputs(self, run: Run) -> list[Path]:
        return [self.model_onnx(run), run.workdir.train_json]

    def compress_outputs(self, run: Run) -> list[Path]:
        out = run.workdir.compress_dir
        return [out / n for n in ("fp32.onnx", "compressed.onnx", "compress.json")]

    def evaluate(self, run: Run) -> dict[str, Any]:
        from trainer import onnx_tools

        split = run.split()
        return metrics.measure(run.task, onnx_tools.run_onnx(self.model_onnx(run), split.X_test),
                               split.y_test)

    def compress(self, run: Run, key: str) -> None:
        from trainer import onnx_tools

        c, t = run.pipeline.compress, run.pipeline.train
        split = run.split()
        out = run.workdir.compress_dir
        out.mkdir(parents=True, exist_ok=True)
        fp32 = out / "fp32.onnx"
        fp32.write_bytes(self.model_onnx(run).read_bytes())
        optimized = onnx_tools.optimize(fp32, out / "optimized.onnx")
        before = onnx_tools.latency_us(fp32, split.X_test, 64)
        after = onnx_tools.latency_us(optimized, split.X_test, 64)
        kept = after < before
        recipe: dict[str, Any] = {
            "prune": {"applies": False, "reason": PRUNE_NOT_APPLICABLE},
            "graph_optimization": {
                "applies": True, "level": "ORT_ENABLE_BASIC", "kept": kept,
                "rule": "kept only if faster at batch 64 (ONNX Runtime optimises the graph "
                        "again when it loads it)",
                "latency_us_batch64": {"before": before, "after": after},
                "size_bytes": {"before": fp32.stat().st_size,
                               "after": optimized.stat().st_size},
            },
        }
        if not kept:
            optimized.write_bytes(fp32.read_bytes())
        applies, why = onnx_tools.int8_applies(optimized)
        if c.quantize == "none":
            recipe["quantize"] = {"mode": "none", "reason": "compress.quantize = 'none'"}
            (out / "compressed.onnx").write_bytes(optimized.read_bytes())
        elif not applies:
            recipe["quantize"] = {"mode": "none", "applies": False, "reason": why}
            run.progress(f"[compress] int8 does not apply: {why}")
            (out / "compressed.onnx").write_bytes(optimized.read_bytes())
        else:
            rng = np.random.default_rng(t.seed)
            rows = rng.choice(len(split.X_train), min(c.calibration_rows, len(split.X_train)),
                              replace=False)
            choice = onnx_tools.quantize_int8(
                optimized, out / "compressed.onnx", split.X_train[np.sort(rows)], split.X_test,
                split.y_test, task=run.task, keep_fp32=True)
            measured = ", ".join(
                f"{mode}: failed" if "failed" in v else
                f"{mode}: {v['latency_us_batch64']:.0f} us/batch64"
                for mode, v in choice.candidates.items())
            run.progress(f"[compress] kept {choice.mode} ({measured})")
            recipe["quantize"] = {
                "mode": choice.mode, "applies": True, "reason": why,
                "calibration": {"snapshot": run.snapshot().id, "rows": len(rows),
                                "split": "train"},
                "candidates": choice.candidates,
                "rule": "int8 kept only if faster at batch 64 than fp32 and within the "
                        "tolerance " + ("(1 accuracy point)" if run.task == "classification"
                                        else f"(MAE +{metrics.MAX_MAE_INCREASE:.0%})"),
            }
        run.write_json(out / "compress.json", recipe)

    def export_checks(self, run: Run, rows: np.ndarray, final: Path) -> dict[str, Any]:
        from trainer import onnx_tools

        recipe = run.read_json(run.workdir.compress_dir / "compress.json")
        quantized = recipe["quantize"]["mode"] != "none"
        tol = run.tolerances()
        reference = onnx_tools.run_onnx(run.workdir.compress_dir / "fp32.onnx", rows)
        checks = dict(run.read_json(run.workdir.train_json).get("checks", {}))
        checks["onnx_compressed"] = run.compare(onnx_tools.run_onnx(final, rows), reference,
                                                tol["quantized" if quantized else "exact"])
        return checks
