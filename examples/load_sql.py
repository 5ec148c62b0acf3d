"""Load a scikit-learn data set into a SQL table, as a business's database would hold it: an
``id`` the database assigns (the pipeline's watermark), a ``created_at`` time, a customer's
e-mail address (PII), a ``shop`` category, the features and the label.

    python examples/load_sql.py postgresql://root@127.0.0.1:5432/test --table wine_sales
    python examples/load_sql.py postgresql://root@127.0.0.1:5432/test --table wine_sales \\
        --rows 20 --offset 150          # more rows later: the next ingest reads only these

``--dataset`` is wine (classification, the default) or diabetes (regression). The table is
created when missing. The password, if any, comes from ``$DB_PASSWORD``.
"""

from __future__ import annotations

import argparse
import os
from datetime import UTC, datetime, timedelta
from typing import Any

from sklearn import datasets
from sqlalchemy import (
    Column,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    insert,
)
from sqlalchemy.engine import make_url

SHOPS = ["harbour", "market-square", "old-town", "station"]


def load(url: str, table: str, *, dataset: str = "wine", rows: int | None = None,
         offset: int = 0) -> int:
    """Insert rows ``offset .. offset+rows`` of the data set; returns how many."""
    bunch = {"wine": datasets.load_wine, "diabetes": datasets.load_diabetes}[dataset]()
    names = [n.replace("/", "_").replace(" ", "_") for n in bunch.feature_names]
    scheme, sep, rest = url.partition("://")
    drivers = {"postgresql": "postgresql+psycopg", "mysql": "mysql+pymysql",
               "mariadb": "mariadb+pymysql"}
    db_url = make_url(drivers.get(scheme, scheme) + sep + rest)
    if os.environ.get("DB_PASSWORD"):
        db_url = db_url.set(password=os.environ["DB_PASSWORD"])
    engine = create_engine(db_url)
    meta = MetaData()
    label = Column("label", Float) if dataset == "diabetes" else Column("cultivar", String(32))
    t = Table(table, meta, Column("id", Integer, primary_key=True, autoincrement=True),
              Column("created_at", DateTime), Column("customer_email", String(128)),
              Column("shop", String(32)), *[Column(n, Float) for n in names], label)
    meta.create_all(engine)
    end = len(bunch.target) if rows is None else min(len(bunch.target), offset + rows)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    values = []
    for i in range(offset, end):
        row: dict[str, Any] = {n: float(bunch.data[i, j]) for j, n in enumerate(names)}
        row.update(created_at=start + timedelta(hours=i), customer_email=f"customer{i}@example.com",
                   shop=SHOPS[i % len(SHOPS)])
        row[label.name] = (float(bunch.target[i]) if dataset == "diabetes"
                           else str(bunch.target_names[bunch.target[i]]))
        values.append(row)
    with engine.begin() as conn:
        if values:
            conn.execute(insert(t), values)
    engine.dispose()
    return len(values)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url", help="SQLAlchemy URL, e.g. postgresql://root@127.0.0.1:5432/test")
    p.add_argument("--table", default="wine_sales")
    p.add_argument("--dataset", choices=["wine", "diabetes"], default="wine")
    p.add_argument("--rows", type=int, help="how many rows (default: all from --offset)")
    p.add_argument("--offset", type=int, default=0)
    a = p.parse_args()
    n = load(a.url, a.table, dataset=a.dataset, rows=a.rows, offset=a.offset)
    print(f"inserted {n} rows into {a.table}")


if __name__ == "__main__":
    main()
