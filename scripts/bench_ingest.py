"""Ingest rates for `make bench`: each source against a baseline measured in the same run.

``python -m scripts.bench_ingest [--rows 50000]``:

* PostgreSQL (127.0.0.1:5432, a database of its own, dropped afterwards): ``trainer ingest``'s
  whole path (SQLAlchemy Core read in a read-only transaction, type checks, categorical
  encoding, PII pseudonymization, the snapshot written and fsynced) against the driver's own
  fetch of the same table (psycopg, ``SELECT *``, ``fetchall``);
* Parquet: the same path from a Parquet file against ``pyarrow.parquet.read_table``;
* HTTP: a JSON API on 127.0.0.1 paged by next link, against httpx fetching the same pages and
  parsing them with ``json.loads``.

* NATS JetStream: ``trainer ingest --follow``'s whole path (fetch, strict JSON, the table check,
  PII pseudonymized, rows staged in SQLite, acks, the snapshot cut) against a raw nats-py pull
  consumer of the same messages (``scripts/bench_ingest_streams.raw_rate``), one row per message.
  The stream clients alone against raw subscribers (MQTT and NATS) are in
  ``scripts/bench_ingest_streams``.

Figures are rows per second; no target (the issue asks for the measured rate).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq

from examples.load_sql import load
from trainer.config import Pipeline
from trainer.ingest.batch import ingest_source
from trainer.store import FeatureStore

DATA = {"label": "cultivar", "pii": ["customer_email"], "categorical": ["shop"]}


def _best(fn: Callable[[], Any], repeat: int = 3) -> float:
    """The fastest of ``repeat`` runs, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _pipeline(base: Path, data: dict[str, Any]) -> Pipeline:
    """A pipeline file of just ``[data]`` and a store in ``base``."""
    path = base / "p.toml"
    path.write_text("[data]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in data.items())
                    + '\n[store]\npath = "store"\n')
    return Pipeline.load(path)


def _ours(work: Path, data: dict[str, Any]) -> Callable[[], Any]:
    """One full ingest into a fresh store per call."""
    counter = iter(range(1_000_000))

    def run() -> None:
        base = work / f"run{next(counter)}"
        base.mkdir(parents=True)
        pipeline = _pipeline(base, {**data, "region": "local"})
        with FeatureStore(base / "store") as store:
            ingest_source(store, pipeline.data, base, lambda m: None)
    return run


def _row(name: str, rows: int, ours: float, base: float, baseline_name: str) -> dict[str, Any]:
    return {"name": name, "figure": round(rows / ours), "baseline": round(rows / base),
            "unit": "rows/s", "baseline_name": baseline_name,
            "ratio": round(base / ours, 3), "target": "-", "pass": None}


def bench_postgres(work: Path, rows: int) -> dict[str, Any]:
    name = f"ef_bench_{uuid.uuid4().hex[:8]}"
    admin = "host=127.0.0.1 port=5432 user=root dbname=test"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql://root@127.0.0.1:5432/{name}"
    try:
        load(url, "wine_sales")
        with psycopg.connect(f"host=127.0.0.1 port=5432 user=root dbname={name}",
                             autocommit=True) as conn:
            repeat = max(0, rows // 178 - 1)
            cols = [r[0] for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name ="
                " 'wine_sales' AND column_name <> 'id' ORDER BY ordinal_position").fetchall()]
            listed = ", ".join(f'"{c}"' for c in cols)
            conn.execute(f"INSERT INTO wine_sales ({listed}) SELECT {listed} FROM wine_sales,"  # noqa: S608
                         f" generate_series(1, {repeat})")
            total = conn.execute("SELECT COUNT(*) FROM wine_sales").fetchone()[0]  # type: ignore[index]

        def driver() -> None:
            with psycopg.connect(f"host=127.0.0.1 port=5432 user=root dbname={name}") as c:
                c.execute("SELECT * FROM wine_sales").fetchall()

        base = _best(driver)
        ours = _best(_ours(work / "pg", {"source": url, "table": "wine_sales", "watermark": "id",
                                         "timestamp": "created_at", **DATA}))
        return _row(f"ingest PostgreSQL table ({total:,} rows)", total, ours, base,
                    "psycopg SELECT * fetchall of the same table")
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _wine_rows(n: int) -> list[dict[str, Any]]:
    from sklearn.datasets import load_wine  # noqa: PLC0415 - the bench's data only

    wine = load_wine()
    names = [f.replace("/", "_") for f in wine.feature_names]
    shops = ["harbour", "market-square", "old-town", "station"]
    return [{**{c: float(wine.data[i % 178, j]) for j, c in enumerate(names)},
             "customer_email": f"c{i}@example.com", "shop": shops[i % 4],
             "cultivar": str(wine.target_names[wine.target[i % 178]])} for i in range(n)]


