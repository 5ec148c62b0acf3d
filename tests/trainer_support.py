"""Small pipelines for trainer tests: real digits/wine data, settings sized to finish fast."""

from __future__ import annotations

from pathlib import Path

from fleetcore import pki

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
    directory.mkdir(parents=True, exist_ok=True)
    key = directory / "publisher.key"
    if not key.exists():
        private = pki.generate_key()
        key.write_bytes(pki.private_key_pem(private))
        (directory / "publisher.pub").write_bytes(pki.public_key_pem(private))
    path = directory / name
    path.write_text(SMALL_DIGITS.format(kind=kind, hidden=hidden, epochs=epochs, prune=prune,
                                        region=region, store=store, formats=formats))
    return path
