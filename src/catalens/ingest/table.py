"""Catalogue table source: a dataset file (YAML) that describes a CSV/parquet table.

Example (``../shared/data/fashion-products``)::

    table: styles.csv                # CSV or parquet, paths relative to this file
    image: images/{id}.jpg           # path template filled from the row (or a column name)
    id: id
    split: split                     # optional column: train / val / test
    text: productDisplayName         # optional product title
    tasks:
      masterCategory: {kind: class}
      subCategory:    {kind: class, parent: masterCategory}
      articleType:    {kind: class, parent: subCategory}
      pattern:        {kind: tags, table: pattern_tags.csv, key: id,
                       columns: [striped, checked, printed, solid]}
"""
from __future__ import annotations

import re
import string
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from catalens.ingest.catalogue import Catalogue, class_tasks_from_frame, normalise_split
from catalens.ingest.sources import SOURCES
from catalens.tasks import TaskInfo, hierarchy_levels


class TaskSpec(BaseModel):
    """One task of a dataset file."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["class", "tags"]
    column: str | None = None          # class: label column (default: the task name)
    parent: str | None = None          # class: the task one level up in the hierarchy
    table: str | None = None           # tags: a joined table holding 0/1 columns
    key: str | None = None             # tags: join key in that table (default: the id column)
    columns: list[str] | None = None   # tags: 0/1 columns, one per tag
    sep: str | None = None             # tags: alternatively one column of tags joined by sep
    include: list[str] | None = None   # class: train on these classes only (catalens/train/classes.py)
    exclude: list[str] | None = None   # class: never train on these (e.g. "Not sure", "Others")
    min_count: int | None = Field(None, ge=0)  # class: classes with at least this many training photos
    top_n: int | None = Field(None, ge=0)      # class: the N classes with most training photos

    @model_validator(mode="after")
    def _check(self):
        if self.kind == "class" and (self.table or self.columns or self.sep):
            raise ValueError("a class task takes 'column' and 'parent'; 'table', 'columns' and "
                             "'sep' are for tags tasks")
        if self.kind == "tags" and not self.columns and not self.sep:
            raise ValueError("a tags task needs 'columns: [tag, ...]' (0/1 columns) or "
                             "'column' + 'sep' (one column of tags joined by sep)")
        if self.kind == "tags" and any(v is not None for v in (self.include, self.exclude, self.min_count,
                                                                self.top_n)):
            raise ValueError("include, exclude, min_count and top_n select classes of class tasks only")
        if self.kind == "tags" and self.parent:
            raise ValueError("'parent' applies to class tasks only")
        return self


class DatasetSpec(BaseModel):
    """A dataset file; unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")
    table: str
    image: str
    id: str
    product: str | None = None     # column grouping several photos of one product
    split: str | None = None
    text: str | None = None
    tasks: dict[str, TaskSpec] = Field(min_length=1)
    name: str | None = None


def load_spec(path: Path) -> DatasetSpec:
    """Parse and validate a dataset file, with errors that name the key and the fix."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"dataset file '{path}' is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"dataset file '{path}' must be a mapping with keys table, image, id, tasks")
    try:
        return DatasetSpec.model_validate(raw)
    except ValidationError as e:
        lines = [f"  {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        raise ValueError(f"dataset file '{path}' is invalid:\n" + "\n".join(lines) +
                         "\nSee README.md, section 'Data: what DATA can be', for the keys.") from None


def read_table(path: Path) -> pd.DataFrame:
    """A CSV or parquet table, with every column as read (ids kept as strings)."""
    if not path.exists():
        raise FileNotFoundError(f"table '{path}' does not exist (paths are relative to the dataset file)")
    suffix = path.suffix.lower()
    if suffix not in {".parquet", ".pq", ".csv", ".tsv", ".txt"}:
        raise ValueError(f"table '{path}' has suffix '{path.suffix}'; expected .csv, .tsv or .parquet")
    try:
        if suffix in {".parquet", ".pq"}:
            return pd.read_parquet(path)
        # utf-8-sig: a byte-order mark (Excel's CSV export) must not become part of the first column name;
        # index_col=False + the warning as an error: rows longer than the header are refused, never
        # silently shifted onto an index column
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False,
                               na_values=[""], on_bad_lines="error", encoding="utf-8-sig", index_col=False)
    except pd.errors.ParserWarning:
        raise ValueError(f"table '{path}' has rows with more fields than its header line; name every column "
                         f"in the header, and quote fields holding the separator") from None
    except UnicodeDecodeError:
        raise ValueError(f"table '{path}' is not UTF-8 text ({_first_bad_utf8(path)}); re-save it as UTF-8 "
                         f"(e.g. 'CSV UTF-8' in a spreadsheet)") from None
    except pd.errors.EmptyDataError:
        raise ValueError(f"table '{path}' is empty: expected a header line and one row per image") from None
    except (pd.errors.ParserError, ValueError, OSError) as e:  # bad CSV rows, a corrupt parquet file
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"table '{path}' cannot be read: {first}; fix the file (a CSV field holding the "
                         f"separator must be quoted)") from None


def _first_bad_utf8(path: Path) -> str:
    """Where the first byte that is not UTF-8 sits, as 'line L: byte b'\\xNN''."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        return f"line {line}: byte {raw[e.start:e.start + 1]!r}"
    return "an undecodable byte"


