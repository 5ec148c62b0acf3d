"""Telemetry payloads from agents: parsed with limits into the rows the control plane queries.

Payloads are JSON objects. ``drift`` carries one closed drift window, ``arm_stats`` the
counters of one model version on the device (a regression model's arm adds ``abs_error_sum``
and ``sq_error_sum``, the sums of |error| and error^2 over its labelled rows, with ``correct``
0), ``sample`` labelled rows the device contributed
(``{"model", "version", "features": [[...]], "labels": [...], "pii": {column: [hex HMAC]}}``:
class ids, or a regression model's finite targets;
checked here for shape and limits, then vetted against the model's manifest and the store's
region policy by the retraining service). A payload that does not parse is still stored (and
acknowledged: resending would not fix it) but yields no derived row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from control_plane.domain.record_columns import RecordColumns, as_columns
from control_plane.domain.records import (
    ArmStatsRecord,
    Derived,
    DriftWindowRecord,
    ReportRefusal,
    SampleRecord,
    TelemetryRecord,
)
from fleetcore import strict_json
from fleetcore.errors import InvalidInputError

__all__ = ["KINDS", "MAX_BATCH_RECORDS", "MAX_COUNTER", "MAX_PAYLOAD_BYTES", "REFUSALS",
           "check_reports", "counter", "derive", "screen"]

MAX_BATCH_RECORDS = 1000
MAX_PAYLOAD_BYTES = 256 * 1024
MAX_FEATURES_LISTED = 1024
MAX_SAMPLE_ROWS = 64
MAX_SAMPLE_FEATURES = 4096
MAX_SAMPLE_PII_COLUMNS = 32
# Cumulative counters of one arm on one device: 2^40 requests is ~35 years at 1,000 req/s.
MAX_ARM_REQUESTS = 2**40
MAX_LATENCY_MS = 3_600_000.0
# A regression label or error beyond this is no measurement (the agent refuses labels past
# 1e150; a float32 prediction is below 3.5e38): it bounds an arm's mean absolute error.
MAX_ABS_ERROR = 1e151
# Cauchy-Schwarz holds exactly for real sums; float sums of equal errors may miss it by ulps.
_SUM_SLACK = 1e-9
MAX_VERSION = 2**31 - 1
# SQLite's INTEGER is signed 64-bit: a larger number fails the statement (and once failed the
# whole batch with an internal error).
MAX_COUNTER = 2**63 - 1
# What agents send: every other kind is refused (counted, never stored).
KINDS = frozenset({"arm_stats", "drift", "sample", "install", "error"})


# Exact types, not isinstance: what the JSON parser makes is exactly int, float, bool (which
# is an int to isinstance, and must not pass as a number), and one comparison each is what a
# device's hundreds of reports a batch cost here.
def _num(doc: dict[str, Any], key: str) -> float:
    value = doc.get(key)
    kind = type(value)
    if kind is float:
        if math.isfinite(value):  # type: ignore[arg-type]
            return value  # type: ignore[return-value]
    elif kind is int:
        return float(value)  # type: ignore[arg-type]
    raise InvalidInputError(f"{key} must be a finite number; got {value!r}")


def _int(doc: dict[str, Any], key: str) -> int:
    value = doc.get(key)
    if type(value) is not int or not 0 <= value < 2**63:
        raise InvalidInputError(f"{key} must be an integer in [0, 2^63); got {value!r}")
    return value


def _str(doc: dict[str, Any], key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= 128:
        raise InvalidInputError(f"{key} must be a short string; got {value!r}")
    return value


def _sample(device_id: str, doc: dict[str, Any]) -> SampleRecord:
    features, labels, pii = doc.get("features"), doc.get("labels"), doc.get("pii", {})
    if not isinstance(labels, list) or not 0 < len(labels) <= MAX_SAMPLE_ROWS:
        raise InvalidInputError(f"labels must be a list of 1..{MAX_SAMPLE_ROWS} labels")
    # Class ids, or a regression model's targets: which one the model takes is checked against
    # its manifest when the sample is vetted (domain/samples.py).
    if any(isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
           or abs(v) > MAX_ABS_ERROR for v in labels):
        raise InvalidInputError("labels must be class ids or finite numbers")
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


# The kinds whose payload derives rows (the others are only stored).
DERIVING = frozenset({"drift", "arm_stats", "sample"})


def _parse(device_id: str, record: TelemetryRecord) -> Derived | None:
    if record.kind not in DERIVING:
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
            _feature_psi(doc),
        )
    return _arm_stats(device_id, doc, record.created_at)


def _feature_psi(doc: dict[str, Any]) -> dict[str, float]:
    """A window's per-feature PSI (optional; older agents send none): names of 1..128
    characters, each a finite number >= 0 (PSI is a sum of non-negative terms). A wider model
    keeps its ``MAX_FEATURES_LISTED`` largest (the payload's size limit bounds the parse)."""
    value = doc.get("feature_psi", {})
    if not isinstance(value, dict):
        raise InvalidInputError("feature_psi must map feature names to numbers")
    out: dict[str, float] = {}
    for name, psi in value.items():
        if not 0 < len(name) <= 128:
            raise InvalidInputError("feature_psi names must be 1..128 characters")
        if (isinstance(psi, bool) or not isinstance(psi, int | float) or not math.isfinite(psi)
                or psi < 0):
            raise InvalidInputError(f"feature_psi of {name[:32]!r} must be a finite number >= 0")
        out[name] = float(psi)
    if len(out) > MAX_FEATURES_LISTED:
        top = sorted(out.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_FEATURES_LISTED]
        out = dict(top)
    return out


def _arm_stats(device_id: str, doc: dict[str, Any], created_at: float) -> ArmStatsRecord:
    """One arm's counters, consistent with each other or refused: a device cannot claim more
    correct answers than labels, more labels or errors than requests, or absurd latencies."""
    requests, errors = _int(doc, "requests"), _int(doc, "errors")
    labelled, correct = _int(doc, "labelled"), _int(doc, "correct")
    p50, p95 = _num(doc, "p50_ms"), _num(doc, "p95_ms")
    if requests > MAX_ARM_REQUESTS:
        raise InvalidInputError(f"requests {requests} is beyond any device (limit "
                                f"{MAX_ARM_REQUESTS})")
    if not correct <= labelled <= requests or errors > requests:
        raise InvalidInputError(
            f"inconsistent counts: correct {correct}, labelled {labelled}, errors {errors}, "
            f"requests {requests} (needs correct <= labelled <= requests, errors <= requests)")
    if not 0.0 <= p50 <= p95 <= MAX_LATENCY_MS:
        raise InvalidInputError(f"latencies p50 {p50} ms, p95 {p95} ms are not "
                                f"0 <= p50 <= p95 <= {MAX_LATENCY_MS}")
    abs_sum, sq_sum = _error_sums(doc, labelled, correct)
    return ArmStatsRecord(device_id, _str(doc, "model"), _version(doc), requests, errors, p50,
                          p95, labelled, correct, created_at, abs_sum, sq_sum)


def _error_sums(doc: dict[str, Any], labelled: int, correct: int) -> tuple[float, float]:
    """A regression arm's (sum |e|, sum e^2), consistent or refused: both finite and >= 0,
    0 without labels, |e| at most ``MAX_ABS_ERROR`` on average, and sum|e|^2 / n <= sum e^2
    <= (sum|e|)^2 (Cauchy-Schwarz both ways). Absent: a classifier's arm (0, 0)."""
    if "abs_error_sum" not in doc and "sq_error_sum" not in doc:
        return 0.0, 0.0
    abs_sum, sq_sum = _num(doc, "abs_error_sum"), _num(doc, "sq_error_sum")
    if correct:
        raise InvalidInputError(f"a regression arm counts no correct answers; got {correct}")
    if abs_sum < 0 or sq_sum < 0 or (labelled == 0 and (abs_sum or sq_sum)):
        raise InvalidInputError(f"error sums {abs_sum}, {sq_sum} must be >= 0, and 0 with no "
                                "labelled rows")
    if labelled and abs_sum / labelled > MAX_ABS_ERROR:
        raise InvalidInputError(f"a mean absolute error of {abs_sum / labelled:.4g} is beyond "
                                f"any label (limit {MAX_ABS_ERROR:g})")
    if labelled and not (abs_sum / labelled) * (abs_sum / (1 + _SUM_SLACK)) <= sq_sum <= (
            abs_sum * abs_sum * (1 + _SUM_SLACK)):
        raise InvalidInputError(
            f"inconsistent error sums: sum|e| {abs_sum:.6g}, sum e^2 {sq_sum:.6g} over "
            f"{labelled} rows (needs sum|e|^2 / n <= sum e^2 <= sum|e|^2)")
    return abs_sum, sq_sum


def _version(doc: dict[str, Any]) -> int:
    version = _int(doc, "version")
    if not 1 <= version <= MAX_VERSION:
        raise InvalidInputError(f"version must be in [1, {MAX_VERSION}]; got {version}")
    return version


def derive(device_id: str, records: Sequence[TelemetryRecord] | RecordColumns
           ) -> tuple[dict[int, Derived], dict[int, str]]:
    """The derived rows of a batch, keyed by seq, and why each malformed payload was skipped
    (also keyed by seq; the caller logs them)."""
    if len(records) > MAX_BATCH_RECORDS:
        raise InvalidInputError(
            f"telemetry batch has {len(records)} records; the limit is {MAX_BATCH_RECORDS}"
        )
    out: dict[int, Derived] = {}
    problems: dict[int, str] = {}
    columns = as_columns(records)
    for record in columns.records(columns.kind_mask(DERIVING)):  # most derive nothing
        try:
            row = _parse(device_id, record)
        except (ValueError, InvalidInputError) as exc:
            problems[record.seq] = str(exc)
            continue
        if row is not None:
            out[record.seq] = row
    return out, problems


# Why a device's report was refused: fixed categories, so that per-device counters stay few.
MALFORMED = "malformed"
NOT_IN_RELEASE = "not-in-release"
OUT_OF_TIME = "time-out-of-range"
UNKNOWN_KIND = "unknown-kind"
OUT_OF_RANGE = "out-of-range"  # a seq or time the store cannot hold
TOO_LARGE = "too-large"
OVER_QUOTA = "over-quota"
REGION = "region-not-allowed"
SAMPLE_REFUSED = "sample-refused"  # the sample does not fit its model version or policy
REFUSALS = (MALFORMED, NOT_IN_RELEASE, OUT_OF_TIME, UNKNOWN_KIND, OUT_OF_RANGE, TOO_LARGE,
            OVER_QUOTA, REGION, SAMPLE_REFUSED)


def counter(value: int) -> int:
    """A device's counter (the outbox's drop count, depth) as the store can hold it."""
    return max(0, min(int(value), MAX_COUNTER))


def screen(device_id: str, records: Sequence[TelemetryRecord] | RecordColumns
           ) -> tuple[RecordColumns, list[ReportRefusal]]:
    """Split a batch into the records that may be stored and the refusals of the others: a
    seq outside [0, 2^63), a creation time that is not a finite number, an unknown kind, a
    payload over ``MAX_PAYLOAD_BYTES``. A refused record is counted, never stored, and still
    acknowledged (resending it would not fix it); the rest of the batch goes on. Array
    operations over the batch (``RecordColumns``): the refused records alone are looked at one
    by one."""
    columns = as_columns(records)
    out_of_range = (columns.seqs > MAX_COUNTER) | ~np.isfinite(columns.created_at)
    unknown = ~columns.kind_mask(KINDS)
    too_large = columns.sizes > MAX_PAYLOAD_BYTES
    bad = out_of_range | unknown | too_large
    if not bad.any():
        return columns, []  # the usual batch
    refused: list[ReportRefusal] = []
    kinds = columns.kind_names
    for i in np.flatnonzero(bad).tolist():
        reason = OUT_OF_RANGE if out_of_range[i] else UNKNOWN_KIND if unknown[i] else TOO_LARGE
        kind = kinds[columns.kind_index[i]]
        refused.append(ReportRefusal(device_id, kind if kind in KINDS else "?", reason))
    return columns.select(~bad), refused


# A window may end this far ahead of the control plane's clock (skew), and be this old (the
# agent's outbox keeps reports through an outage of about this long).
MAX_CLOCK_AHEAD_SECONDS = 300.0
MAX_REPORT_AGE_SECONDS = 30 * 86400.0


def check_reports(device_id: str, records: Sequence[TelemetryRecord] | RecordColumns,
                  derived: dict[int, Derived],
                  problems: dict[int, str], arms: set[tuple[str, int]],
                  now: float) -> dict[int, Derived]:
    """Judge what a device reported against what it was told to run.

    ``arms``: the (model, version) pairs of the device's current assignment. Arm statistics
    and drift windows count only for those; a drift window must lie between
    ``MAX_REPORT_AGE_SECONDS`` ago and ``MAX_CLOCK_AHEAD_SECONDS`` ahead of ``now``. A
    malformed payload of a kind that derives rows is refused too. Each refusal replaces the
    row (a ``ReportRefusal``: counted per device, never used)."""
    if not derived and not problems:
        return {}  # the usual batch of plain records: nothing to judge
    columns = as_columns(records)
    kinds = {r.seq: r.kind for r in columns.records(columns.kind_mask(DERIVING))}
    out: dict[int, Derived] = {}
    for seq in problems:
        out[seq] = ReportRefusal(device_id, kinds.get(seq, "?"), MALFORMED)
    for seq, row in derived.items():
        reason = ""
        if isinstance(row, ArmStatsRecord | DriftWindowRecord) and (
                (row.model, row.version) not in arms):
            reason = NOT_IN_RELEASE
        elif isinstance(row, DriftWindowRecord) and not (
                now - MAX_REPORT_AGE_SECONDS <= row.start <= row.end
                <= now + MAX_CLOCK_AHEAD_SECONDS):
            reason = OUT_OF_TIME
        out[seq] = ReportRefusal(device_id, kinds.get(seq, "?"), reason) if reason else row
    return out
