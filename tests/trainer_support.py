"""Small pipelines for trainer tests: real digits/wine data, settings sized to finish fast."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fleetcore import pki

MODEL_SIGNING = str(Path(sys.executable).parent / "model_signing")


def verify_bundle(bundle: Path, public_key: Path) -> subprocess.CompletedProcess[str]:
    """The reference OpenSSF model-signing verifier on a bundle."""
    return subprocess.run(
        [MODEL_SIGNING, "verify", "key", str(bundle), "--signature", str(bundle / "model.sig"),
         "--public_key", str(public_key)],
        capture_output=True, text=True, timeout=60, check=False,
    )

SMALL_DIGITS = """
[data]
source = "sklearn:digits"
test_fraction = 0.2
region = "{region}"

[store]
path = "{store}"
allowed_regions = ["eu-west"]

[model]
kind = "{kind}"
hidden = [{hidden}]
channels = [8, 16]

[train]
epochs = {epochs}
batch_size = 64
lr = 0.003
seed = 0
device = "cpu"
threads = 1

[compress]
prune = {prune}
finetune_epochs = 1
quantize = "int8"
calibration_rows = 128

[export]
formats = [{formats}]

[profile]
bins = 10
sample_rows = 100

[bundle]
name = "digits"
version = 1
publisher_key = "publisher.key"
"""


def write_pipeline(
    directory: Path,
    *,
    kind: str = "mlp",
    hidden: str = "64",
    epochs: int = 3,
    prune: float = 0.5,
    region: str = "eu-west",
    store: str = "store",
    name: str = "pipeline.toml",
    formats: str = '"onnx"',
) -> Path:
    write_publisher_key(directory)
    path = directory / name
    path.write_text(SMALL_DIGITS.format(kind=kind, hidden=hidden, epochs=epochs, prune=prune,
                                        region=region, store=store, formats=formats))
    return path


def write_publisher_key(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    key = directory / "publisher.key"
    if not key.exists():
        private = pki.generate_key()
        key.write_bytes(pki.private_key_pem(private))
        (directory / "publisher.pub").write_bytes(pki.public_key_pem(private))
    return key


def write_kind_pipeline(directory: Path, *, source: str, task: str, model: str,
                        extra: str = "", name: str = "pipeline.toml") -> Path:
    """A small pipeline for the sklearn / torch / onnx kinds: ``model`` is the [model] body."""
    write_publisher_key(directory)
    path = directory / name
    path.write_text(f"""
[data]
source = "{source}"
task = "{task}"
test_fraction = 0.2
region = "eu-west"

[store]
path = "store"
allowed_regions = ["eu-west"]

[model]
{model}

[train]
epochs = 40
batch_size = 32
lr = 0.003
seed = 0
device = "cpu"
threads = 1

[compress]
calibration_rows = 128
{extra}

[profile]
bins = 10
sample_rows = 50

[bundle]
name = "kind-test"
version = 1
publisher_key = "publisher.key"
""")
    return path
