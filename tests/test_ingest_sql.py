"""SQL sources against the real PostgreSQL and MariaDB of this machine, each test in a
database of its own: the snapshot holds the table's rows, a rerun reads only new rows, PII is
never written in the clear, a region outside the policy is refused, credentials appear
nowhere, and every failure is one `error:` line naming the source with the store unchanged."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from examples.load_sql import SHOPS, load
from tests.ingest_support import files_containing, maria_url, pg_url, write_pipeline
from trainer.cli import main as trainer_main
from trainer.config import Pipeline
from trainer.ingest.batch import ingest_source, source_key
from trainer.store import FeatureStore

__all__ = ["maria_url", "pg_url"]  # fixtures

WINE = {"table": "wine_sales", "watermark": "id", "timestamp": "created_at", "label": "cultivar",
        "pii": ["customer_email"], "categorical": ["shop"]}


def _engine(url: str) -> Any:
    scheme, _, rest = url.partition("://")
    driver = {"postgresql": "postgresql+psycopg", "mysql": "mysql+pymysql"}[scheme]
    return create_engine(f"{driver}://{rest}")


def _table_rows(url: str) -> list[Any]:
    engine = _engine(url)
    with engine.connect() as conn:
        rows = list(conn.execute(text("SELECT * FROM wine_sales ORDER BY id")).mappings())
    engine.dispose()
    return rows


def _ingest(tmp_path: Path, url: str, **data: Any) -> tuple[FeatureStore, Any]:
    pipeline = Pipeline.load(write_pipeline(tmp_path, {"source": url, **WINE, **data}))
    store = FeatureStore(tmp_path / "work" / "store", allowed_regions=["eu-west"])
    snap = ingest_source(store, pipeline.data, tmp_path, lambda m: None)
    return store, snap


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """rc, stdout and stderr; on failure stderr is checked to end in exactly one `error:`
    line (after the steps' progress lines) and returned as that line."""
    capsys.readouterr()
    rc = trainer_main(list(args))
    out = capsys.readouterr()
    if rc == 0:
        return rc, out.out, out.err
    errors = [line for line in out.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and out.err.rstrip().endswith(errors[0]), out.err
    assert "Traceback" not in out.err
    return rc, out.out, errors[0]


@pytest.mark.parametrize("url_fixture", ["pg_url", "maria_url"])
def test_snapshot_holds_the_tables_rows(url_fixture: str, request: pytest.FixtureRequest,
                                        tmp_path: Path) -> None:
    url = request.getfixturevalue(url_fixture)
    assert load(url, "wine_sales", rows=120) == 120
    store, snap = _ingest(tmp_path, url)
    rows = _table_rows(url)
    assert len(snap.y) == len(rows) == 120
    assert "id" not in snap.feature_names and "created_at" not in snap.feature_names
    assert "customer_email" not in snap.feature_names and "cultivar" not in snap.feature_names
    vocab = snap.encoding["categories"]["shop"]
    assert vocab == sorted(SHOPS)
    for i, row in enumerate(rows):
        for j, name in enumerate(snap.feature_names):
            want = vocab.index(row[name]) + 1 if name == "shop" else np.float32(row[name])
            assert snap.X[i, j] == want, (i, name)
        assert snap.labels[snap.y[i]] == row["cultivar"]
    assert snap.pii["customer_email"][0] == store.pseudonymize([rows[0]["customer_email"]])[0]
    origin = snap.lineage["origin"]
    assert origin["kind"] == "sql" and origin["rows_new"] == 120
    assert origin["watermark"] == {"column": "id", "after": None, "upto": 120}
    assert origin["query_digest"].startswith("sha256:")
    store.close()


def test_rerun_reads_only_new_rows(pg_url: str, tmp_path: Path) -> None:
    load(pg_url, "wine_sales", rows=100)
    store, first = _ingest(tmp_path, pg_url)
    store.close()
    # Rows already read are changed in the database: a rerun that read them again would
    # carry the change; an incremental one leaves the parent's rows as they were.
    engine = _engine(pg_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE wine_sales SET alcohol = 99 WHERE id <= 100"))
    engine.dispose()
    load(pg_url, "wine_sales", rows=30, offset=100)
    store, second = _ingest(tmp_path, pg_url)
    assert second.lineage["parent"] == first.id
    assert len(second.y) == 130
    assert second.lineage["origin"]["rows_new"] == 30
    assert second.lineage["origin"]["watermark"] == {"column": "id", "after": 100, "upto": 130}
    alcohol = second.feature_names.index("alcohol")
    assert np.array_equal(second.X[:100], first.X) and (second.X[:100, alcohol] != 99).all()
    store.close()
    # Nothing new: the same snapshot, no new one in the chain.
    store, third = _ingest(tmp_path, pg_url)
    assert third.id == second.id
    assert [s["id"] for s in store.chain(third.id)] == [second.id, first.id]
    store.close()


def test_window_keeps_the_most_recent_rows(pg_url: str, tmp_path: Path) -> None:
    load(pg_url, "wine_sales", rows=100)
    store, _ = _ingest(tmp_path, pg_url, window=60)
    store.close()
    load(pg_url, "wine_sales", rows=20, offset=100)
    store, snap = _ingest(tmp_path, pg_url, window=60)
    rows = _table_rows(pg_url)[-60:]
    assert len(snap.y) == 60
    assert [snap.labels[k] for k in snap.y] == [r["cultivar"] for r in rows]
    store.close()


def test_pii_is_never_written_in_the_clear(pg_url: str, tmp_path: Path) -> None:
    load(pg_url, "wine_sales", rows=50)
    store, snap = _ingest(tmp_path, pg_url)
    store.close()
    assert snap.pii["customer_email"].shape == (50,)
    for i in (0, 17, 49):
        assert files_containing(tmp_path / "work", f"customer{i}@example.com".encode()) == []


def test_region_outside_the_policy_is_refused(pg_url: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    load(pg_url, "wine_sales", rows=20)
    pipeline = write_pipeline(tmp_path, {"source": pg_url, **WINE, "region": "us-east"},
                              regions=["eu-west"])
    rc, _, err = _cli(capsys, "ingest", str(pipeline), "--workdir", str(tmp_path / "work"))
    assert rc != 0 and "us-east" in err
    with FeatureStore(tmp_path / "work" / "store") as store:
        assert store.list() == []


def test_credentials_appear_nowhere(pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str],
                                    caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cret-Pa55word-never-written"
    monkeypatch.setenv("EF_DB_PASSWORD", secret)  # trust auth: the server takes any password
    load(pg_url, "wine_sales", rows=40)
    pipeline = write_pipeline(tmp_path, {"source": pg_url, **WINE,
                                         "password_env": "EF_DB_PASSWORD"})
    caplog.set_level(logging.DEBUG)
    rc, out, err = _cli(capsys, "run", str(pipeline), "--workdir", str(tmp_path / "work"),
                        "--publisher-key", str(_key(tmp_path)))
    assert rc == 0, err
    assert secret not in out + err + caplog.text
    assert files_containing(tmp_path, secret.encode()) == []
    # A password written into the URL is refused, and not repeated in the message.
    bad = write_pipeline(tmp_path / "bad", {"source": pg_url.replace("root@", f"root:{secret}@"),
                                            **WINE})
    rc, _, err = _cli(capsys, "ingest", str(bad), "--workdir", str(tmp_path / "bad" / "w"))
    assert rc != 0 and "password_env" in err and secret not in err


def _key(tmp_path: Path) -> Path:
    assert trainer_main(["keygen", "--out", str(tmp_path / "keys")]) == 0
    return tmp_path / "keys" / "publisher.key"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_failures_are_one_line_and_leave_the_store_unchanged(
        pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    load(pg_url, "wine_sales", rows=30)
    work = tmp_path / "work"
    good = write_pipeline(tmp_path, {"source": pg_url, **WINE})
    assert _cli(capsys, "ingest", str(good), "--workdir", str(work))[0] == 0
    with FeatureStore(work / "store") as store:
        before = store.list()
        cursor = store.cursor(source_key(Pipeline.load(good).data))
    port = _closed_port()
    cases: dict[str, dict[str, Any]] = {
        "refused": {"source": f"postgresql://root@127.0.0.1:{port}/x", **WINE},
        "query": {"source": pg_url, **{**WINE, "table": None}, "query": "SELECT nope FROM x"},
        "type": {"source": pg_url, **WINE, "categorical": []},  # shop is text, not a number
    }
    for name, case in cases.items():
        data = {k: v for k, v in case.items() if v is not None}
        pipeline = write_pipeline(tmp_path, data, name=f"{name}.toml")
        rc, _, err = _cli(capsys, "ingest", str(pipeline), "--workdir", str(work))
        assert rc == 1, name
        if name == "type":
            assert "'shop'" in err and "row 1" in err and "categorical" in err
        else:
            assert "127.0.0.1" in err, err
    with FeatureStore(work / "store") as store:
        assert store.list() == before
        assert store.cursor(source_key(Pipeline.load(good).data)) == cursor


def test_mariadb_wrong_password_is_one_line_without_it(
        maria_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    load(maria_url, "wine_sales", rows=10)
    monkeypatch.setenv("EF_MARIA_PASSWORD", "definitely-wrong-pw")
    pipeline = write_pipeline(tmp_path, {"source": maria_url, **WINE,
                                         "password_env": "EF_MARIA_PASSWORD"})
    rc, _, err = _cli(capsys, "ingest", str(pipeline), "--workdir", str(tmp_path / "w"))
    assert rc == 1
    assert "Access denied" in err and "definitely-wrong-pw" not in err
    assert maria_url.split("@")[1] in err


def test_a_query_cannot_write(pg_url: str, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    load(pg_url, "wine_sales", rows=10)
    data = {k: v for k, v in WINE.items() if k not in ("table", "watermark")}
    queries = {
        # a SELECT that writes (advances a sequence) fails in the read-only transaction
        "read-only": "SELECT w.*, nextval('wine_sales_id_seq') AS n FROM wine_sales w",
        "data-modifying": "WITH gone AS (DELETE FROM wine_sales RETURNING *) SELECT * FROM gone",
        "more than one statement": "SELECT * FROM wine_sales; DELETE FROM wine_sales",
    }
    for why, query in queries.items():
        pipeline = write_pipeline(tmp_path, {"source": pg_url, **data, "query": query})
        rc, _, err = _cli(capsys, "ingest", str(pipeline), "--workdir", str(tmp_path / "w"))
        assert rc == 1 and why in err, err
    assert len(_table_rows(pg_url)) == 10


@pytest.mark.slow
def test_retraining_reads_new_rows_and_the_devices_samples(
        pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A retraining job (a new workdir, as the control plane gives each) on a pipeline whose
    store is shared reads only the rows added since the last snapshot, plus the samples."""
    load(pg_url, "wine_sales", rows=150)
    store_dir = tmp_path / "store"
    pipeline = write_pipeline(tmp_path, {"source": pg_url, **WINE},
                              store={"path": str(store_dir), "allowed_regions": ["eu-west"]})
    key = _key(tmp_path)
    rc, _, err = _cli(capsys, "run", str(pipeline), "--workdir", str(tmp_path / "job-1"),
                      "--publisher-key", str(key), "--json")
    assert rc == 0, err
    load(pg_url, "wine_sales", rows=28, offset=150)
    with FeatureStore(store_dir) as store:
        base = store.get(store.cursor(source_key(Pipeline.load(pipeline).data))[0])  # type: ignore[index]
    rows = [{"device": "dev-a", "version": 1, "region": "eu-west",
             "features": base.X[:12].astype(float).tolist(), "labels": base.y[:12].tolist(),
             "pii": {"customer_email": ["" for _ in range(12)]}}]
    samples = tmp_path / "samples.json"
    samples.write_text(json.dumps({"model": "ingest-test", "rows": rows}))
    rc, out, err = _cli(capsys, "run", str(pipeline), "--workdir", str(tmp_path / "job-2"),
                        "--publisher-key", str(key), "--samples", str(samples),
                        "--bundle-version", "2", "--json")
    assert rc == 0, err
    report = json.loads(out)
    dataset = report["dataset"]
    assert dataset["rows"] == 178 and dataset["lineage"]["parent"] == base.id
    assert dataset["lineage"]["origin"]["rows_new"] == 28
    assert [s["rows"] for s in report["samples"]] == [12]
    with FeatureStore(store_dir) as store:
        (sample,) = report["samples"]
        assert store.get(sample["snapshot"]).lineage["parent"] == dataset["snapshot"]
