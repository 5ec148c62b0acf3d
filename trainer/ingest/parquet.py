"""Parquet sources: ``parquet:PATH``, a file or a folder of ``*.parquet`` files (pyarrow).

* Only the needed columns are read (``data.features`` when set, plus the label, PII,
  categorical, timestamp and watermark columns); without ``features``, every column is.
* A folder is read incrementally **by file list**: the cursor records each file read (name,
  size, modification time), a rerun reads only files not read before, and a file that changed
  after it was read is refused (a data lake's files are immutable; write a new file).
* Limits: the file count (``max_pages``), the rows in the files' footers (``max_rows``, checked
  before any data is read), the bytes on disk (``max_bytes``) and the columns (``max_columns``).
  A file that is not Parquet fails with one line naming it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fleetcore.errors import InvalidInputError
from trainer.ingest.base import Batch, digest_of

__all__ = ["read_parquet"]


def _files(root: Path, where: str, max_files: int) -> list[Path]:
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise InvalidInputError(f"{where}: no such file or folder")
    files = sorted(p for p in root.glob("*.parquet") if p.is_file())
    if len(files) > max_files:
        raise InvalidInputError(f"{where}: {len(files)} files; the limit is data.max_pages = "
                                f"{max_files}")
    return files


def _column(col: Any) -> list[Any] | np.ndarray:
    """An Arrow column as NumPy floats (nulls as NaN) when numeric, else Python values."""
    import pyarrow as pa

    t = col.type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        # nulls become NaN (a missing value) in the float64 copy
        return np.asarray(col.cast(pa.float64()).to_numpy(zero_copy_only=False),
                          dtype=np.float64)
    return list(col.to_pylist())


def read_parquet(path: Path, *, needed: Sequence[str] | None, cursor: dict[str, Any] | None,
                 max_rows: int, max_bytes: int, max_columns: int, max_files: int) -> Batch:
    import pyarrow as pa
    import pyarrow.parquet as pq

    where = f"data source parquet:{path}"
    seen: dict[str, Any] = dict((cursor or {}).get("files", {}))
    files = _files(path, where, max_files)
    new: list[tuple[Path, dict[str, int]]] = []
    for f in files:
        st = os.stat(f)
        ident = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if f.name in seen:
            if seen[f.name] != ident:
                raise InvalidInputError(f"{where}: {f.name} changed after it was ingested; "
                                        "Parquet sources are append-only: write new rows to a "
                                        "new file")
            continue
        new.append((f, ident))
    total_bytes = sum(ident["size"] for _, ident in new)
    if total_bytes > max_bytes:
        raise InvalidInputError(f"{where}: {total_bytes} bytes of new files; the limit is "
                                f"data.max_bytes = {max_bytes}")
    tables = []
    rows = 0
    for f, _ in new:
        try:
            meta = pq.ParquetFile(f).metadata
            if meta.num_columns > max_columns:
                raise InvalidInputError(f"{where}: {f.name} has {meta.num_columns} columns; "
                                        f"the limit is data.max_columns = {max_columns}")
            rows += meta.num_rows
            if rows > max_rows:
                raise InvalidInputError(f"{where}: more than {max_rows} rows; the limit is "
                                        "data.max_rows")
            table = pq.read_table(f, columns=list(needed) if needed else None)
        except InvalidInputError:
            raise
        except (pa.ArrowException, OSError, ValueError) as exc:
            text = " ".join(str(exc).split())[:300]
            raise InvalidInputError(f"{where}: {f.name} is not a readable Parquet file ({text})"
                                    ) from None
        tables.append(table)
    columns: dict[str, list[Any] | np.ndarray] = {}
    if tables:
        try:
            table = pa.concat_tables(tables, promote_options="default")
        except (pa.ArrowException, ValueError) as exc:
            raise InvalidInputError(f"{where}: the files' schemas do not agree ({exc})") from None
        columns = {name: _column(table.column(name)) for name in table.column_names}
    for f, ident in new:
        seen[f.name] = ident
    return Batch(columns=columns, rows=rows, cursor={"files": seen},
                 lineage={"kind": "parquet", "files": [f.name for f, _ in new],
                          "rows_read": rows},
                 digest=digest_of(sorted((f.name, ident) for f, ident in new)))
