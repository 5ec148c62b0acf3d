"""HTTP JSON API sources: ``https://...`` (``http://`` for local use), read with httpx.

* ``data.records``: the dotted path to the list of row objects in each response (``""``: the
  body is the list).
* Pagination, one of: ``data.next``, the dotted path to the next page's URL in the body (a
  relative link resolves against the page; a link to another origin is refused, so that the
  request headers, which may carry a token, never go elsewhere), or ``data.page_param``, a
  page-number query parameter counted up from ``data.page_start`` until a page has no rows.
  Neither: one request.
* ``data.headers``: ``name = "value"``, or ``"env:NAME"`` to take the value from ``$NAME``
  (never written anywhere); redirects are not followed.
* Incremental: with ``data.watermark``, only rows whose watermark is past the last snapshot's
  are kept, and ``data.watermark_param`` sends that value to the API so it can filter.
* Limits: ``timeout_s`` per request, ``max_pages``, ``max_bytes`` over all pages (checked while
  the body streams in), ``max_rows``, ``max_columns``; every body goes through the project's
  strict JSON loader. A status other than 2xx, a body that is not JSON or rows that are not
  objects fail with one line naming the redacted URL.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urljoin, urlsplit

from fleetcore import strict_json
from fleetcore.errors import InvalidInputError
from trainer.ingest.base import Batch, Budget, decode_mark, digest_of, encode_mark, greater
from trainer.ingest.table import columns_from_rows
from trainer.ingest.urls import redact, scrub

__all__ = ["read_http"]


def _headers(where: str, headers: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    out: dict[str, str] = {}
    secrets: list[str] = []
    for name, value in headers.items():
        if value.startswith("env:"):
            var = value[4:]
            if var not in os.environ:
                raise InvalidInputError(f"{where}: data.headers.{name} reads ${var}, which is not "
                                        "set in this environment")
            out[name] = os.environ[var]
            secrets.append(out[name])
        else:
            out[name] = value
    return out, secrets


def _dig(doc: Any, path: str) -> Any:
    for part in path.split(".") if path else []:
        if not isinstance(doc, dict) or part not in doc:
            return None
        doc = doc[part]
    return doc


def _origin(url: str) -> tuple[str, str | None, int | None]:
    p = urlsplit(url)
    return p.scheme, p.hostname, p.port


def read_http(source: str, *, records: str | None, next_path: str | None,
              page_param: str | None, page_start: int, headers: Mapping[str, str],
              watermark: str | None, watermark_param: str | None,
              cursor: dict[str, Any] | None, max_rows: int, max_bytes: int, max_columns: int,
              timeout_s: float, max_pages: int) -> Batch:
    import httpx

    where = f"data source {redact(source)}"
    sent, secrets = _headers(where, headers)
    after = decode_mark((cursor or {}).get("watermark"))
    budget = Budget(where, max_rows=max_rows, max_bytes=max_bytes)
    rows: list[dict[str, Any]] = []
    params: dict[str, Any] = {}
    if watermark_param and after is not None:
        params[watermark_param] = str(after)
    try:
        with httpx.Client(timeout=timeout_s, follow_redirects=False, headers=sent) as client:
            pages = _pages(client, source, params, rows, records=records, next_path=next_path,
                           page_param=page_param, page_start=page_start, budget=budget,
                           max_pages=max_pages, max_bytes=max_bytes)
    except httpx.HTTPError as exc:
        text = scrub(" ".join(str(exc).split()), *secrets)[:300]
        raise InvalidInputError(f"{where}: request failed: {type(exc).__name__}: {text}"
                                ) from None
    columns = columns_from_rows(rows, where=where, max_columns=max_columns)
    mark = (cursor or {}).get("watermark")
    if watermark is not None and rows:
        if watermark not in columns:
            raise InvalidInputError(f"{where}: the watermark column {watermark!r} is not in the "
                                    "rows")
        keep = [i for i, v in enumerate(columns[watermark])
                if v is not None and (after is None or greater(v, after))]
        columns = {k: [v[i] for i in keep] for k, v in columns.items()}
        if keep:
            best = columns[watermark][0]
            for v in columns[watermark]:
                if greater(v, best):
                    best = v
            mark = encode_mark(best)
    n = len(next(iter(columns.values()))) if columns else 0
    lineage = {"kind": "http", "request_digest": digest_of(redact(source), records, next_path,
                                                           page_param, sorted(headers)),
               "pages": pages, "rows_read": len(rows), "rows_new": n}
    if watermark is not None:
        lineage["watermark"] = {"column": watermark, "after": (cursor or {}).get("watermark"),
                                "upto": mark}
    return Batch(columns=columns, rows=n, cursor={"watermark": mark} if watermark else {},
                 lineage=lineage, digest=digest_of(lineage, budget.bytes))


def _pages(client: Any, source: str, params: dict[str, Any], rows: list[Any], *,
           records: str | None, next_path: str | None, page_param: str | None,
           page_start: int, budget: Budget, max_pages: int, max_bytes: int) -> int:
    """Fetch page after page into ``rows``; returns the number of pages."""
    where = budget.where
    url = source
    pages = 0
    while True:
        if pages == max_pages:
            raise InvalidInputError(f"{where}: more than data.max_pages = {max_pages} pages")
        if page_param:
            params[page_param] = page_start + pages
        page_where = f"{where} (page {pages + 1})"
        body = _get(client, url, params, page_where, budget)
        pages += 1
        doc = strict_json.loads(body, what=page_where, max_bytes=max_bytes)
        found = _dig(doc, records or "")
        if not isinstance(found, list):
            raise InvalidInputError(f"{page_where}: no list of rows at data.records = "
                                    f"{records or ''!r}")
        budget.take(len(found), 0)
        rows.extend(found)
        if next_path:
            link = _dig(doc, next_path)
            if link in (None, ""):
                return pages
            if not isinstance(link, str):
                raise InvalidInputError(f"{page_where}: data.next = {next_path!r} is not a URL")
            nxt = urljoin(url, link)
            if _origin(nxt) != _origin(source):
                raise InvalidInputError(f"{page_where}: the next link goes to another origin "
                                        f"({redact(nxt)}); refused")
            url = nxt
            params.clear()
        elif not (page_param and found):
            return pages


def _get(client: Any, url: str, params: dict[str, Any], where: str, budget: Budget) -> bytes:
    with client.stream("GET", url, params=params or None) as response:
        if response.status_code in (401, 403):
            raise InvalidInputError(f"{where}: HTTP {response.status_code}: not authorized; "
                                    "check data.headers (e.g. Authorization = \"env:API_TOKEN\")")
        if not 200 <= response.status_code < 300:
            raise InvalidInputError(f"{where}: HTTP {response.status_code}; expected 2xx")
        chunks: list[bytes] = []
        for chunk in response.iter_bytes():
            budget.take(0, len(chunk))
            chunks.append(chunk)
        return b"".join(chunks)
