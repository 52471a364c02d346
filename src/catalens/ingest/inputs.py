"""What a user points ``catalens predict`` (or ``Predictor.predict``) at, as one Catalogue.

A *source* is any of:

- an image file (any suffix Pillow may read; it is validated when decoded);
- a glob (``'new/**/*.jpg'``, quoted on the command line);
- a folder, recursive, any layout. When it has the labelled layout
  (``ROOT/<class>/<image>`` or ``ROOT/<split>/<class>/<image>``, nothing else) its folder
  labels are kept, so predictions can be compared with them (``true_label``);
- a ``.txt`` file listing image paths, one per line (blank lines and ``#`` comments skipped;
  relative paths are relative to the list's folder);
- a ``.csv`` / ``.tsv`` / ``.parquet`` table with a path column (found by name: ``path``,
  ``image``, ``file``, ``filepath``, or ``path_column``) and optionally a title column
  (``title``, or ``title_column``); relative paths are relative to the table's folder;
- a dataset file (``.yaml``) or a BSON dump (``.bson``), read by their sources
  (:func:`catalens.ingest.open.open_catalogue`).

Several sources are concatenated in the order given. Every row keeps its origin (``path``)
and its position (``row``); nothing is dropped: a path that does not exist becomes a row whose
photo is reported ``missing`` when it is decoded.
"""
from __future__ import annotations

import glob as globlib
from pathlib import Path

import pandas as pd

from catalens.ingest.catalogue import SPLIT_ALIASES, Catalogue
from catalens.ingest.sources import IMAGE_SUFFIXES

TABLE_SUFFIXES = {".csv", ".tsv", ".parquet", ".pq"}
PATH_COLUMNS = ("path", "image", "file", "filepath", "image_path", "file_path")
TITLE_COLUMNS = ("title",)
GLOB_CHARS = set("*?[")


class InputError(ValueError):
    """A source that cannot be read as photos (says which and how to fix it)."""


def open_inputs(sources, path_column: str | None = None, title_column: str | None = None) -> Catalogue:
    """One catalogue of every photo the ``sources`` name (see the module docstring)."""
    sources = [sources] if isinstance(sources, (str, Path)) else list(sources)
    if not sources:
        raise InputError("no photos given: name image files, folders, globs, a .txt list, a .csv/.parquet "
                         "table, a dataset .yaml or a .bson dump")
    cats = [open_source(s, path_column, title_column) for s in sources]
    if len(cats) == 1:
        return cats[0]
    if any(c.source == "bson" for c in cats):
        raise InputError("a BSON dump is predicted on its own: give it as the only source")
    return concat(cats)


def open_source(source: str | Path, path_column: str | None = None, title_column: str | None = None) -> Catalogue:
    text = str(source)
    p = Path(text).expanduser()
    if not p.exists() and GLOB_CHARS & set(text):
        return _glob(text)
    if not p.exists() and p.suffix.lower() in IMAGE_SUFFIXES:  # kept: its row reports 'missing' when decoded
        return files_catalogue([p], p.parent, "files")
    if not p.exists():
        raise FileNotFoundError(f"'{text}' does not exist; give image files, folders, quoted globs "
                                f"('photos/*.jpg'), a .txt list of paths or a .csv/.parquet table")
    suffix = p.suffix.lower()
    if p.is_dir():
        return _folder(p)
    if suffix in {".yaml", ".yml", ".bson"}:
        from catalens.ingest.open import open_catalogue

        return open_catalogue(p)
    if suffix in TABLE_SUFFIXES:
        return _table(p, path_column, title_column)
    if suffix == ".txt":
        return _listing(p)
    return files_catalogue([p], p.parent, "files")


def files_catalogue(paths: list[Path | str], root: Path, source: str, titles=None) -> Catalogue:
    """Rows for image ``paths`` (ids are the paths as given), no labels."""
    paths = [str(x) for x in paths]
    frame = pd.DataFrame({"id": paths, "product_id": paths, "path": paths, "split": None,
                          "text": list(titles) if titles is not None else None,
                          "row": range(1, len(paths) + 1)})
    return Catalogue(frame=frame, tasks=[], root=Path(root), source=source)


