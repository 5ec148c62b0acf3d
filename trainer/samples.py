"""Labelled samples from the fleet, as a retraining job receives them, and the acceptance test.

The control plane writes the samples it accepted for a model into ``samples.json``::

    {"model": "digits", "devices": {"<device>@v1": records, ...},
     "rows": [{"device", "version", "region", "features": [[...]], "labels": [...],
               "pii": {column: [hex HMAC | "", ...]}}, ...]}

``load_samples`` reads it as strict JSON (``fleetcore.strict_json``: UTF-8, no duplicate keys, no
``NaN``/``Infinity``) with limits (size, rows, widths, finite numbers, class ids) into one
``RawTable`` per region, shaped like the base snapshot (same features, labels and PII
columns), with the devices and model versions that contributed as lineage. The PII values are
the device's pseudonyms; the feature store pseudonymizes them again with its own key, so no
value that left a device is stored as is.

``accept`` compares the current model with the new one on the held-out recent rows with a
paired test (``trainer.acceptance``): McNemar's exact test for classification, the Wilcoxon
signed-rank test on absolute errors for regression, at ``alpha``, with ``margin`` as the minimum
effect.

For a regression model, ``labels`` are finite numbers (the target's values).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fleetcore import strict_json
from fleetcore.errors import InvalidInputError
from trainer.sources import RawTable

__all__ = ["MAX_SAMPLES_BYTES", "MAX_SAMPLE_ROWS", "RegionSamples", "accept", "load_samples"]

MAX_SAMPLES_BYTES = 256 * 1024 * 1024
MAX_SAMPLE_ROWS = 1_000_000


@dataclass(frozen=True)
class RegionSamples:
    region: str
    table: RawTable
    origin: dict[str, Any]  # {"devices": {"<device>@v<version>": rows}, "model": name}


def _fail(where: str, message: str) -> InvalidInputError:
    return InvalidInputError(f"{where}: {message}")


def _label_ok(y: object, classes: int) -> bool:
    """A class id below ``classes``; for regression (``classes`` 0) a finite number."""
    if isinstance(y, bool):
        return False
    if classes == 0:
        return isinstance(y, int | float) and math.isfinite(y)
    return isinstance(y, int) and 0 <= y < classes


def _check_record(
    where: str, record: object, width: int, classes: int, pii: list[str]
) -> tuple[str, str, int, list[list[float]], list[float], dict[str, list[str]]]:
    if not isinstance(record, dict):
        raise _fail(where, "must be an object")
    features, ys = record.get("features"), record.get("labels")
    region, device = record.get("region"), record.get("device")
    version = record.get("version")
    if not isinstance(region, str) or not isinstance(device, str) or not device:
        raise _fail(where, "needs string region and device")
    if isinstance(version, bool) or not isinstance(version, int):
        raise _fail(where, "needs an integer version")
    if not isinstance(ys, list) or not isinstance(features, list) or len(ys) != len(features):
        raise _fail(where, "needs one feature row per label")
    for row in features:
        if (
            not isinstance(row, list)
            or len(row) != width
            or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                for v in row
            )
        ):
            raise _fail(where, f"feature rows must be {width} finite numbers")
    if not all(_label_ok(y, classes) for y in ys):
        raise _fail(where, f"labels must be class ids below {classes}" if classes
                    else "labels must be finite numbers (regression targets)")
    values = record.get("pii", {})
    if not isinstance(values, dict) or any(
        name not in pii
        or not isinstance(v, list)
        or len(v) != len(ys)
        or not all(isinstance(x, str) and len(x) <= 128 for x in v)
        for name, v in values.items()
    ):
        raise _fail(where, f"pii must map columns of {pii} to one string per row")
    return region, device, version, features, ys, values


def load_samples(
    path: Path,
    *,
    feature_names: list[str],
    labels: list[str],
    pii: list[str],
    image_shape: tuple[int, int] | None,
    target: str | None = None,
) -> list[RegionSamples]:
    """Samples grouped by region, each a table shaped like the base data (see module doc).
    ``target``: the regression target's name (then ``labels`` is empty)."""
    size = path.stat().st_size
    if size > MAX_SAMPLES_BYTES:
        raise _fail(str(path), f"{size} bytes; the limit is {MAX_SAMPLES_BYTES}")
    data = path.read_bytes()
    doc = strict_json.loads(data, what=f"samples file {path}", max_bytes=MAX_SAMPLES_BYTES)
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise _fail(str(path), 'expected {"model": ..., "rows": [...]}')
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    model = str(doc.get("model", ""))[:128]
    width, classes = len(feature_names), len(labels)
    by_region: dict[str, tuple[list[list[float]], list[float], dict[str, list[str]],
                               Counter[str]]]
    by_region = {}
    total = 0
    for i, record in enumerate(doc["rows"]):
        region, device, version, features, ys, values = _check_record(
            f"{path}: rows[{i}]", record, width, classes, pii
        )
        total += len(ys)
        if total > MAX_SAMPLE_ROWS:
            raise _fail(str(path), f"more than {MAX_SAMPLE_ROWS} rows")
        X, y, p, devices = by_region.setdefault(region, ([], [], {n: [] for n in pii}, Counter()))
        X.extend(features)
        y.extend(ys)
        for name in pii:
            p[name].extend(values.get(name, [""] * len(ys)))
        devices[f"{device}@v{version}"] += len(ys)
    out = []
    for region, (X, y, p, devices) in sorted(by_region.items()):
        table = RawTable(
            feature_names=list(feature_names),
            X=np.asarray(X, dtype=np.float32).reshape(-1, width),
            y=np.asarray(y, dtype=np.int64 if target is None else np.float64),
            labels=list(labels),
            pii={name: np.asarray(v, dtype=str) for name, v in p.items()},
            source=f"device-samples:{model}",
            source_digest=digest,
            image_shape=image_shape,
            target=target,
        )
        out.append(
            RegionSamples(region, table, {"model": model, "devices": dict(sorted(devices.items()))})
        )
    return out


def accept(
    baseline_onnx: Path,
    candidate_onnx: Path,
    X: np.ndarray,
    y: np.ndarray,
    margin: float,
    data: str,
    *,
    task: str = "classification",
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Both models on ``X``/``y``, decided by the paired test of ``trainer.acceptance``."""
    if len(y) == 0:
        raise InvalidInputError("no rows to compare the models on")
    from trainer import onnx_tools  # onnxruntime: only when comparing
    from trainer.acceptance import decide

    return decide(task, onnx_tools.run_onnx(baseline_onnx, X),
                  onnx_tools.run_onnx(candidate_onnx, X), y, margin=margin, alpha=alpha,
                  data=data)
