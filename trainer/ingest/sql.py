"""SQL sources through SQLAlchemy Core: ``postgresql://USER@HOST:PORT/DB``,
``mysql://USER@HOST:PORT/DB`` (MariaDB too), or any SQLAlchemy URL whose driver is installed.

* The password comes from the environment variable ``data.password_env`` names; a URL with a
  password is refused before this module runs (trainer.ingest.urls).
* ``data.query`` (one SELECT) or ``data.table`` is read in a **read-only** transaction where
  the database supports it (PostgreSQL, MySQL/MariaDB), rows streamed in partitions under the
  row, byte, column and time limits of ``[data]``.
* ``data.watermark`` names an ever-growing column (an id, an ``updated_at``): the query is
  wrapped as ``SELECT * FROM (query) WHERE watermark > :last ORDER BY watermark``, so a rerun
  reads only rows newer than the last snapshot's. Rows that arrive later with a watermark at
  or below one already read are not seen: use a column the database assigns on insert.
* Every failure (connection, authentication, query) is one ``InvalidInputError`` naming the
  source without its credentials.
"""

from __future__ import annotations

import os
import time
from typing import Any

from fleetcore.errors import InvalidInputError
from trainer.ingest.base import Batch, Budget, decode_mark, digest_of, encode_mark
from trainer.ingest.urls import redact, scrub

__all__ = ["read_sql"]

# A URL without a driver gets the one this package installs.
_DEFAULT_DRIVERS = {"postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg",
                    "mysql": "mysql+pymysql", "mariadb": "mariadb+pymysql"}
_PARTITION = 5000


def password_from_env(where: str, password_env: str | None) -> str | None:
    if password_env is None:
        return None
    value = os.environ.get(password_env)
    if value is None:
        raise InvalidInputError(f"{where}: data.password_env names ${password_env}, which is not "
                                "set in this environment")
    return value


def _engine(source: str, password: str | None, timeout_s: float) -> Any:
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    scheme, sep, rest = source.partition("://")
    url = make_url(_DEFAULT_DRIVERS.get(scheme, scheme) + sep + rest)
    if password is not None:
        url = url.set(password=password)
    timeout = max(1, int(timeout_s))
    connect_args: dict[str, Any] = {}
    if url.get_backend_name() == "postgresql":
        connect_args = {"connect_timeout": timeout,
                        "options": f"-c statement_timeout={int(timeout_s * 1000)}"
                                   " -c default_transaction_read_only=on"}
    elif url.get_backend_name() in ("mysql", "mariadb"):
        connect_args = {"connect_timeout": timeout, "read_timeout": timeout,
                        "write_timeout": timeout}
    return create_engine(url, poolclass=NullPool, connect_args=connect_args)


def _statement(engine: Any, query: str | None, table: str | None, watermark: str | None,
               after: Any) -> tuple[Any, str, dict[str, Any]]:
    from sqlalchemy import text

    quote = engine.dialect.identifier_preparer.quote
    if table is not None:
        # The names are the dialect's quoted identifiers; the query text is the pipeline
        # author's own, run read-only.
        base = "SELECT * FROM " + ".".join(quote(part) for part in table.split("."))  # noqa: S608
    else:
        assert query is not None
        base = query.strip().rstrip(";")
    params: dict[str, Any] = {}
    sql = base
    if watermark is not None:
        col = quote(watermark)
        where = ""
        if after is not None:
            where = f" WHERE {col} > :edgefleet_after"
            params["edgefleet_after"] = after
        sql = f"SELECT * FROM ({base}) AS edgefleet_src{where} ORDER BY {col}"  # noqa: S608
    return text(sql), base, params


def _one_line(exc: BaseException, password: str | None) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = " ".join(str(orig).split())
    return scrub(text, password)[:500]


def _fetch(engine: Any, statement: Any, params: dict[str, Any], where: str, budget: Budget,
           max_columns: int, timeout_s: float) -> dict[str, list[Any]]:
    deadline = time.monotonic() + timeout_s
    with engine.connect() as conn:
        if engine.dialect.name in ("mysql", "mariadb"):
            conn.exec_driver_sql("SET SESSION TRANSACTION READ ONLY")
        result = conn.execution_options(stream_results=True).execute(statement, params)
        names = list(result.keys())
        if len(names) > max_columns:
            raise InvalidInputError(f"{where}: the query returns {len(names)} columns; the "
                                    f"limit is data.max_columns = {max_columns}")
        if len(set(names)) != len(names):
            raise InvalidInputError(f"{where}: the query returns a column name twice: "
                                    f"{names}; give each column its own name (AS ...)")
        columns: dict[str, list[Any]] = {name: [] for name in names}
        lists = [columns[name] for name in names]
        for part in result.partitions(_PARTITION):
            size = 0
            for row in part:
                for target, value in zip(lists, row, strict=True):
                    target.append(value)
                    size += len(value) if isinstance(value, str | bytes) else 8
            budget.take(len(part), size)
            if time.monotonic() > deadline:
                raise InvalidInputError(f"{where}: reading took more than data.timeout_s = "
                                        f"{timeout_s:g} s")
    return columns


def read_sql(source: str, *, query: str | None, table: str | None, watermark: str | None,
             password_env: str | None, cursor: dict[str, Any] | None, max_rows: int,
             max_bytes: int, max_columns: int, timeout_s: float) -> Batch:
    """Rows of the query (those past the cursor's watermark); see the module docstring."""
    import sqlalchemy.exc

    where = f"data source {redact(source)}"
    password = password_from_env(where, password_env)
    after = decode_mark((cursor or {}).get("watermark"))
    engine = _engine(source, password, timeout_s)
    statement, base, params = _statement(engine, query, table, watermark, after)
    budget = Budget(where, max_rows=max_rows, max_bytes=max_bytes)
    try:
        columns = _fetch(engine, statement, params, where, budget, max_columns, timeout_s)
    except InvalidInputError:
        raise
    except sqlalchemy.exc.OperationalError as exc:
        raise InvalidInputError(f"{where}: cannot connect or the query failed: "
                                f"{_one_line(exc, password)}") from None
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise InvalidInputError(f"{where}: the query failed: {_one_line(exc, password)}") from None
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{where}: {_one_line(exc, password)}") from None
    finally:
        engine.dispose()
    n = budget.rows
    mark = (cursor or {}).get("watermark")
    if watermark is not None and n:
        if watermark not in columns:
            raise InvalidInputError(f"{where}: the watermark column {watermark!r} is not in the "
                                    "query's result")
        values = [v for v in columns[watermark] if v is not None]
        if len(values) != n:
            raise InvalidInputError(f"{where}: the watermark column {watermark!r} has NULLs")
        mark = encode_mark(max(values))
    lineage = {"kind": "sql", "query_digest": digest_of(base), "rows_read": n}
    if watermark is not None:
        lineage["watermark"] = {"column": watermark, "after": (cursor or {}).get("watermark"),
                                "upto": mark}
    return Batch(columns=columns, rows=n, cursor={"watermark": mark} if watermark else {},
                 lineage=lineage, digest=digest_of(base, params and str(after), n, mark))
