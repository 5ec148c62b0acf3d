"""The fleet's scale curve: ``scripts/bench_fleet.py`` at several fleet sizes and setups.

``python -m scripts.bench_fleet_curve --agents 100,300,1000 --setups sqlite,pg,pg2 --table``
runs one fleet benchmark per (setup, size) point, each on a fresh control-plane home (and, on
PostgreSQL, a fresh database that the bench creates and drops), and prints agents -> heartbeat
p99, telemetry records/s accepted, release fan-out time, the control plane's and the database's
CPU, and the load generator's own CPU (``gen`` columns: one asyncio process drives every
simulated agent, so near 1.0 core it, not the control plane, is the limit of the point).

Setups: ``sqlite`` (one replica on SQLite, the embedded default), ``pg`` (one replica on
PostgreSQL), ``pgN`` (N replicas on one PostgreSQL database; agents round-robin over them).
``--repeat 3`` runs each point three times and reports each figure's median. One tiny bundle is
trained once for every point. A point that fails is reported with its error, and the curve goes
on.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from scripts.bench_fleet import DEFAULT_PG, _train_bundle, bench_fleet, pg_reachable
from scripts.machine import machine_info
from trainer.cli import keygen

__all__ = ["SATURATED", "curve", "main", "parse_setup", "table"]

SATURATED = 0.9  # the load generator's cores at which a point measures the generator
_FIGURES = ("hb_p50_ms", "hb_p99_ms", "records_per_s", "offered_per_s", "ingest_hb_p99_ms",
            "fanout_s", "fanout_call_s", "cp_cores", "cp_ingest_cores", "db_cores",
            "db_ingest_cores", "gen_cores", "gen_ingest_cores", "errors", "enroll_s",
            "fanout_late")


def parse_setup(name: str) -> tuple[int, bool]:
    """``sqlite`` -> (1, False); ``pg`` -> (1, True); ``pg2`` -> (2, True)."""
    if name == "sqlite":
        return 1, False
    m = re.fullmatch(r"pg(\d*)", name)
    if not m or (m.group(1) and int(m.group(1)) < 1):
        raise ValueError(f"unknown setup {name!r}: sqlite, pg or pgN (N replicas)")
    return int(m.group(1) or 1), True


def curve(work: Path, agents: list[int], setups: list[str], *, database: str = DEFAULT_PG,
          repeat: int = 1, duration: float = 5.0, interval: float = 10.0,
          progress: Any = lambda m: print(m, file=sys.stderr)) -> list[dict[str, Any]]:
    """One point per (setup, agents): the median of ``repeat`` runs of each figure, or the
    error that stopped the point."""
    key, _ = keygen(work / "publisher")
    bundle = _train_bundle(work / "bundle", key)
    points: list[dict[str, Any]] = []
    for setup in setups:
        replicas, pg = parse_setup(setup)
        for n in agents:
            runs: list[dict[str, Any]] = []
            error = ""
            for r in range(repeat):
                t0 = time.perf_counter()
                try:
                    result = bench_fleet(work / f"{setup}-{n}-{r}", devices=n, duration=duration,
                                         interval=interval, replicas=replicas,
                                         database=database if pg else "", bundle=bundle,
                                         progress=lambda m: None)
                except Exception as exc:  # the curve goes on; the point says why it stopped
                    error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                    progress(traceback.format_exc())
                    break
                runs.append(result.figures)
                progress(f"curve: {setup} {n} agents run {r + 1}/{repeat}: "
                         f"p99 {result.figures['hb_p99_ms']:.1f} ms, "
                         f"{result.figures['records_per_s']:.0f} rec/s, fan-out "
                         f"{result.figures['fanout_s']:.2f} s "
                         f"({time.perf_counter() - t0:.0f} s)")
            point: dict[str, Any] = {"setup": setup, "agents": n, "replicas": replicas,
                                     "runs": len(runs), "error": error}
            if runs:
                point.update({k: statistics.median(f[k] for f in runs) for k in _FIGURES})
            points.append(point)
    return points


def _fmt(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def table(points: list[dict[str, Any]]) -> str:
    """The curve as a markdown table."""
    lines = [
        "| setup | agents | heartbeat p50 / p99 | telemetry accepted (offered) | "
        "heartbeat p99 during ingest | fan-out (StartRollout call) | control plane cores "
        "(heartbeats / ingest) | database cores (heartbeats / ingest) | load generator cores "
        "(heartbeats / ingest) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in points:
        if not p["runs"]:
            lines.append(f"| {p['setup']} | {p['agents']} | failed: {p['error']} "
                         "| | | | | | |")
            continue
        db = (f"{_fmt(p['db_cores'], 2)} / {_fmt(p['db_ingest_cores'], 2)}"
              if p["setup"] != "sqlite" else "(in process)")
        gen = f"{_fmt(p['gen_cores'], 2)} / {_fmt(p['gen_ingest_cores'], 2)}"
        if max(p["gen_cores"], p["gen_ingest_cores"]) >= SATURATED:
            gen += " **saturated**"
        late = f", {p['fanout_late']:.0f} late" if p["fanout_late"] else ""
        errors = f" ({p['errors']:.0f} errors)" if p["errors"] else ""
        lines.append(
            f"| {p['setup']} | {p['agents']} | {_fmt(p['hb_p50_ms'])} / {_fmt(p['hb_p99_ms'])} ms"
            f"{errors} | {_fmt(p['records_per_s'], 0)} ({_fmt(p['offered_per_s'], 0)}) rec/s | "
            f"{_fmt(p['ingest_hb_p99_ms'], 0)} ms | {_fmt(p['fanout_s'], 2)} "
            f"({_fmt(p['fanout_call_s'], 2)}) s{late} | {_fmt(p['cp_cores'], 2)} / "
            f"{_fmt(p['cp_ingest_cores'], 2)} | {db} | {gen} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", default="100,300,1000", help="fleet sizes, comma-separated")
    p.add_argument("--setups", default="sqlite,pg,pg2",
                   help="sqlite, pg (one replica on PostgreSQL), pgN (N replicas)")
    p.add_argument("--database", default=DEFAULT_PG, metavar="URL",
                   help="the PostgreSQL server where each point creates (and drops) its "
                        "database (default: EDGEFLEET_BENCH_DATABASE or " + DEFAULT_PG + ")")
    p.add_argument("--repeat", type=int, default=1, help="runs per point (median reported)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of each fleet phase")
    p.add_argument("--interval", type=float, default=10.0, help="heartbeat interval, seconds")
    p.add_argument("--table", action="store_true", help="print the curve as a markdown table")
    p.add_argument("--out", type=Path, help="write the points as JSON here")
    args = p.parse_args(argv)
    try:
        agents = [int(a) for a in args.agents.split(",") if a.strip()]
        setups = [s.strip() for s in args.setups.split(",") if s.strip()]
        for s in setups:
            parse_setup(s)
    except ValueError as exc:
        print(f"error: {exc} (hint: --agents 100,300 --setups sqlite,pg,pg2)", file=sys.stderr)
        return 2
    if any(parse_setup(s)[1] for s in setups) and (why := pg_reachable(args.database)):
        print(f"error: PostgreSQL at {args.database} does not answer: {why} (hint: start it, or "
              "--setups sqlite)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        points = curve(Path(tmp), agents, setups, database=args.database, repeat=args.repeat,
                       duration=args.duration, interval=args.interval)
    if args.table:
        print(table(points))
    else:
        for point in points:
            print(json.dumps(point))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine_info(), "points": points,
                                        "time": time.time()}, indent=2))
    return 1 if any(pt["error"] for pt in points) else 0


if __name__ == "__main__":
    sys.exit(main())