def _image_paths(df: pd.DataFrame, template: str, root: Path) -> list[str]:
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    if not fields:  # a column name holding the path
        if template not in df:
            raise ValueError(f"image: '{template}' is neither a column of the table nor a template "
                             f"like 'images/{{id}}.jpg'; columns are {list(df.columns)}")
        values = df[template].astype(str).tolist()
    else:
        missing = [f for f in fields if f not in df]
        if missing:
            raise ValueError(f"image template '{template}' names column(s) {missing} that the table "
                             f"lacks; columns are {list(df.columns)}")
        values = [template.format(**{f: r[f] for f in fields}) for r in df[fields].to_dict("records")]
    return [v if re.match(r"^[a-z]+://", v) or Path(v).is_absolute() else str(root / v) for v in values]


#: spellings accepted in a 0/1 tag column (case-insensitive); an empty cell means unknown
TAG_TRUE = frozenset({"1", "1.0", "true", "yes"})
TAG_FALSE = frozenset({"0", "0.0", "false", "no"})


def _tag_value(cell) -> float | None:
    """One tag cell as 1.0 / 0.0 / NaN (empty), or None when it is none of the accepted spellings."""
    if cell is None or (isinstance(cell, float) and np.isnan(cell)) or cell is pd.NA:
        return np.nan
    if isinstance(cell, (bool, np.bool_)):
        return float(cell)
    if isinstance(cell, (int, float, np.integer, np.floating)):
        return float(cell) if cell in (0, 1) else None
    text = str(cell).strip().lower()
    if not text:
        return np.nan
    return 1.0 if text in TAG_TRUE else 0.0 if text in TAG_FALSE else None


def _tag_values(cells: pd.DataFrame, name: str, where) -> pd.DataFrame:
    """Tag cells → float 0/1/NaN; the first other value raises naming ``where(row)``, the tag and the fix."""
    out = {}
    for tag in cells.columns:
        col = cells[tag].tolist()
        values = [_tag_value(v) for v in col]
        for r, v in enumerate(values):
            if v is None:
                raise ValueError(f"task '{name}': tag '{tag}' {where(r)} holds {col[r]!r}; expected 0 or 1 "
                                 f"(also accepted: true/false, yes/no); leave the cell empty when unknown")
        out[tag] = np.asarray(values, dtype=float)
    return pd.DataFrame(out, index=cells.index)


def _tag_columns(name: str, spec: TaskSpec, df: pd.DataFrame, id_col: str, root: Path,
                 table_name: str = "the table") -> tuple[pd.DataFrame, list[str]]:
    """0/1/NaN columns ``name/tag`` aligned with ``df`` rows."""
    def main_row(r: int) -> str:
        return f"of id '{df[id_col].iat[r]}' ('{table_name}' row {r + 2})"

    if spec.columns and spec.table:
        tt = read_table(root / spec.table)
        key = spec.key or id_col
        for c in [key] + spec.columns:
            if c not in tt:
                raise ValueError(f"task '{name}': table '{spec.table}' has no column '{c}'; "
                                 f"columns are {list(tt.columns)}")
        dup = tt[key].astype(str).duplicated()
        if dup.any():
            raise ValueError(f"task '{name}': table '{spec.table}' repeats key "
                             f"'{tt[key].astype(str)[dup].iloc[0]}' in column '{key}' "
                             f"({int(dup.sum())} repeats); keys must be unique")
        keys = tt[key].astype(str)
        values = _tag_values(tt[spec.columns], name,
                             lambda r: f"of id '{keys.iat[r]}' ('{spec.table}' row {r + 2})")
        values = values.set_index(keys).reindex(df[id_col].astype(str))
        tags = list(spec.columns)
    elif spec.columns:
        missing = [c for c in spec.columns if c not in df]
        if missing:
            raise ValueError(f"task '{name}': columns {missing} are not in '{table_name}'; "
                             f"columns are {list(df.columns)}")
        values = _tag_values(df[spec.columns], name, main_row)
        tags = list(spec.columns)
    else:
        col = spec.column or name
        if col not in df:
            raise ValueError(f"task '{name}': column '{col}' is not in '{table_name}'; "
                             f"columns are {list(df.columns)}")
        cells = df[col]
        tags = sorted({t.strip() for v in cells.dropna() for t in str(v).split(spec.sep) if t.strip()})
        values = pd.DataFrame({t: [np.nan if not isinstance(v, str) else float(t in {s.strip() for s in v.split(spec.sep)})
                                   for v in cells] for t in tags})
    out = pd.DataFrame({f"{name}/{t}": values[t].to_numpy(dtype=float) for t in tags}, index=df.index)
    return out, tags


