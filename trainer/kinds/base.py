"""The interface between the pipeline and a model kind: what a kind may ask of the run
(``RunContext``, which trainer.pipeline.Run provides) and what the run asks of a kind
(``Kind``). Kept apart from trainer.pipeline so the kinds never import it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from trainer.config import Pipeline
    from trainer.dist import DistContext
    from trainer.store import Snapshot
    from trainer.workdir import Workdir

__all__ = ["Kind", "RunContext"]


class RunContext(Protocol):
    """What a kind uses of the run (trainer.pipeline.Run)."""

    @property
    def pipeline(self) -> Pipeline: ...

    @property
    def workdir(self) -> Workdir: ...

    @property
    def ctx(self) -> DistContext: ...

    @property
    def progress(self) -> Callable[[str], None]: ...

    @property
    def task(self) -> str: ...

    def snapshot(self) -> Snapshot: ...

    def split(self) -> Any: ...

    def tolerances(self) -> dict[str, dict[str, float]]: ...

    def compare(self, got: np.ndarray, want: np.ndarray,
                tolerance: dict[str, float]) -> dict[str, Any]: ...

    def write_json(self, path: Path, doc: Any) -> None: ...

    def read_json(self, path: Path) -> Any: ...


class Kind(Protocol):
    """What the pipeline asks of a model kind."""

    def fingerprint(self, pipeline: Pipeline) -> Any:
        """Extra input of the train step's cache key (a user file's digest); stdlib only."""

    def preflight(self, pipeline: Pipeline) -> None:
        """Cheap checks before any step runs (files exist, sizes); stdlib only."""

    def train_outputs(self, run: RunContext) -> list[Path]: ...

    def train(self, run: RunContext, key: str) -> None: ...

    def evaluate(self, run: RunContext) -> dict[str, Any]:
        """Metrics of the trained model on the test split, in its own framework."""

    def compress(self, run: RunContext, key: str) -> None:
        """Write compress/fp32.onnx, compress/compressed.onnx and compress/compress.json."""

    def compress_outputs(self, run: RunContext) -> list[Path]: ...

    def export_checks(self, run: RunContext, rows: np.ndarray, final: Path) -> dict[str, Any]:
        """Compare the exported files with the trained model on ``rows``."""

    def lineage(self, run: RunContext) -> dict[str, Any]:
        """What the manifest's lineage says about the model (model_kind and its source)."""

    def describe(self, run: RunContext) -> dict[str, Any]:
        """The report's "model" section."""
