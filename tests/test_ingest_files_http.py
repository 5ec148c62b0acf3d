"""Parquet files and HTTP JSON APIs as sources: the same rows in the snapshot as in the
source, reruns reading only what is new (by file list, by watermark), only the needed columns
read, pagination by next link and by page number, secrets from the environment never written,
and hostile answers (not JSON, too many pages, a next link to another origin, 401) refused in
one line with the store unchanged."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_wine

from fleetcore.errors import InvalidInputError
from tests.ingest_support import files_containing, write_pipeline
from trainer.cli import main as trainer_main
from trainer.config import Pipeline
from trainer.ingest.batch import ingest_source
from trainer.store import FeatureStore

WINE = load_wine()
NAMES = [n.replace("/", "_") for n in WINE.feature_names]


def _rows(start: int, stop: int) -> list[dict[str, Any]]:
    return [{"id": i, **{n: float(WINE.data[i, j]) for j, n in enumerate(NAMES)},
             "email": f"buyer{i}@example.com", "notes": f"free text {i}",
             "cultivar": str(WINE.target_names[WINE.target[i]])} for i in range(start, stop)]


def _ingest(base: Path, data: dict[str, Any]) -> tuple[FeatureStore, Any]:
    pipeline = Pipeline.load(write_pipeline(base, data))
    store = FeatureStore(base / "work" / "store", allowed_regions=["eu-west"])
    try:
        return store, ingest_source(store, pipeline.data, base, lambda m: None)
    except BaseException:
        store.close()
        raise


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


PARQUET = {"label": "cultivar", "pii": ["email"], "features": NAMES}


def test_parquet_folder_is_read_by_file_list(tmp_path: Path) -> None:
    _write_parquet(tmp_path / "lake" / "part-000.parquet", _rows(0, 100))
    store, first = _ingest(tmp_path, {"source": "parquet:lake", **PARQUET})
    assert len(first.y) == 100 and first.feature_names == NAMES
    np.testing.assert_array_equal(first.X, WINE.data[:100].astype(np.float32))
    assert [first.labels[k] for k in first.y] == [r["cultivar"] for r in _rows(0, 100)]
    assert first.lineage["origin"]["files"] == ["part-000.parquet"]
    store.close()
    _write_parquet(tmp_path / "lake" / "part-001.parquet", _rows(100, 178))
    store, second = _ingest(tmp_path, {"source": "parquet:lake", **PARQUET})
    assert second.lineage["parent"] == first.id and len(second.y) == 178
    assert second.lineage["origin"]["files"] == ["part-001.parquet"]
    assert second.lineage["origin"]["rows_new"] == 78
    np.testing.assert_array_equal(second.X, WINE.data.astype(np.float32))
    store.close()
    assert files_containing(tmp_path / "work", b"buyer7@example.com") == []
    # A file that changed after it was read is refused; the chain stays where it was.
    _write_parquet(tmp_path / "lake" / "part-000.parquet", _rows(0, 10))
    with pytest.raises(InvalidInputError, match=r"part-000.parquet changed"):
        _ingest(tmp_path, {"source": "parquet:lake", **PARQUET})


def test_parquet_reads_only_the_needed_columns(tmp_path: Path) -> None:
    _write_parquet(tmp_path / "one.parquet", _rows(0, 50))
    # `notes` is free text: read, it would fail the numeric check; not needed, it is not read.
    store, snap = _ingest(tmp_path, {"source": "parquet:one.parquet", **PARQUET})
    assert "notes" not in snap.feature_names
    store.close()
    with pytest.raises(InvalidInputError, match=r"column 'notes', row 1: expected a number"):
        _ingest(tmp_path / "all", {"source": f"parquet:{tmp_path / 'one.parquet'}",
                                   "label": "cultivar", "pii": ["email"]})


def test_parquet_that_is_not_parquet_is_one_line(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "lake").mkdir()
    (tmp_path / "lake" / "bad.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    pipeline = write_pipeline(tmp_path, {"source": "parquet:lake", **PARQUET})
    rc = trainer_main(["ingest", str(pipeline), "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert rc == 1 and err.strip().splitlines()[-1].startswith("error: data source parquet:")
    assert "bad.parquet is not a readable Parquet file" in err and "Traceback" not in err


class _Api:
    """A JSON API on 127.0.0.1: rows pages by `next` link or `page` number, behind a token."""

    def __init__(self, rows: list[dict[str, Any]], page_size: int = 40) -> None:
        self.rows, self.page_size = rows, page_size
        self.token = "tok-1234-secret"
        self.requests: list[str] = []
        self.override: dict[str, tuple[int, bytes]] = {}
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                api.requests.append(self.path)
                status, body = api.answer(self.path, self.headers.get("Authorization"))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path: str, auth: str | None) -> tuple[int, bytes]:
        parts = urlsplit(path)
        if parts.path in self.override:
            return self.override[parts.path]
        if auth != f"Bearer {self.token}":
            return 401, b'{"error": "unauthorized"}'
        q = parse_qs(parts.query)
        rows = self.rows
        if "since" in q:
            rows = [r for r in rows if r["id"] > int(q["since"][0])]
        if parts.path == "/by-page":
            page = int(q.get("page", ["1"])[0])
            chunk = rows[(page - 1) * self.page_size: page * self.page_size]
            return 200, json.dumps({"results": chunk}).encode()
        offset = int(q.get("offset", ["0"])[0])
        chunk = rows[offset: offset + self.page_size]
        more = offset + self.page_size < len(rows)
        doc = {"data": {"items": chunk},
               "links": {"next": f"/items?offset={offset + self.page_size}" if more else None}}
        return 200, json.dumps(doc).encode()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api() -> Iterator[_Api]:
    server = _Api(_rows(0, 130))
    yield server
    server.close()


HTTP = {"label": "cultivar", "pii": ["email"], "features": NAMES,
        "headers": {"Authorization": "env:EF_API_AUTH"}}


def test_http_pages_by_next_link_and_rerun_by_watermark(
        api: _Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EF_API_AUTH", f"Bearer {api.token}")
    data = {"source": f"{api.url}/items", "records": "data.items", "next": "links.next",
            "watermark": "id", "watermark_param": "since", **HTTP}
    store, first = _ingest(tmp_path, data)
    assert len(first.y) == 130 and first.lineage["origin"]["pages"] == 4
    np.testing.assert_array_equal(first.X, WINE.data[:130].astype(np.float32))
    store.close()
    api.rows = _rows(0, 150)
    api.requests.clear()
    store, second = _ingest(tmp_path, data)
    assert api.requests == ["/items?since=129"]  # only what is new was asked for
    assert second.lineage["parent"] == first.id and len(second.y) == 150
    assert second.lineage["origin"]["rows_new"] == 20
    store.close()
    assert files_containing(tmp_path, api.token.encode()) == []
    assert files_containing(tmp_path / "work", b"buyer3@example.com") == []


def test_http_pages_by_page_number(api: _Api, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EF_API_AUTH", f"Bearer {api.token}")
    store, snap = _ingest(tmp_path, {"source": f"{api.url}/by-page", "records": "results",
                                     "page_param": "page", **HTTP})
    assert len(snap.y) == 130 and snap.lineage["origin"]["pages"] == 5  # the last is empty
    store.close()


@pytest.mark.parametrize("case", ["not-json", "unauthorized", "other-origin", "pages", "shape"])
def test_http_hostile_answers_are_one_line_and_change_nothing(
        case: str, api: _Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("EF_API_AUTH", f"Bearer {api.token}")
    data: dict[str, Any] = {"source": f"{api.url}/items", "records": "data.items",
                            "next": "links.next", **HTTP}
    expect = {"not-json": "not valid JSON", "unauthorized": "HTTP 401",
              "other-origin": "another origin", "pages": "max_pages",
              "shape": "no list of rows"}[case]
    if case == "not-json":
        api.override["/items"] = (200, b"<html>maintenance</html>")
    elif case == "unauthorized":
        monkeypatch.setenv("EF_API_AUTH", "Bearer wrong")
    elif case == "other-origin":
        api.override["/items"] = (200, json.dumps({"data": {"items": _rows(0, 2)}, "links": {
            "next": "http://127.0.0.2:9/steal"}}).encode())
    elif case == "pages":
        data["max_pages"] = 2
    else:
        api.override["/items"] = (200, b'{"data": {"items": {"not": "a list"}}}')
    pipeline = write_pipeline(tmp_path, data)
    rc = trainer_main(["ingest", str(pipeline), "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert rc == 1 and last.startswith(f"error: data source {api.url}/items") and expect in last
    assert "Traceback" not in err and api.token not in err
    with FeatureStore(tmp_path / "w" / "store") as store:
        assert store.list() == []
