"""The pipeline file (TOML): typed sections with defaults and checked values.

Sections and keys (see examples/pipelines/*.toml):
  [data]     source, label, pii, pii_action, test_fraction, region, parent
  [store]    path, allowed_regions (written to the store's policy.toml when the store is
             created; afterwards it must match that file, which the data owner edits)
  [model]    kind (mlp | cnn), hidden
  [train]    epochs, batch_size, lr, seed, device (auto | cpu | cuda), weight_decay, threads
  [compress] prune, finetune_epochs, quantize (none | int8), calibration_rows
  [export]   formats (onnx, tflite), check_rows
  [profile]  bins, sample_rows
  [bundle]   name, version, publisher_key, smoke_rows
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetcore import tomlfile
from fleetcore.errors import InvalidInputError

__all__ = [
    "BundleSettings",
    "CompressSettings",
    "DataSettings",
    "ExportSettings",
    "ModelSettings",
    "Pipeline",
    "ProfileSettings",
    "StoreSettings",
    "TrainSettings",
    "settings_digest",
]


@dataclass(frozen=True)
class DataSettings:
    source: str
    label: str | None = None
    pii: list[str] = field(default_factory=list)
    pii_action: str = "hmac"  # hmac | drop
    test_fraction: float = 0.2
    region: str = "local"
    parent: str | None = None


@dataclass(frozen=True)
class StoreSettings:
    path: str = "store"  # relative to the workdir
    allowed_regions: list[str] | None = None


@dataclass(frozen=True)
class ModelSettings:
    kind: str = "mlp"  # mlp | cnn
    hidden: list[int] = field(default_factory=lambda: [128])
    channels: list[int] = field(default_factory=lambda: [16, 32])  # cnn only


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    weight_decay: float = 0.0
    # CPU threads per process (0: PyTorch's default). A fixed count makes CPU results
    # bit-for-bit repeatable: with several threads the BLAS may split reductions differently
    # when the host is busy, which changes the last bits of the weights.
    threads: int = 0


@dataclass(frozen=True)
class CompressSettings:
    prune: float = 0.0  # fraction of hidden units / channels removed
    finetune_epochs: int = 2
    quantize: str = "int8"  # none | int8
    calibration_rows: int = 256


@dataclass(frozen=True)
class ExportSettings:
    formats: list[str] = field(default_factory=lambda: ["onnx"])
    check_rows: int = 200


@dataclass(frozen=True)
class ProfileSettings:
    bins: int = 10
    sample_rows: int = 500


@dataclass(frozen=True)
class BundleSettings:
    name: str = "model"
    version: int = 1
    publisher_key: str | None = None  # path to the publisher's private key (PEM)
    smoke_rows: int = 8


_SECTIONS: dict[str, type] = {
    "data": DataSettings,
    "store": StoreSettings,
    "model": ModelSettings,
    "train": TrainSettings,
    "compress": CompressSettings,
    "export": ExportSettings,
    "profile": ProfileSettings,
    "bundle": BundleSettings,
}


def _build(cls: type, table: dict[str, Any], section: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(table) - set(known)
    if unknown:
        raise InvalidInputError(f"[{section}]: unknown keys {sorted(unknown)}")
    try:
        return cls(**table)
    except TypeError as exc:
        raise InvalidInputError(f"[{section}]: {exc}") from None


@dataclass(frozen=True)
class Pipeline:
    path: Path
    data: DataSettings
    store: StoreSettings
    model: ModelSettings
    train: TrainSettings
    compress: CompressSettings
    export: ExportSettings
    profile: ProfileSettings
    bundle: BundleSettings

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @classmethod
    def load(cls, path: Path) -> Pipeline:
        path = Path(path).resolve()
        doc = tomlfile.load(path)
        unknown = set(doc) - set(_SECTIONS)
        if unknown:
            raise InvalidInputError(f"{path}: unknown sections {sorted(unknown)}")
        if "data" not in doc or "source" not in doc["data"]:
            raise InvalidInputError(f"{path}: [data] source is required")
        parts = {name: _build(kind, doc.get(name, {}), name) for name, kind in _SECTIONS.items()}
        pipeline = cls(path=path, **parts)
        pipeline.validate()
        return pipeline

    def validate(self) -> None:
        d, m, t, c = self.data, self.model, self.train, self.compress
        e, b = self.export, self.bundle
        checks = [
            (d.pii_action in ("hmac", "drop"), "[data] pii_action must be hmac or drop"),
            (0.0 < d.test_fraction < 0.9, "[data] test_fraction must be in (0, 0.9)"),
            (m.kind in ("mlp", "cnn"), "[model] kind must be mlp or cnn"),
            (bool(m.hidden) and all(isinstance(h, int) and 0 < h <= 65536 for h in m.hidden),
             "[model] hidden must be a non-empty list of layer widths (1..65536)"),
            (all(isinstance(ch, int) and 0 < ch <= 1024 for ch in m.channels),
             "[model] channels must be widths 1..1024"),
            (0 < t.epochs <= 10_000, "[train] epochs must be 1..10000"),
            (0 < t.batch_size <= 65536, "[train] batch_size must be 1..65536"),
            (0 < t.lr < 10, "[train] lr must be in (0, 10)"),
            (t.device in ("auto", "cpu", "cuda"), "[train] device must be auto, cpu or cuda"),
            (0 <= t.threads <= 256, "[train] threads must be 0..256"),
            (0.0 <= c.prune < 1.0, "[compress] prune must be in [0, 1)"),
            (c.quantize in ("none", "int8"), "[compress] quantize must be none or int8"),
            (0 <= c.finetune_epochs <= 1000, "[compress] finetune_epochs must be 0..1000"),
            (bool(e.formats) and set(e.formats) <= {"onnx", "tflite"} and "onnx" in e.formats,
             "[export] formats must include onnx and may add tflite"),
            (isinstance(b.version, int) and b.version > 0,
             "[bundle] version must be an integer > 0"),
            (2 <= self.profile.bins <= 100, "[profile] bins must be 2..100"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidInputError(f"{self.path.name}: {message}")

    def section(self, name: str) -> dict[str, Any]:
        return dataclasses.asdict(getattr(self, name))


def settings_digest(*parts: Any) -> str:
    """A stable hash of JSON-serializable settings and upstream digests."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