def _glob(pattern: str) -> Catalogue:
    hits = sorted(h for h in globlib.glob(str(Path(pattern).expanduser()), recursive=True) if Path(h).is_file())
    if not hits:
        raise FileNotFoundError(f"the glob '{pattern}' matches no file; check the pattern (use ** for subfolders)")
    return files_catalogue(hits, Path.cwd(), "glob")


def image_files(folder: Path) -> list[Path]:
    """Image files below ``folder`` (recursive, sorted; hidden files and folders skipped)."""
    out = []
    for f in folder.rglob("*"):
        rel = f.relative_to(folder).parts
        if f.is_file() and not any(part.startswith(".") for part in rel) and f.suffix.lower() in IMAGE_SUFFIXES:
            out.append(f)
    return sorted(out)


def _is_labelled_layout(folder: Path, files: list[Path]) -> bool:
    """Every image at ``<class>/<image>`` or ``<split>/<class>/<image>`` with split names."""
    if not files:
        return False
    depths = {len(f.relative_to(folder).parts) for f in files}
    if depths == {2}:
        return True
    if depths == {3}:
        return all(f.relative_to(folder).parts[0].lower() in SPLIT_ALIASES for f in files)
    return False


def _folder(folder: Path) -> Catalogue:
    files = image_files(folder)
    if not files:
        others = sum(1 for f in folder.rglob("*") if f.is_file())
        raise InputError(f"folder '{folder}' holds no image file ({', '.join(sorted(IMAGE_SUFFIXES))})"
                         + (f"; it holds {others} other files" if others else ""))
    if _is_labelled_layout(folder, files):
        from catalens.ingest.open import open_catalogue

        cat = open_catalogue(folder, source="folder")
        if len(cat) == len(files):  # the folder source lists every file; take it when it saw the same
            return cat
    return files_catalogue(files, folder, "folder")


def _listing(path: Path) -> Catalogue:
    root = path.parent
    paths = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        q = Path(line).expanduser()
        paths.append(q if q.is_absolute() else root / q)
    if not paths:
        raise InputError(f"'{path}' lists no path (one image path per line expected)")
    return files_catalogue(paths, root, "list")


def find_column(columns, wanted: str | None, candidates: tuple[str, ...], what: str, where: Path,
                flag: str, required: bool) -> str | None:
    cols = [str(c) for c in columns]
    if wanted is not None:
        if wanted not in cols:
            raise InputError(f"'{where}' has no column '{wanted}' ({flag}); its columns are {cols}")
        return wanted
    lower = {c.lower(): c for c in cols}
    for c in candidates:
        if c in lower:
            return lower[c]
    if required:
        raise InputError(f"'{where}' has no {what} column (looked for {', '.join(candidates)}); its columns are "
                         f"{cols}: name it with {flag} COLUMN")
    return None


def table_catalogue(df: pd.DataFrame, root: Path, where: str | Path, path_column: str | None = None,
                    title_column: str | None = None, source: str = "table") -> Catalogue:
    """Rows of a table (or DataFrame) with a path column and optionally a title column."""
    pcol = find_column(df.columns, path_column, PATH_COLUMNS, "path", Path(str(where)), "--path-column", True)
    tcol = find_column(df.columns, title_column, TITLE_COLUMNS, "title", Path(str(where)), "--title-column", False)
    values = df[pcol].tolist()
    bad = [i for i, v in enumerate(values) if not isinstance(v, (str, Path)) or not str(v).strip()]
    if bad:
        raise InputError(f"'{where}' row {bad[0] + 2}: column '{pcol}' is empty ({len(bad)} rows without a path); "
                         f"fill in the image path or remove those rows")
    paths = [str(v) if Path(str(v)).expanduser().is_absolute() else str(root / str(v)) for v in values]
    titles = None
    if tcol is not None:
        titles = [v if isinstance(v, str) and v.strip() else None for v in df[tcol].tolist()]
    cat = files_catalogue(paths, root, source, titles)
    cat.frame["id"] = [str(v) for v in values]
    cat.frame["product_id"] = cat.frame["id"]
    cat.frame["row"] = range(2, len(paths) + 2) if source == "table" else range(len(paths))
    return cat