def bench_parquet(work: Path, rows: int) -> dict[str, Any]:
    path = work / "wine.parquet"
    work.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(_wine_rows(rows)), path)
    base = _best(lambda: pq.read_table(path))
    ours = _best(_ours(work / "pq", {"source": f"parquet:{path}", **DATA}))
    return _row(f"ingest Parquet file ({rows:,} rows)", rows, ours, base,
                "pyarrow.parquet.read_table of the same file")


def bench_http(work: Path, rows: int, page: int = 1000) -> dict[str, Any]:
    pages = [json.dumps({"items": chunk, "next": f"/rows?p={k + 1}"
                         if (k + 1) * page < rows else None}).encode()
             for k, chunk in enumerate(_wine_rows(rows)[i:i + page]
                                       for i in range(0, rows, page))]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            k = int(parse_qs(urlsplit(self.path).query).get("p", ["0"])[0])
            body = pages[k]
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/rows"
    try:
        def raw() -> None:
            with httpx.Client() as client:
                nxt: str | None = url
                while nxt:
                    doc = json.loads(client.get(nxt).content)
                    nxt = doc["next"] and url.replace("/rows", "") + doc["next"]

        base = _best(raw)
        ours = _best(_ours(work / "http", {"source": url, "records": "items", "next": "next",
                                           **DATA}))
    finally:
        server.shutdown()
        server.server_close()
    return _row(f"ingest HTTP JSON API ({rows:,} rows, {len(pages)} pages)", rows, ours, base,
                "httpx GET of the same pages + json.loads")


FOLLOW_FEATURES = ["alcohol", "malic_acid", "ash", "alcalinity_of_ash", "magnesium",
                   "total_phenols", "flavanoids", "nonflavanoid_phenols", "proanthocyanins",
                   "color_intensity", "hue", "od280_od315_of_diluted_wines", "proline", "shop"]


def bench_follow(work: Path, rows: int = 10_000) -> dict[str, Any]:
    from examples.pipelines.publish_stream import publish  # noqa: PLC0415
    from scripts.bench_ingest_streams import _messages, _nats_stream, raw_rate  # noqa: PLC0415
    from trainer.ingest.follow import follow  # noqa: PLC0415

    url = "nats://127.0.0.1:4222/bench.follow.rows"
    with _nats_stream(url):
        base = rows / raw_rate(url, rows)
    with _nats_stream(url) as stream:
        publish(url, _messages(rows))
        work.mkdir(parents=True, exist_ok=True)
        data = {"source": url, "stream": stream, "features": FOLLOW_FEATURES,
                "timestamp": "created_at", "snapshot_rows": rows, "snapshot_seconds": 3600,
                "region": "local", **DATA}
        pipeline = _pipeline(work, data)
        stop = threading.Event()
        with FeatureStore(work / "store") as store:
            t0 = time.perf_counter()
            follow(store, pipeline.data, work, stop,
                   lambda line: stop.set() if "[follow] snapshot" in line else None)
            ours = time.perf_counter() - t0
    return _row(f"ingest NATS JetStream with --follow ({rows:,} rows)", rows, ours, base,
                "raw nats-py pull consumer of the same messages")


def bench_ingest(work: Path, rows: int = 50_000) -> list[dict[str, Any]]:
    return [bench_postgres(work / "pg", rows), bench_parquet(work / "parquet", rows),
            bench_http(work / "http", rows), bench_follow(work / "follow", rows // 5)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=50_000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for row in bench_ingest(Path(tmp), args.rows):
            print(f"{row['name']}: {row['figure']:,} rows/s; {row['baseline_name']}: "
                  f"{row['baseline']:,} rows/s; ratio {row['ratio']}x")


if __name__ == "__main__":
    main()
