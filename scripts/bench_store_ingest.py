"""What one telemetry batch costs the store, on SQLite and on PostgreSQL (what limits ingest).

``python -m scripts.bench_store_ingest [--batches 20] [--size 500]`` writes agent-sized batches
(one ``drift`` window and ``arm_stats`` records, as scripts/bench_fleet.py sends them) straight
through ``Store.ingest_telemetry``, the call the control plane makes on its event loop for each
``SendTelemetry``, on a SQLite file and on a fresh PostgreSQL database (created and dropped at
EDGEFLEET_BENCH_DATABASE), and reports milliseconds per batch and records/s. The baseline on
PostgreSQL is one ``SELECT 1`` round trip on the same kind of connection, times the statements a
batch sent when each record and each derived row was a statement of its own (the design before
the bulk inserts and segments): the ratio says how far below that floor the batch now is.
Then two stores (two pools, as two replicas have) write at once from two threads: with the one
database-wide write lock (control_plane/storage/postgres.py) their sum stays near one writer's
rate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from control_plane.domain.records import CertificateRecord, DeviceRecord, TelemetryRecord
from control_plane.domain.telemetry import derive
from control_plane.storage import Store, open_store
from scripts.bench_fleet import DEFAULT_PG, bench_database, pg_reachable

__all__ = ["bench_store_ingest", "main"]

_ARM = json.dumps({"model": "digits", "version": 1, "requests": 120, "errors": 0, "p50_ms": 0.4,
                   "p95_ms": 0.9, "labelled": 12, "correct": 11}, sort_keys=True).encode()


def _drift(now: float) -> bytes:
    return json.dumps({"model": "digits", "version": 1, "start": now - 60, "end": now,
                       "rows": 500, "score": 0.05, "drifted": False, "prediction_psi": 0.01,
                       "drifted_features": []}, sort_keys=True).encode()


def _device(store: Store, name: str = "dev-0") -> str:
    store.add_token(f"t-{name}", {}, 0.0, 1e12, "bench")
    store.enroll(f"t-{name}", 1.0, DeviceRecord(id=name, labels={}, enrolled_at=1.0,
                                                agent_version="1", host={}),
                 CertificateRecord(serial=f"s-{name}", kind="device", subject=name,
                                   not_before=0.0, not_after=1e12, issued_at=1.0))
    return name


def _measure(store: Store, batches: int, size: int, name: str = "dev-0") -> dict[str, float]:
    device, seq, per_batch = _device(store, name), 0, []
    statements = 0
    for _ in range(batches + 2):  # the first two warm the connection and the caches
        now = time.time()
        records = []
        for k in range(size):
            seq += 1
            records.append(TelemetryRecord(seq, "drift" if k == 0 else "arm_stats", now,
                                           _drift(now) if k == 0 else _ARM))
        derived, _ = derive(device, records)
        statements = len(records) + len(derived) + 1  # + the device's telemetry status row
        t0 = time.perf_counter()
        store.ingest_telemetry(device, records, derived, now, 0, 0)
        per_batch.append(time.perf_counter() - t0)
    per_batch = per_batch[2:]
    ms = statistics.median(per_batch) * 1e3
    return {"ms_per_batch": ms, "records_per_s": size / (ms / 1e3), "statements": statements}


def _concurrent(url: str, writers: int, batches: int, size: int) -> float:
    """Records/s of ``writers`` stores writing at once, each from its own thread."""
    stores = [open_store(url) for _ in range(writers)]
    barrier = threading.Barrier(writers)
    seconds: list[float] = []

    def write(i: int) -> None:
        barrier.wait()
        t0 = time.perf_counter()
        _measure(stores[i], batches, size, f"dev-w{i}")
        seconds.append(time.perf_counter() - t0)

    try:
        threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for st in stores:
            st.close()
    return writers * (batches + 2) * size / max(seconds)


def _round_trip_ms(url: str, n: int = 2000) -> float:
    import psycopg  # noqa: PLC0415

    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(50):
            conn.execute("SELECT 1")
        t0 = time.perf_counter()
        for _ in range(n):
            conn.execute("SELECT 1")
        return (time.perf_counter() - t0) / n * 1e3


def bench_store_ingest(work: Path, server: str = DEFAULT_PG, *, batches: int = 20,
                       size: int = 500) -> list[dict[str, Any]]:
    sqlite_store = open_store(f"sqlite:///{work / 'registry.db'}")
    try:
        lite = _measure(sqlite_store, batches, size)
    finally:
        sqlite_store.close()
    rows: list[dict[str, Any]] = [{
        "name": f"store: one {size}-record telemetry batch, SQLite", "unit": "ms",
        "figure": round(lite["ms_per_batch"], 2), "baseline": None, "baseline_name": "-",
        "ratio": None, "target": "-", "pass": None,
        "records_per_s": round(lite["records_per_s"])}]
    why = pg_reachable(server)
    if why:
        rows.append({"name": f"store: one {size}-record telemetry batch, PostgreSQL",
                     "unit": "ms", "figure": None, "baseline": None, "baseline_name": "-",
                     "ratio": None, "target": "-", "pass": None,
                     "note": f"PostgreSQL not reachable at {server}: {why}"})
        return rows
    with bench_database(server) as url:
        pg_store = open_store(url)
        try:
            pg = _measure(pg_store, batches, size)
        finally:
            pg_store.close()
        rtt = _round_trip_ms(url)
        two = _concurrent(url, 2, batches, size)
    floor = rtt * pg["statements"]
    rows.append({
        "name": f"store: one {size}-record telemetry batch, PostgreSQL", "unit": "ms",
        "figure": round(pg["ms_per_batch"], 2), "baseline": round(floor, 2),
        "baseline_name": f"{pg['statements']:.0f} statements (a row each) x one SELECT 1 "
                         f"round trip ({rtt * 1e3:.0f} us)",
        "ratio": round(pg["ms_per_batch"] / floor, 2), "target": "-", "pass": None,
        "records_per_s": round(pg["records_per_s"]),
        "vs_sqlite": round(pg["ms_per_batch"] / lite["ms_per_batch"], 2)})
    rows.append({
        "name": f"store: two PostgreSQL stores writing {size}-record batches at once",
        "unit": "rec/s", "figure": round(two), "baseline": round(pg["records_per_s"]),
        "baseline_name": "one store alone", "ratio": round(two / pg["records_per_s"], 2),
        "target": "-", "pass": None})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--size", type=int, default=500)
    p.add_argument("--database", default=DEFAULT_PG, metavar="URL")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench_store_ingest(Path(tmp), args.database, batches=args.batches,
                                  size=args.size)
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
