"""`fleet drift --since`, `fleet experiments status --history`: history read from the control
plane (drift windows over time with per-feature PSI and daily roll-ups; per-arm series)."""

from __future__ import annotations

import argparse
import datetime as dt
import re
import time
from typing import Any

from edgefleet.v1 import admin_pb2

from fleet.common import RPC_TIMEOUT_SECONDS as T
from fleet.common import Stub, ts
from fleetcore.cli import print_json, print_table
from fleetcore.errors import InvalidInputError

__all__ = [
    "add_arm_history_args",
    "add_drift_history_args",
    "arm_history",
    "arm_history_json",
    "drift_history",
    "drift_history_json",
    "parse_duration",
    "parse_since",
    "print_arm_history",
]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"([0-9]{1,6})([smhdw])")


def add_drift_history_args(drift: argparse.ArgumentParser) -> None:
    drift.add_argument("--since", default="", metavar="WHEN",
                       help="history: every window since a duration back (24h, 7d) or a UTC "
                            "time, with per-feature PSI, and daily roll-ups of older ones")
    drift.add_argument("--device", default="", metavar="ID", help="with --since: one device")
    drift.add_argument("--limit", type=int, default=0, metavar="N",
                       help="with --since: windows at most (default 1,000; newest kept)")


def add_arm_history_args(status: argparse.ArgumentParser) -> None:
    status.add_argument("--history", action="store_true",
                        help="add each arm's counters over time (see --since, --step)")
    status.add_argument("--since", default="24h", metavar="WHEN",
                        help="with --history: a duration back (24h, 7d) or a UTC time "
                             "(default 24h)")
    status.add_argument("--step", default="", metavar="DURATION",
                        help="with --history: time between points (default: automatic)")


def parse_duration(text: str) -> float:
    """``90s``, ``15m``, ``24h``, ``7d``, ``2w``: seconds."""
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise InvalidInputError(f"{text!r} is not a duration: use e.g. 90s, 15m, 24h, 7d, 2w")
    return float(int(m.group(1)) * _UNITS[m.group(2)])


def parse_since(text: str, now: float | None = None) -> float:
    """A duration back from now (``24h``) or a UTC time (``2026-12-01`` or
    ``2026-12-01T08:00:00Z``): Unix seconds."""
    now = time.time() if now is None else now
    if _DURATION.fullmatch(text.strip()):
        return now - parse_duration(text)
    try:
        when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInputError(
            f"--since {text!r} is neither a duration (24h, 7d) nor a time "
            "(2026-12-01T08:00:00Z)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def drift_history_json(h: admin_pb2.DriftHistory) -> dict[str, Any]:
    return {
        "since": h.since, "truncated": h.truncated,
        "windows": [{"device_id": w.device_id, "model": w.model, "version": w.version,
                     "start": w.start, "end": w.end, "rows": w.rows, "score": w.score,
                     "drifted": w.drifted, "prediction_psi": w.prediction_psi,
                     "drifted_features": list(w.drifted_features),
                     "feature_psi": dict(sorted(w.feature_psi.items()))} for w in h.windows],
        "days": [{"device_id": d.device_id, "model": d.model, "version": d.version,
                  "day": dt.date.fromordinal(dt.date(1970, 1, 1).toordinal() + d.day)
                  .isoformat(), "windows": d.windows, "drifted": d.drifted, "rows": d.rows,
                  "mean_score": d.mean_score, "max_score": d.max_score} for d in h.days],
    }


def drift_history(stub: Stub, args: argparse.Namespace) -> None:
    h = stub.GetDriftHistory(admin_pb2.GetDriftHistoryRequest(
        model=args.model, device_id=args.device, since=parse_since(args.since),
        limit=args.limit), timeout=T)
    doc = drift_history_json(h)
    if args.json:
        print_json(doc)
        return
    if doc["days"]:
        print("daily roll-ups (windows past their retention):")
        print_table(("DAY", "DEVICE", "MODEL", "VERSION", "WINDOWS", "DRIFTED", "MEAN SCORE",
                     "MAX SCORE"), [
            (d["day"], d["device_id"], d["model"], d["version"], d["windows"], d["drifted"],
             f"{d['mean_score']:.3f}", f"{d['max_score']:.3f}") for d in doc["days"]])
        print()
    print_table(("WINDOW END", "DEVICE", "MODEL", "VERSION", "ROWS", "SCORE", "DRIFTED",
                 "TOP FEATURES (PSI)"), [
        (ts(w["end"]), w["device_id"], w["model"], w["version"], w["rows"],
         f"{w['score']:.3f}", "yes" if w["drifted"] else "no", _top(w["feature_psi"]))
        for w in doc["windows"]])
    if doc["truncated"]:
        print(f"(the newest {len(doc['windows'])} windows; narrow --since, --model or --device "
              "or raise --limit for more)")


def _top(psi: dict[str, float], n: int = 3) -> str:
    best = sorted(psi.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{name} {value:.2f}" for name, value in best) or "-"


def arm_history_json(h: admin_pb2.ArmHistory) -> dict[str, Any]:
    return {
        "model": h.model, "since": h.since, "step_seconds": h.step_seconds,
        "points": [{"time": p.time, "version": p.version, "requests": p.requests,
                    "errors": p.errors, "labelled": p.labelled, "correct": p.correct,
                    "abs_error_sum": p.abs_error_sum, "p95_ms": p.p95_ms,
                    "devices": p.devices,
                    "accuracy": p.correct / p.labelled if p.labelled and not p.abs_error_sum
                    else None,
                    "mae": p.abs_error_sum / p.labelled if p.labelled and p.abs_error_sum
                    else None} for p in h.points],
    }


def arm_history(stub: Stub, args: argparse.Namespace) -> dict[str, Any]:
    h = stub.GetArmHistory(admin_pb2.GetArmHistoryRequest(
        model=args.model, since=parse_since(args.since),
        step_seconds=parse_duration(args.step) if args.step else 0.0), timeout=T)
    return arm_history_json(h)


def print_arm_history(doc: dict[str, Any]) -> None:
    print(f"\nhistory since {ts(doc['since'])}, every {doc['step_seconds']:.0f}s "
          "(each device's newest counters at each time, summed):")

    def quality(p: dict[str, Any]) -> str:
        if p["mae"] is not None:
            return f"MAE {p['mae']:.4g}"
        return f"{p['accuracy']:.4f}" if p["accuracy"] is not None else "-"

    print_table(("TIME", "VERSION", "DEVICES", "REQUESTS", "ERRORS", "LABELLED", "QUALITY",
                 "P95 MS"), [
        (ts(p["time"]), p["version"], p["devices"], p["requests"], p["errors"], p["labelled"],
         quality(p), f"{p['p95_ms']:.2f}") for p in doc["points"]])
