"""Where each pipeline step writes in the workdir."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["Workdir"]


@dataclass(frozen=True)
class Workdir:
    root: Path

    def step_state(self, step: str) -> Path:
        return self.root / ".steps" / f"{step}.json"

    @property
    def ingest(self) -> Path:
        return self.root / "ingest.json"

    @property
    def model(self) -> Path:
        return self.root / "train" / "model.pt"

    @property
    def checkpoint(self) -> Path:
        return self.root / "train" / "checkpoint.pt"

    @property
    def train_json(self) -> Path:
        return self.root / "train" / "train.json"

    @property
    def evaluate(self) -> Path:
        return self.root / "evaluate.json"

    @property
    def compress_dir(self) -> Path:
        return self.root / "compress"

    @property
    def export_dir(self) -> Path:
        return self.root / "export"

    @property
    def profile(self) -> Path:
        return self.root / "profile.json"

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"

    @property
    def acceptance(self) -> Path:
        return self.root / "acceptance.json"

    @property
    def report(self) -> Path:
        return self.root / "report.json"