@SOURCES.register("table")
class TableSource:
    """A CSV/parquet table described by a dataset YAML file."""

    name = "table"

    def detect(self, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() in {".yaml", ".yml"}

    def load(self, path: Path) -> Catalogue:
        spec = load_spec(path)
        root = path.parent
        df = read_table(root / spec.table)
        if spec.id not in df:
            raise ValueError(f"id column '{spec.id}' is not in '{spec.table}'; columns are {list(df.columns)}")
        for key in ("product", "split", "text"):
            _require_column(df, getattr(spec, key), key, path, spec.table)
        ids = df[spec.id].astype(str)
        if ids.duplicated().any() and not spec.product:
            first = ids[ids.duplicated()].iloc[0]
            raise ValueError(f"id '{first}' appears more than once in column '{spec.id}'; ids must be unique "
                             f"per image (name a 'product' column to group several photos of one product)")
        frame = pd.DataFrame({
            "id": ids if not ids.duplicated().any() else ids + "#" + df.groupby(ids).cumcount().astype(str),
            "product_id": df[spec.product].astype(str) if spec.product else ids,
            "path": _image_paths(df, spec.image, root),
            "split": [normalise_split(v, i + 2, spec.split) for i, v in enumerate(df[spec.split])]
            if spec.split else None,
            "text": [v if isinstance(v, str) and v.strip() else None for v in df[spec.text]] if spec.text else None,
            "row": np.arange(len(df)) + 2,  # 1-based line number in the CSV, header is line 1
        })
        class_specs, tag_tasks = [], []
        for name, t in spec.tasks.items():
            if t.kind == "class":
                col = t.column or name
                if col not in df:
                    raise ValueError(f"task '{name}': column '{col}' is not in '{spec.table}'; "
                                     f"columns are {list(df.columns)}")
                frame[name] = df[col].where(df[col].notna() & (df[col].astype(str).str.strip() != ""), None)
                class_specs.append((name, t.parent))
            else:
                cols, tags = _tag_columns(name, t, df, spec.id, root, spec.table)
                frame = pd.concat([frame, cols], axis=1)
                tag_tasks.append(TaskInfo(name=name, kind="tags", classes=tags))
        tasks = class_tasks_from_frame(frame, class_specs) + tag_tasks
        tasks = [tasks_by for tasks_by in _ordered(tasks, list(spec.tasks))]
        hierarchy_levels(tasks)  # validates parents now, naming the bad one
        selection = {name: {k: v for k, v in t.model_dump().items()
                            if k in ("include", "exclude", "min_count", "top_n") and v is not None}
                     for name, t in spec.tasks.items() if t.kind == "class"}
        return Catalogue(frame=frame, tasks=tasks, root=root, source=self.name,
                         meta={"dataset_file": str(path), "name": spec.name or path.stem,
                               "class_selection": {k: v for k, v in selection.items() if v}})


def _require_column(df: pd.DataFrame, column: str | None, key: str, spec_path: Path, table: str) -> None:
    """Raise naming the dataset-file key, the table and its columns when ``column`` is absent."""
    if column is not None and column not in df:
        raise ValueError(f"dataset file '{spec_path}': {key}: column '{column}' is not in '{table}'; "
                         f"columns are {list(df.columns)} (fix the name, or remove the '{key}' key)")


def _ordered(tasks: list[TaskInfo], order: list[str]) -> list[TaskInfo]:
    by = {t.name: t for t in tasks}
    return [by[n] for n in order]
