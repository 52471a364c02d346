"""The in-memory description of a catalogue: one row per image, tasks, labels.

Every source (folder, table, BSON, ...) produces a :class:`Catalogue`. Its ``frame`` has
one row per image with the columns

- ``id``          unique image id (str)
- ``product_id``  product the image belongs to (str; equals ``id`` for one photo per product)
- ``path``        where the bytes live (a file path, or a source-specific reference)
- ``split``       ``train`` / ``val`` / ``test`` or ``None``
- ``text``        product title or ``None``
- ``row``         the row number in the user's table / listing (for error messages)
- one column per class task (str label or ``None``),
- one column ``"{task}/{tag}"`` per tag of a tags task (float 0/1, NaN = missing).

Labels are turned into arrays with :meth:`Catalogue.encode` against a class order
(the model's, at predict time), using the encoding described in :mod:`catalens.tasks`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from catalens.tasks import MISSING, TaskInfo

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "dev": "val", "test": "test", "testing": "test"}
BASE_COLUMNS = ["id", "product_id", "path", "split", "text", "row"]


def read_file_bytes(path: str) -> bytes:
    """Default byte reader: the file at ``path``."""
    with open(path, "rb") as f:
        return f.read()


@dataclass
class Catalogue:
    """Images, their labels and the tasks; produced by a source, consumed by every stage."""

    frame: pd.DataFrame
    tasks: list[TaskInfo]
    root: Path
    source: str
    reader: Callable[[str], bytes] = read_file_bytes  # picklable: module-level or instance
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> TaskInfo:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"no task '{name}'; tasks are {self.task_names}")

    def subset(self, mask_or_index) -> "Catalogue":
        """A catalogue of the selected rows (boolean mask or positional index)."""
        frame = self.frame[mask_or_index] if _is_mask(mask_or_index) else self.frame.iloc[mask_or_index]
        return replace(self, frame=frame.reset_index(drop=True))

    def split(self, name: str) -> "Catalogue":
        """The rows of split ``name`` (``train`` / ``val`` / ``test``)."""
        return self.subset(self.frame["split"] == name)

    def has_split(self, name: str) -> bool:
        return bool((self.frame["split"] == name).any())

    def read_bytes(self, i: int) -> bytes:
        return self.reader(self.frame["path"].iat[i])

    def encode(self, tasks: list[TaskInfo] | None = None) -> dict[str, np.ndarray]:
        """Labels as arrays in the class order of ``tasks`` (default: the catalogue's).

        A label the class order does not know (a class unseen in training) is encoded
        as missing and counted in ``self.meta['unknown_labels']``.
        """
        out: dict[str, np.ndarray] = {}
        unknown: dict[str, int] = {}
        for t in tasks or self.tasks:
            if t.kind == "class":
                if t.name not in self.frame:
                    out[t.name] = np.full(len(self.frame), MISSING, dtype=np.int64)
                    continue
                index = {c: i for i, c in enumerate(t.classes)}
                col = self.frame[t.name]
                codes = np.array([index.get(v, MISSING) if isinstance(v, str) else MISSING for v in col],
                                 dtype=np.int64)
                n_unknown = int(sum(isinstance(v, str) and v not in index for v in col))
                if n_unknown:
                    unknown[t.name] = n_unknown
                out[t.name] = codes
            else:
                cols = [f"{t.name}/{tag}" for tag in t.classes]
                present = [c for c in cols if c in self.frame]
                arr = np.full((len(self.frame), len(cols)), np.nan, dtype=np.float32)
                for j, c in enumerate(cols):
                    if c in present:
                        arr[:, j] = self.frame[c].to_numpy(dtype=np.float32, na_value=np.nan)
                out[t.name] = arr
        self.meta["unknown_labels"] = unknown
        return out

    def class_counts(self, split: str | None = None) -> dict[str, dict[str, int]]:
        """Per task, the number of images of each class (tags: positives per tag)."""
        frame = self.frame if split is None else self.frame[self.frame["split"] == split]
        counts: dict[str, dict[str, int]] = {}
        for t in self.tasks:
            if t.kind == "class":
                vc = frame[t.name].dropna().value_counts()
                counts[t.name] = {str(k): int(v) for k, v in vc.items()}
            else:
                counts[t.name] = {tag: int(np.nansum(frame[f"{t.name}/{tag}"].to_numpy(dtype=float)))
                                  for tag in t.classes}
        return counts


def _is_mask(x) -> bool:
    return (isinstance(x, (pd.Series, np.ndarray)) and getattr(x, "dtype", None) == bool)


def normalise_split(value, row: int, column: str) -> str | None:
    """Map a split cell to train/val/test; raise naming the row when unknown."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or value == "":
        return None
    key = str(value).strip().lower()
    if key not in SPLIT_ALIASES:
        raise ValueError(f"row {row}: split column '{column}' holds '{value}'; expected one of "
                         f"train, val (validation), test, or an empty cell")
    return SPLIT_ALIASES[key]


def class_tasks_from_frame(frame: pd.DataFrame, specs: list[tuple[str, str | None]]) -> list[TaskInfo]:
    """Class TaskInfos with the sorted set of labels seen in ``frame``."""
    tasks = []
    for name, parent in specs:
        classes = sorted({str(v) for v in frame[name].dropna()})
        tasks.append(TaskInfo(name=name, kind="class", classes=classes, parent=parent))
    return tasks
