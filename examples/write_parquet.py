"""Write the wine data as a folder of Parquet files, as a data lake would hold it: one file per
batch, each row with a customer's e-mail (PII), a shop (a category), a time and a free-text
note that the pipeline does not read.

    python examples/write_parquet.py examples/data/wine-lake            # part-000 .. part-002
    python examples/write_parquet.py examples/data/wine-lake --start 3  # one more file later
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.datasets import load_wine

SHOPS = ["harbour", "market-square", "old-town", "station"]


def write(folder: Path, *, files: int = 3, start: int = 0, rows_per_file: int = 50) -> list[Path]:
    wine = load_wine()
    names = [n.replace("/", "_") for n in wine.feature_names]
    folder.mkdir(parents=True, exist_ok=True)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    out = []
    for k in range(start, start + files):
        rows = []
        for r in range(rows_per_file):
            i = (k * rows_per_file + r) % len(wine.target)
            rows.append({**{n: float(wine.data[i, j]) for j, n in enumerate(names)},
                         "sold_at": t0 + timedelta(hours=k * rows_per_file + r),
                         "customer_email": f"customer{k * rows_per_file + r}@example.com",
                         "shop": SHOPS[i % len(SHOPS)], "note": f"batch {k}",
                         "cultivar": str(wine.target_names[wine.target[i]])})
        path = folder / f"part-{k:03d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        out.append(path)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--files", type=int, default=3)
    p.add_argument("--start", type=int, default=0)
    a = p.parse_args()
    for path in write(a.folder, files=a.files, start=a.start):
        print(path)


if __name__ == "__main__":
    main()