def _table(path: Path, path_column: str | None, title_column: str | None) -> Catalogue:
    from catalens.ingest.table import read_table

    return table_catalogue(read_table(path), path.parent, path, path_column, title_column)


def concat(cats: list[Catalogue]) -> Catalogue:
    """The rows of several catalogues, in order; labels of tasks they share are kept."""
    frames = [c.frame for c in cats]
    frame = pd.concat(frames, ignore_index=True, sort=False)
    shared = set.intersection(*({t.name for t in c.tasks} for c in cats))
    tasks = [t for t in cats[0].tasks if t.name in shared]
    return Catalogue(frame=frame, tasks=tasks, root=Path.cwd(), source="+".join(c.source for c in cats),
                     reader=cats[0].reader)


def labelled_frame(df: pd.DataFrame, labels, path_column: str | None = None, title_column: str | None = None,
                   split_column: str | None = None, product_column: str | None = None, tags: dict | None = None,
                   root: Path | None = None) -> Catalogue:
    """A training catalogue from a DataFrame (AutoGluon's ``fit(df)`` habit): a path column, one
    column per class task (``labels``: a name, a list of names, or ``{task: parent}`` for a
    hierarchy, root first), optionally a title, a split (train/val/test) and a product column,
    and ``tags={task: [0/1 columns]}``. Relative paths are relative to ``root`` (default: the
    working folder). Empty label cells are missing labels."""
    import numpy as np

    from catalens.ingest.catalogue import class_tasks_from_frame, normalise_split
    from catalens.tasks import TaskInfo, hierarchy_levels

    root = Path(root) if root is not None else Path.cwd()
    specs = ({labels: None} if isinstance(labels, str) else dict(labels) if isinstance(labels, dict)
             else {name: None for name in (labels or [])})
    if not specs and not tags:
        raise InputError("name the label column(s): label='category' (or a list, or {task: parent} for a "
                         f"hierarchy); the DataFrame's columns are {[str(c) for c in df.columns]}")
    df = df.reset_index(drop=True)
    cat = table_catalogue(df, root, "the DataFrame", path_column, title_column, source="dataframe")
    frame = cat.frame
    for col, flag in ((split_column, "split_column"), (product_column, "product_column")):
        if col is not None and col not in df:
            raise InputError(f"the DataFrame has no column '{col}' ({flag}); its columns are {list(df.columns)}")
    if split_column:
        frame["split"] = [normalise_split(v, i, split_column) for i, v in enumerate(df[split_column])]
    if product_column:
        frame["product_id"] = df[product_column].astype(str).to_numpy()
    for name in specs:
        if name not in df:
            raise InputError(f"label column '{name}' is not in the DataFrame; its columns are {list(df.columns)}")
        frame[name] = [str(v).strip() if isinstance(v, str) and v.strip() else
                       (str(v) if v is not None and not (isinstance(v, float) and np.isnan(v)) else None)
                       for v in df[name]]
    tasks = class_tasks_from_frame(frame, list(specs.items()))
    for name, cols in (tags or {}).items():
        missing = [c for c in cols if c not in df]
        if missing:
            raise InputError(f"tags task '{name}': columns {missing} are not in the DataFrame")
        values = df[list(cols)].apply(pd.to_numeric, errors="coerce")
        bad = ~values.isin([0, 1]) & values.notna()
        if bad.to_numpy().any():
            r, c = np.argwhere(bad.to_numpy())[0]
            raise InputError(f"tags task '{name}': row {r} column '{cols[c]}' holds {df[cols[c]].iat[r]!r}; "
                             f"expected 0 or 1 (or empty for unknown)")
        for c in cols:
            frame[f"{name}/{c}"] = values[c].to_numpy(dtype=float)
        tasks.append(TaskInfo(name=name, kind="tags", classes=list(cols)))
    hierarchy_levels(tasks)
    cat.tasks = tasks
    cat.meta["dataset_file"] = None
    return cat
