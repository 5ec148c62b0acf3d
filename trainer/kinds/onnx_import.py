"""An ONNX model trained elsewhere (``[model] kind = "onnx"``, ``path = "model.onnx"``).

The file is untrusted (trainer.onnx_graph.load_untrusted: size limit, parses as ONNX, loads in
ONNX Runtime, no external data outside its folder). The train step does not train: it checks
the model against the snapshot (input float [?, F] with F the snapshot's features; output
[?, C] for classification, [?, 1] or [?] for regression, confirmed on real rows), rewrites it
to the bundle's interface (trainer.onnx_graph.normalize) and records the import.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fleetcore.errors import InvalidInputError
from trainer import onnx_graph
from trainer.kinds.onnx_family import OnnxFamily

if TYPE_CHECKING:
    from trainer.config import Pipeline
    from trainer.kinds.base import RunContext as Run

__all__ = ["OnnxKind", "model_path"]


def model_path(pipeline: Pipeline) -> Path:
    assert pipeline.model.path is not None
    path = Path(pipeline.model.path)
    return path if path.is_absolute() else pipeline.base_dir / path


class OnnxKind(OnnxFamily):
    def fingerprint(self, pipeline: Pipeline) -> Any:
        """The file's sha256, read under the size limit (no ONNX parsing: stdlib only)."""
        path = model_path(pipeline)
        where = f"model.path = {pipeline.model.path!r}"
        try:
            size = os.stat(path).st_size
        except OSError as exc:
            raise InvalidInputError(f"{where}: {path}: {exc.strerror}") from None
        if not path.is_file():
            raise InvalidInputError(f"{where}: {path} is not a regular file")
        if size > onnx_graph.MAX_ONNX_BYTES:
            raise InvalidInputError(f"{where}: {path} is {size} bytes; the limit is "
                                    f"{onnx_graph.MAX_ONNX_BYTES}")
        return hashlib.sha256(path.read_bytes()).hexdigest()

    def preflight(self, pipeline: Pipeline) -> None:
        self.fingerprint(pipeline)

    def train(self, run: Run, key: str) -> None:
        import onnx

        from trainer import onnx_tools

        m = run.pipeline.model
        snap, split = run.snapshot(), run.split()
        src = model_path(run.pipeline)
        where = f"model.path = {m.path!r}"
        features, classes = len(snap.feature_names), len(snap.labels)
        original = onnx_graph.load_untrusted(src, max_bytes=onnx_graph.MAX_ONNX_BYTES,
                                             where=where)
        proto, chosen_in, chosen_out = onnx_graph.normalize(
            original, task=run.task, features=features, classes=classes, input_name=m.input,
            output_name=m.output, out_name=onnx_tools.output_name(run.task), where=where)
        path = self.model_onnx(run)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            onnx_graph.check_session(proto, where)
            onnx.save_model(proto, str(path))
            rows = split.X_test[: run.pipeline.export.check_rows]
            got = onnx_tools.run_onnx(path, rows)
        except InvalidInputError:
            raise
        except Exception as exc:  # the model's own ops failing on real rows
            raise InvalidInputError(f"{where}: fails on the snapshot's rows: "
                                    f"{' '.join(str(exc).split())[:300]}") from None
        want_shape = (len(rows), classes if run.task == "classification" else 1)
        if got.shape != want_shape or not np.isfinite(got).all():
            path.unlink()
            raise InvalidInputError(
                f"{where}: on {len(rows)} snapshot rows it answers {list(got.shape)}"
                f"{'' if np.isfinite(got).all() else ' with NaN/Inf'}; expected "
                f"{list(want_shape)}")
        before = _run_original(original, rows, chosen_in, chosen_out)
        check = run.compare(got, before, run.tolerances()["exact"])
        run.write_json(run.workdir.train_json, {
            "imported": str(src), "sha256": self.fingerprint(run.pipeline),
            "producer": f"{original.producer_name} {original.producer_version}".strip(),
            "opsets": {o.domain or "ai.onnx": o.version for o in original.opset_import},
            "checks": {"onnx_import": check},
        })
        run.progress(f"[train] imported {src.name} (sha256 "
                     f"{self.fingerprint(run.pipeline)[:12]}...), nothing to train")

    def lineage(self, run: Run) -> dict[str, Any]:
        return {"model_kind": "onnx", "imported_onnx": run.pipeline.model.path,
                "imported_onnx_sha256": run.read_json(run.workdir.train_json)["sha256"]}

    def describe(self, run: Run) -> dict[str, Any]:
        train = run.read_json(run.workdir.train_json)
        return {"kind": "onnx", "imported": train["imported"], "sha256": train["sha256"],
                "producer": train["producer"], "opsets": train["opsets"]}


def _run_original(original: Any, rows: np.ndarray, input_name: str,
                  output_name: str) -> np.ndarray:
    """The unmodified model's chosen output on ``rows``, as [n, k]."""
    import onnxruntime as ort

    sess = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = sess.run([output_name], {input_name: np.ascontiguousarray(rows, dtype=np.float32)})
    return np.asarray(out, dtype=np.float32).reshape(len(rows), -1)
