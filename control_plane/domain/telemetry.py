"""Telemetry payloads from agents: parsed with limits into the rows the control plane queries.

Payloads are JSON objects. ``drift`` carries one closed drift window, ``arm_stats`` the
counters of one model version on the device, ``sample`` labelled rows the device contributed
(``{"model", "version", "features": [[...]], "labels": [...], "pii": {column: [hex HMAC]}}``;
checked here for shape and limits, then vetted against the model's manifest and the store's
region policy by the retraining service). A payload that does not parse is still stored (and
acknowledged: resending would not fix it) but yields no derived row.
"""

from __future__ import annotations

import math
from typing import Any

from control_plane.domain.records import (
    ArmStatsRecord,
    Derived,
    DriftWindowRecord,
    SampleRecord,
    TelemetryRecord,
)
from fleetcore import strict_json
from fleetcore.errors import InvalidInputError

__all__ = ["MAX_BATCH_RECORDS", "MAX_PAYLOAD_BYTES", "derive"]

MAX_BATCH_RECORDS = 1000
MAX_PAYLOAD_BYTES = 256 * 1024
MAX_FEATURES_LISTED = 1024
MAX_SAMPLE_ROWS = 64
MAX_SAMPLE_FEATURES = 4096
MAX_SAMPLE_PII_COLUMNS = 32


def _num(doc: dict[str, Any], key: str) -> float:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInputError(f"{key} must be a finite number; got {value!r}")
    return float(value)


def _int(doc: dict[str, Any], key: str) -> int:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInputError(f"{key} must be a non-negative integer; got {value!r}")
    return value


def _str(doc: dict[str, Any], key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= 128:
        raise InvalidInputError(f"{key} must be a short string; got {value!r}")
    return value


def _sample(device_id: str, doc: dict[str, Any]) -> SampleRecord:
    features, labels, pii = doc.get("features"), doc.get("labels"), doc.get("pii", {})
    if not isinstance(labels, list) or not 0 < len(labels) <= MAX_SAMPLE_ROWS:
        raise InvalidInputError(f"labels must be a list of 1..{MAX_SAMPLE_ROWS} class ids")
    if any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 65536 for v in labels):
        raise InvalidInputError("labels must be class ids in [0, 65536)")
    if not isinstance(features, list) or len(features) != len(labels):
        raise InvalidInputError("features must hold one row per label")
    rows: list[list[float]] = []
    for row in features:
        if not isinstance(row, list) or not 0 < len(row) <= MAX_SAMPLE_FEATURES:
            raise InvalidInputError(f"a feature row must hold 1..{MAX_SAMPLE_FEATURES} numbers")
        if any(isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
               for v in row):
            raise InvalidInputError("features must be finite numbers")
        rows.append([float(v) for v in row])
    if len({len(r) for r in rows}) != 1:
        raise InvalidInputError("feature rows must have the same width")
    if not isinstance(pii, dict) or len(pii) > MAX_SAMPLE_PII_COLUMNS:
        raise InvalidInputError(f"pii must map at most {MAX_SAMPLE_PII_COLUMNS} columns")
    for name, values in pii.items():
        if (not 0 < len(name) <= 128 or not isinstance(values, list)
                or len(values) != len(labels)
                or not all(isinstance(v, str) and len(v) <= 128 for v in values)):
            raise InvalidInputError("pii must map column names to one short string per row")
    return SampleRecord(device_id, _str(doc, "model"), _int(doc, "version"), rows,
                        list(labels), dict(pii))


def _parse(device_id: str, record: TelemetryRecord) -> Derived | None:
    if record.kind not in ("drift", "arm_stats", "sample"):
        return None
    doc = strict_json.loads(record.payload, what=f"{record.kind} payload",
                            max_bytes=MAX_PAYLOAD_BYTES)
    if not isinstance(doc, dict):
        raise InvalidInputError("payload must be a JSON object")
    if record.kind == "sample":
        return _sample(device_id, doc)
    if record.kind == "drift":
        features = doc.get("drifted_features", [])
        if not isinstance(features, list) or len(features) > MAX_FEATURES_LISTED:
            raise InvalidInputError("drifted_features must be a short list")
        return DriftWindowRecord(
            device_id, _str(doc, "model"), _int(doc, "version"), _num(doc, "start"),
            _num(doc, "end"), _int(doc, "rows"), _num(doc, "score"), bool(doc.get("drifted")),
            _num(doc, "prediction_psi"), tuple(str(f)[:128] for f in features),
        )
    return ArmStatsRecord(
        device_id, _str(doc, "model"), _int(doc, "version"), _int(doc, "requests"),
        _int(doc, "errors"), _num(doc, "p50_ms"), _num(doc, "p95_ms"), _int(doc, "labelled"),
        _int(doc, "correct"), record.created_at,
    )


def derive(device_id: str,
           records: list[TelemetryRecord]) -> tuple[dict[int, Derived], dict[int, str]]:
    """The derived rows of a batch, keyed by seq, and why each malformed payload was skipped
    (also keyed by seq; the caller logs them)."""
    if len(records) > MAX_BATCH_RECORDS:
        raise InvalidInputError(
            f"telemetry batch has {len(records)} records; the limit is {MAX_BATCH_RECORDS}"
        )
    out: dict[int, Derived] = {}
    problems: dict[int, str] = {}
    for record in records:
        if len(record.payload) > MAX_PAYLOAD_BYTES:
            raise InvalidInputError(
                f"telemetry record {record.seq} is {len(record.payload)} bytes; the limit is "
                f"{MAX_PAYLOAD_BYTES}"
            )
        try:
            row = _parse(device_id, record)
        except (ValueError, InvalidInputError) as exc:
            problems[record.seq] = str(exc)
            continue
        if row is not None:
            out[record.seq] = row
    return out, problems
