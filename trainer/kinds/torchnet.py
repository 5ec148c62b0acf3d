"""PyTorch models: the built-in mlp and cnn, and the user's own network (kind "torch").

Trained with trainer.train.fit (checkpoints, resume, DDP), pruned (trainer.prune), quantized
(trainer.onnx_tools.quantize_int8) and exported to ONNX (and TFLite when asked).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fleetcore.errors import InvalidInputError
from fleetcore.files import atomic_write
from trainer import metrics

if TYPE_CHECKING:
    import torch

    from trainer.config import Pipeline
    from trainer.kinds.base import RunContext as Run

__all__ = ["TorchKind", "load_model", "save_model"]


def save_model(path: Path, model: torch.nn.Module, spec: dict[str, Any]) -> None:
    import torch

    buf = io.BytesIO()
    torch.save({"spec": spec, "state_dict": model.state_dict()}, buf)
    atomic_write(path, buf.getvalue())


def load_model(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    import torch

    from trainer.kinds.user_module import build_user_net
    from trainer.models import build

    state = torch.load(path, map_location="cpu", weights_only=True)
    spec = state["spec"]
    model = build_user_net(spec) if spec["kind"] == "torch" else build(spec)
    model.load_state_dict(state["state_dict"])
    return model.eval(), state["spec"]


class TorchKind:
    def fingerprint(self, pipeline: Pipeline) -> Any:
        from trainer.kinds.user_module import module_sha256

        m = pipeline.model
        return module_sha256(m.module, pipeline.base_dir) if m.kind == "torch" and m.module \
            else None

    def preflight(self, pipeline: Pipeline) -> None:
        self.fingerprint(pipeline)  # the user's file exists and is within its size limit

    def train_outputs(self, run: Run) -> list[Path]:
        return [run.workdir.model, run.workdir.train_json]

    def compress_outputs(self, run: Run) -> list[Path]:
        out = run.workdir.compress_dir
        return [out / n for n in ("model.pt", "fp32.onnx", "compressed.onnx", "compress.json")]

    def _spec(self, run: Run) -> dict[str, Any]:
        m, snap = run.pipeline.model, run.snapshot()
        regression = snap.task == "regression"
        spec: dict[str, Any] = {"kind": m.kind, "features": len(snap.feature_names),
                                "hidden": list(m.hidden),
                                "classes": 1 if regression else len(snap.labels),
                                "task": snap.task}
        if m.kind == "cnn":
            if snap.image_shape is None:
                raise InvalidInputError("[model] kind = 'cnn' needs image data (e.g. digits)")
            spec.update(image=list(snap.image_shape), channels=list(m.channels))
        if m.kind == "torch":
            from trainer.kinds.user_module import module_sha256

            assert m.module is not None
            spec.update(module=m.module,
                        module_sha256=module_sha256(m.module, run.pipeline.base_dir),
                        base_dir=str(run.pipeline.base_dir))
            del spec["hidden"]
        if regression:
            y = run.split().y_train.astype(np.float64)
            std = float(y.std())
            spec.update(target_mean=float(y.mean()), target_std=std if std > 1e-12 else 1.0)
        return spec

    def train(self, run: Run, key: str) -> None:
        import torch

        from trainer.models import build, count_parameters, fit_scaler
        from trainer.train import fit, pick_device, predict

        t = run.pipeline.train
        split = run.split()
        if t.threads:
            torch.set_num_threads(t.threads)
        torch.manual_seed(t.seed)
        spec = self._spec(run)
        if spec["kind"] == "torch":
            from trainer.kinds.user_module import call_user_function
            from trainer.models import UserNet

            model: torch.nn.Module = UserNet(spec["features"], call_user_function(
                spec["module"], run.pipeline.base_dir, spec["features"], spec["classes"]))
        else:
            model = build(spec)
        fit_scaler(model, torch.as_tensor(split.X_train))
        device = pick_device(t.device, run.ctx)
        if run.ctx.world > 1:
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend)
        run.progress(f"[train] {spec['kind']} {count_parameters(model):,} parameters on {device}"
                     f" ({run.ctx.world} process{'es' if run.ctx.world > 1 else ''})")
        target = (spec["target_mean"], spec["target_std"]) if spec["task"] == "regression" \
            else None
        outcome = fit(
            model, split.X_train, split.y_train, epochs=t.epochs, batch_size=t.batch_size,
            lr=t.lr, seed=t.seed, weight_decay=t.weight_decay, device=device,
            checkpoint=run.workdir.checkpoint, key=key, ctx=run.ctx, progress=run.progress,
            target=target,
        )
        if run.ctx.world > 1:
            torch.distributed.destroy_process_group()
        if not run.ctx.is_main:
            return
        save_model(run.workdir.model, model, spec)
        train_metrics = metrics.measure(spec["task"], predict(model, spec, split.X_train),
                                        split.y_train)
        run.write_json(run.workdir.train_json, {
            "spec": spec, "parameters": count_parameters(model), "epochs": t.epochs,
            "resumed_from_epoch": outcome.resumed_from, "losses": outcome.losses,
            "world_size": run.ctx.world, "device": str(device),
            **{f"train_{k}": v for k, v in train_metrics.items()},
        })

    def evaluate(self, run: Run) -> dict[str, Any]:
        from trainer.train import predict

        model, spec = load_model(run.workdir.model)
        split = run.split()
        return metrics.measure(spec.get("task", "classification"),
                               predict(model, spec, split.X_test), split.y_test)

    def compress(self, run: Run, key: str) -> None:
        from trainer import onnx_tools
        from trainer.models import count_parameters
        from trainer.prune import prune, prune_sequential
        from trainer.train import fit

        c, t = run.pipeline.compress, run.pipeline.train
        model, spec = load_model(run.workdir.model)
        task = spec.get("task", "classification")
        split = run.split()
        out = run.workdir.compress_dir
        out.mkdir(parents=True, exist_ok=True)
        prune_doc: dict[str, Any] = {"applies": True, "fraction": c.prune}
        if spec["kind"] == "torch":
            if c.prune > 0:
                pruned, info = prune_sequential(model, c.prune)
            else:
                pruned, info = load_model(run.workdir.model)[0], {"pruned": [], "skipped": []}
            pruned_spec = {**spec, "linear_shapes": info.get("linear_shapes", {})}
            prune_doc.update(method="structured (L2 in x out importance) on Linear -> Linear "
                                    "chains inside nn.Sequential",
                             pruned_layers=info["pruned"], skipped=info["skipped"])
        else:
            pruned, pruned_spec = prune(model, spec, c.prune)
            prune_doc.update(method="structured (L2 in x out importance)",
                             spec_before=spec, spec_after=pruned_spec)
        before, after = count_parameters(model), count_parameters(pruned)
        run.progress(f"[compress] pruned {c.prune:.0%} of units: {before:,} -> {after:,} "
                     "parameters")
        if c.prune > 0 and c.finetune_epochs > 0:
            target = (spec["target_mean"], spec["target_std"]) if task == "regression" else None
            fit(pruned, split.X_train, split.y_train, epochs=c.finetune_epochs,
                batch_size=t.batch_size, lr=t.lr / 2, seed=t.seed + 1, progress=run.progress,
                target=target)
        save_model(out / "model.pt", pruned, pruned_spec)
        features = spec["features"]
        onnx_tools.export_onnx(model, features, out / "fp32.onnx", spec)
        pruned_onnx = onnx_tools.export_onnx(pruned, features, out / "pruned_fp32.onnx",
                                             pruned_spec)
        prune_doc.update(parameters_before=before, parameters_after=after,
                         finetune_epochs=c.finetune_epochs if c.prune > 0 else 0)
        recipe: dict[str, Any] = {"prune": prune_doc, "quantize": {"mode": "none"},
                                  "graph_optimization": {"applies": False,
                                                         "reason": "ONNX Runtime optimises "
                                                                   "the graph when it loads"}}
        if c.quantize == "int8":
            rng = np.random.default_rng(t.seed)
            rows = rng.choice(len(split.X_train), min(c.calibration_rows, len(split.X_train)),
                              replace=False)
            choice = onnx_tools.quantize_int8(
                pruned_onnx, out / "compressed.onnx", split.X_train[np.sort(rows)],
                split.X_test, split.y_test, task=task,
            )
            measured = ", ".join(f"{mode}: {v['latency_us_batch64']:.0f} us/batch64"
                                 for mode, v in choice.candidates.items())
            run.progress(f"[compress] int8 {choice.mode} chosen ({measured})")
            recipe["quantize"] = {
                "mode": choice.mode, "calibration": {"snapshot": run.snapshot().id,
                                                     "rows": len(rows), "split": "train"},
                "candidates": choice.candidates,
                "rule": "fastest at batch 64 within the tolerance "
                        + ("(1 accuracy point)" if task == "classification"
                           else f"(MAE +{metrics.MAX_MAE_INCREASE:.0%})"),
            }
        else:
            (out / "compressed.onnx").write_bytes(pruned_onnx.read_bytes())
        run.write_json(out / "compress.json", recipe)

    def export_checks(self, run: Run, rows: np.ndarray, final: Path) -> dict[str, Any]:
        from trainer import onnx_tools
        from trainer.train import predict

        comp = run.workdir.compress_dir
        original, spec = load_model(run.workdir.model)
        pruned, pspec = load_model(comp / "model.pt")
        quantized = run.pipeline.compress.quantize == "int8"
        want_fp32, want_pruned = predict(original, spec, rows), predict(pruned, pspec, rows)
        tol = run.tolerances()
        checks = {
            "onnx_fp32": run.compare(onnx_tools.run_onnx(comp / "fp32.onnx", rows), want_fp32,
                                     tol["exact"]),
            "onnx_pruned_fp32": run.compare(onnx_tools.run_onnx(comp / "pruned_fp32.onnx", rows),
                                            want_pruned, tol["exact"]),
            "onnx_compressed": run.compare(onnx_tools.run_onnx(final, rows), want_pruned,
                                           tol["quantized" if quantized else "exact"]),
        }
        if "tflite" in run.pipeline.export.formats:
            from trainer.tflite import export_tflite, run_tflite

            path = export_tflite(pruned, pspec["features"], run.workdir.export_dir /
                                 "model.tflite", int8=quantized, spec=pspec)
            checks["tflite"] = run.compare(run_tflite(path, rows), want_pruned,
                                           tol["quantized" if quantized else "exact"])
        return checks

    def lineage(self, run: Run) -> dict[str, Any]:
        m = run.pipeline.model
        doc: dict[str, Any] = {"model_kind": m.kind}
        if m.kind == "torch":  # what was trained (train.json), not the file as it is now
            spec = run.read_json(run.workdir.train_json)["spec"]
            doc.update(module=spec["module"], module_sha256=spec["module_sha256"])
        return doc

    def describe(self, run: Run) -> dict[str, Any]:
        train = run.read_json(run.workdir.train_json)
        return {"kind": run.pipeline.model.kind, "spec": train["spec"],
                "parameters": train["parameters"], "world_size": train["world_size"],
                "device": train["device"]}
