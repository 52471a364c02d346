"""Class selection per task: ``include``, ``exclude``, ``min_count``, ``top_n`` (issue 16).

A selection is given per class task in the dataset file (``tasks: {category: {kind: class,
exclude: [Others]}}``) or in the run configuration (``data.classes: {category: {top_n: 20}}``;
a key there wins over the same key in the dataset file). Counts (``min_count``, ``top_n``) are
taken on the training split. A photo whose label is not selected loses that label (its other
tasks keep theirs); a photo left with no label at all is removed before embedding. Nothing is
dropped silently: every affected photo is listed in ``ingest/class_selection.csv`` and counted
in the ingest summary.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from catalens.ingest.catalogue import Catalogue

_logger = logging.getLogger(__name__)

KEYS = ("include", "exclude", "min_count", "top_n")


@dataclass
class SelectionReport:
    """What a class selection did: per task, the classes kept and the photos whose label went."""

    tasks: dict[str, dict] = field(default_factory=dict)
    removed_rows: int = 0          # photos left without any label: not trained on
    listing: pd.DataFrame | None = None

    def to_dict(self) -> dict:
        return {"tasks": self.tasks, "removed_rows": self.removed_rows}


def merged_selections(cat: Catalogue, configured: dict) -> dict[str, dict]:
    """The dataset file's selections (``cat.meta['class_selection']``) updated key by key by the config's."""
    out = {k: dict(v) for k, v in (cat.meta.get("class_selection") or {}).items()}
    for task, sel in (configured or {}).items():
        d = sel.model_dump(exclude_unset=True) if hasattr(sel, "model_dump") else dict(sel)
        out.setdefault(task, {}).update({k: v for k, v in d.items() if k in KEYS})
    return {k: v for k, v in out.items() if any(v.get(x) not in (None, [], 0) for x in KEYS)}


def kept_classes(counts: dict[str, int], sel: dict, task: str) -> list[str]:
    """Classes of ``counts`` (training photos per class) that ``sel`` keeps, most frequent first."""
    classes = sorted(counts, key=lambda c: (-counts[c], c))
    include, exclude = sel.get("include"), sel.get("exclude") or []
    if include is not None:
        unknown = [c for c in include if c not in counts]
        if unknown:
            raise ValueError(f"class selection of task '{task}': include names {unknown}, which have no training "
                             f"photos; classes are {sorted(counts)[:30]}{' ...' if len(counts) > 30 else ''} "
                             f"(fix the spelling, or remove them from include)")
        classes = [c for c in classes if c in set(map(str, include))]
    absent = [c for c in exclude if c not in counts]
    if absent:
        _logger.warning("class selection of task '%s': exclude names %s, which have no training photos", task,
                        absent)
    classes = [c for c in classes if c not in set(map(str, exclude))]
    if sel.get("min_count"):
        classes = [c for c in classes if counts[c] >= int(sel["min_count"])]
    if sel.get("top_n"):
        classes = classes[:int(sel["top_n"])]
    if not classes:
        raise ValueError(f"class selection of task '{task}' ({_rule(sel)}) keeps no class; it has "
                         f"{len(counts)} classes, the largest with {max(counts.values(), default=0)} training photos")
    return classes


def _rule(sel: dict) -> str:
    return ", ".join(f"{k} {sel[k]}" for k in KEYS if sel.get(k) not in (None, [], 0))


def select_classes(cat: Catalogue, selections: dict[str, dict]) -> tuple[Catalogue, SelectionReport]:
    """Apply ``selections`` (task → include/exclude/min_count/top_n) to ``cat`` (train + val rows).

    Returns the catalogue without photos left unlabelled, and the report. Raises ValueError for a
    task that does not exist or is not a class task, and for an include naming unknown classes.
    """
    report = SelectionReport()
    if not selections:
        return cat, report
    frame = cat.frame.copy()
    is_train = (frame["split"] == "train").to_numpy() if "split" in frame and frame["split"].notna().any() \
        else np.ones(len(frame), bool)
    listing = []
    for task, sel in selections.items():
        if task not in cat.task_names:
            raise ValueError(f"class selection names task '{task}', which the data does not have; tasks are "
                             f"{cat.task_names}")
        if cat.task(task).kind != "class":
            raise ValueError(f"class selection applies to class tasks; '{task}' is a tags task")
        col = frame[task]
        vc = col[is_train].dropna().astype(str).value_counts()
        counts = {str(k): int(v) for k, v in vc.items()}
        keep = set(kept_classes(counts, sel, task))
        drop = col.notna() & ~col.astype(str).isin(keep)
        gone = col[drop].astype(str).value_counts()
        for i in np.where(drop.to_numpy())[0]:
            listing.append({"row": frame["row"].iat[i] if "row" in frame else i, "id": frame["id"].iat[i],
                            "path": frame["path"].iat[i], "split": frame["split"].iat[i] if "split" in frame else None,
                            "task": task, "label": str(col.iat[i])})
        frame.loc[drop, task] = None
        report.tasks[task] = {"rule": _rule(sel), "classes_before": len(counts), "classes_kept": len(keep),
                              "rows_relabelled": int(drop.sum()),
                              "excluded_classes": {str(k): int(v) for k, v in gone.items()}}
    labelled = np.zeros(len(frame), bool)
    for t in cat.tasks:
        if t.kind == "class":
            labelled |= frame[t.name].notna().to_numpy()
        else:
            cols = [f"{t.name}/{tag}" for tag in t.classes if f"{t.name}/{tag}" in frame]
            labelled |= frame[cols].notna().any(axis=1).to_numpy() if cols else False
    report.removed_rows = int((~labelled).sum())
    listing_df = pd.DataFrame(listing, columns=["row", "id", "path", "split", "task", "label"])
    ids_removed = set(frame["id"][~labelled])
    listing_df["removed"] = listing_df["id"].isin(ids_removed)
    report.listing = listing_df
    return replace(cat, frame=frame[labelled].reset_index(drop=True), meta=dict(cat.meta)), report


def write_selection(folder: Path, report: SelectionReport) -> None:
    """``folder/class_selection.csv``: every photo whose label a class selection removed."""
    if report.listing is not None and report.tasks:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "class_selection.csv.tmp"
        report.listing.to_csv(tmp, index=False)
        tmp.replace(folder / "class_selection.csv")
