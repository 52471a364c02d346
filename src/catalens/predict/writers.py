"""Prediction files: the format follows the extension of ``--out``.

- ``.parquet`` — typed columns (lists stay lists);
- ``.csv``     — one line per photo; list columns (``TASK_top_labels``, ``TASK_tags``, ...) hold
  JSON arrays (``["Shirts", "Tshirts"]``), so a spreadsheet shows them and ``json.loads`` reads them;
- ``.jsonl``   — one JSON object per photo (JSON Lines).

Every file is written to a temporary sibling and renamed into place, so a reader never sees half
a file and an interrupted run leaves the previous file (if any) intact.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def output_format(out: str | Path) -> str:
    """``parquet`` / ``csv`` / ``jsonl`` from the file name (a clear error for anything else)."""
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"--out '{out}': unknown output format '{suffix or '(no extension)'}'; name the file "
                         f".parquet, .csv or .jsonl")
    return FORMATS[suffix]


def tmp_path(path: Path) -> Path:
    return path.with_name(path.name + f".tmp{os.getpid()}")


def _cell(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _csv_value(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (list, tuple)):
        return json.dumps([_cell(x) for x in v], ensure_ascii=False)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return str(v)


class TableWriter:
    """Streams arrow tables (one schema) into ``path`` in its format; :meth:`close` renames
    the finished file into place, :meth:`abort` removes the temporary file."""

    def __init__(self, path: str | Path, schema: pa.Schema) -> None:
        import csv

        self.path = Path(path)
        self.format = output_format(self.path)
        self.schema = schema
        self.tmp = tmp_path(self.path)
        self.rows = 0
        if self.format == "parquet":
            self._pq = pq.ParquetWriter(self.tmp, schema, compression="zstd")
        else:
            self._f = open(self.tmp, "w", newline="", encoding="utf-8")
            if self.format == "csv":
                self._csv = csv.writer(self._f)
                self._csv.writerow(schema.names)

    def write(self, table: pa.Table) -> None:
        self.rows += len(table)
        if self.format == "parquet":
            self._pq.write_table(table)
            return
        for row in table.to_pylist():
            if self.format == "csv":
                self._csv.writerow([_csv_value(row[c]) for c in self.schema.names])
            else:
                self._f.write(json.dumps({k: _json_value(v) for k, v in row.items()}, ensure_ascii=False) + "\n")

    def close(self) -> Path:
        if self.format == "parquet":
            self._pq.close()
        else:
            self._f.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            if self.format == "parquet":
                self._pq.close()
            else:
                self._f.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def _json_value(v):
    if isinstance(v, list):
        return [_cell(x) for x in v]
    return _cell(v)


def write_frame(df, path: str | Path) -> Path:
    """A DataFrame to ``path`` in its format (atomic)."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    w = TableWriter(path, table.schema)
    try:
        w.write(table)
    except BaseException:
        w.abort()
        raise
    return w.close()
