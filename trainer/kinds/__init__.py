"""One module per model kind behind a small common interface (``Kind``).

* ``torchnet`` - mlp, cnn and torch (the user's own ``nn.Module``): trained here with PyTorch,
  pruned, quantized, exported to ONNX (and TFLite).
* ``sklearn_kind`` - a scikit-learn estimator, trained here, converted with skl2onnx.
* ``onnx_import`` - an ONNX model trained elsewhere; checked and imported, never trained.

The last two share ``onnx_family``: their train step leaves an fp32 ONNX graph, and compress,
export and evaluate work on ONNX only.

Only this package's ``__init__`` is imported by the pipeline at module level; each kind imports
its heavy libraries inside the functions that need them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from trainer.config import Pipeline
    from trainer.pipeline import Run

__all__ = ["Kind", "kind_of"]


class Kind(Protocol):
    """What the pipeline asks of a model kind."""

    def fingerprint(self, pipeline: Pipeline) -> Any:
        """Extra input of the train step's cache key (a user file's digest); stdlib only."""

    def preflight(self, pipeline: Pipeline) -> None:
        """Cheap checks before any step runs (files exist, sizes); stdlib only."""

    def train_outputs(self, run: Run) -> list[Path]: ...

    def train(self, run: Run, key: str) -> None: ...

    def evaluate(self, run: Run) -> dict[str, Any]:
        """Metrics of the trained model on the test split, in its own framework."""

    def compress(self, run: Run, key: str) -> None:
        """Write compress/fp32.onnx, compress/compressed.onnx and compress/compress.json."""

    def compress_outputs(self, run: Run) -> list[Path]: ...

    def export_checks(self, run: Run, rows: np.ndarray, final: Path) -> dict[str, Any]:
        """Compare the exported files with the trained model on ``rows``."""

    def lineage(self, run: Run) -> dict[str, Any]:
        """What the manifest's lineage says about the model (model_kind and its source)."""

    def describe(self, run: Run) -> dict[str, Any]:
        """The report's "model" section."""


def kind_of(name: str) -> Kind:
    if name in ("mlp", "cnn", "torch"):
        from trainer.kinds import torchnet

        return torchnet.TorchKind()
    if name == "sklearn":
        from trainer.kinds import sklearn_kind

        return sklearn_kind.SklearnKind()
    if name == "onnx":
        from trainer.kinds import onnx_import

        return onnx_import.OnnxKind()
    raise ValueError(f"unknown model kind {name!r}")
