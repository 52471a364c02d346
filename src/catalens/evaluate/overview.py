"""What the evaluated data looks like: class sizes per split, a few photos per class, and how
the labels of different tasks go together (``catalens evaluate`` puts all three in the report).

- :func:`class_sizes`: per class task, the number of labelled rows of each class in each split
  (``metrics.json`` → ``class_sizes``);
- :func:`task_correlation`: for each pair of tasks, computed on the labels (not the predictions):
  class × class: the contingency table and Cramér's V; class × tags: per tag, the share of rows of
  each class that carry it, and Cramér's V of class against tag (``metrics.json`` →
  ``task_correlation``);
- :func:`sample_thumbnails`: a few photos per class of the evaluated rows, as small RGB images.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd

from catalens.ingest.catalogue import SPLITS, Catalogue
from catalens.tasks import TaskInfo

logger = logging.getLogger(__name__)

NO_SPLIT = "unsplit"  # rows without a split
SAMPLES_PER_CLASS = 4
MAX_SAMPLE_CLASSES = 40
THUMB = 96


def _splits(cat: Catalogue) -> pd.Series:
    """The split of every row (``unsplit`` where the data has none)."""
    return cat.frame["split"].astype(object).where(cat.frame["split"].notna(), NO_SPLIT)


def _split_order(present) -> list[str]:
    return [s for s in (*SPLITS, NO_SPLIT) if s in set(present)]


def _class_order(task: TaskInfo, labels: pd.Series) -> list[str]:
    """The model's classes, then labels of the data the model does not know (sorted)."""
    seen = {str(v) for v in labels.dropna()}
    return list(task.classes) + sorted(seen - set(task.classes))


def class_tasks(cat: Catalogue, tasks: list[TaskInfo]) -> list[TaskInfo]:
    """The model's class tasks the data has a column for."""
    return [t for t in tasks if t.kind == "class" and t.name in cat.frame]


def class_sizes(cat: Catalogue, tasks: list[TaskInfo]) -> dict:
    """Per class task: ``{"counts": {split: {class: rows}}, "unlabelled": {split: rows}}``.

    Every class of the model appears in every split (0 when absent); labels the model does not
    know are counted after them, under their own name, so no row is left out."""
    split = _splits(cat)
    order = _split_order(split)
    out = {}
    for t in class_tasks(cat, tasks):
        col = cat.frame[t.name].where(cat.frame[t.name].map(lambda v: isinstance(v, str)))
        classes = _class_order(t, col)
        counts, unlabelled = {}, {}
        for s in order:
            in_split = col[split == s]
            vc = in_split.dropna().value_counts()
            counts[s] = {c: int(vc.get(c, 0)) for c in classes}
            unlabelled[s] = int(in_split.isna().sum())
        out[t.name] = {"counts": counts, "unlabelled": unlabelled}
    return out


def cramers_v(table) -> float | None:
    """Cramér's V of a contingency table: ``sqrt(chi2 / (n * (min(rows, cols) - 1)))``, chi2 without
    continuity correction, over the rows and columns that have counts; None with fewer than two of either."""
    t = np.asarray(table, dtype=np.float64)
    t = t[t.sum(axis=1) > 0][:, t.sum(axis=0) > 0] if t.size else t
    if t.ndim != 2 or min(t.shape) < 2:
        return None
    n = t.sum()
    expected = np.outer(t.sum(axis=1), t.sum(axis=0)) / n
    chi2 = float(((t - expected) ** 2 / expected).sum())
    return math.sqrt(chi2 / (n * (min(t.shape) - 1)))


def _class_pair(cat: Catalogue, a: TaskInfo, b: TaskInfo) -> dict:
    fa, fb = cat.frame[a.name], cat.frame[b.name]
    both = fa.map(lambda v: isinstance(v, str)) & fb.map(lambda v: isinstance(v, str))
    rows, cols = _class_order(a, fa[both]), _class_order(b, fb[both])
    table = pd.crosstab(fa[both], fb[both]).reindex(index=rows, columns=cols, fill_value=0)
    return {"kind": "class x class", "tasks": [a.name, b.name], "n": int(both.sum()),
            "cramers_v": cramers_v(table.to_numpy()), "rows": rows, "columns": cols,
            "contingency": table.to_numpy(dtype=np.int64).tolist()}


def _class_tags(cat: Catalogue, a: TaskInfo, b: TaskInfo) -> dict:
    fa = cat.frame[a.name]
    labelled = fa.map(lambda v: isinstance(v, str))
    classes = _class_order(a, fa[labelled])
    rate, support, strength = [], [], {}
    for tag in b.classes:
        col = f"{b.name}/{tag}"
        y = cat.frame[col].to_numpy(dtype=np.float64, na_value=np.nan) if col in cat.frame else \
            np.full(len(cat), np.nan)
        keep = labelled.to_numpy() & ~np.isnan(y)
        frame = pd.DataFrame({"c": fa[keep].to_numpy(), "y": y[keep] > 0.5})
        by = frame.groupby("c")["y"].agg(["mean", "size"]).reindex(classes)
        rate.append([None if pd.isna(v) else float(v) for v in by["mean"]])
        support.append([0 if pd.isna(v) else int(v) for v in by["size"]])
        table = pd.crosstab(frame["c"], frame["y"]).to_numpy() if len(frame) else np.zeros((0, 0))
        strength[tag] = cramers_v(table)
    return {"kind": "class x tags", "tasks": [a.name, b.name], "n": int(labelled.sum()),
            "classes": classes, "tags": list(b.classes),
            "rate": [list(r) for r in zip(*rate)] if rate else [],      # [class][tag]
            "support": [list(r) for r in zip(*support)] if support else [],
            "cramers_v": strength}


def task_correlation(cat: Catalogue, tasks: list[TaskInfo]) -> dict:
    """How the labels of each pair of tasks go together, on every labelled row of ``cat``.

    ``{"splits": [...], "rows": n, "pairs": {"a x b": {...}}}``; class × class pairs hold the
    contingency table (rows: classes of ``a``, columns: classes of ``b``) and Cramér's V; class ×
    tags pairs hold ``rate[class][tag]`` (share of the class's rows with the tag, None without
    labelled rows), ``support`` and per tag Cramér's V (= |phi| of class-vs-rest for 2 classes).
    Two tags tasks are not paired."""
    present = [t for t in tasks if (t.kind == "class" and t.name in cat.frame)
               or (t.kind == "tags" and any(f"{t.name}/{g}" in cat.frame for g in t.classes))]
    pairs = {}
    for i, a in enumerate(present):
        for b in present[i + 1:]:
            if a.kind == "class" and b.kind == "class":
                pairs[f"{a.name} x {b.name}"] = _class_pair(cat, a, b)
            elif a.kind == "class" or b.kind == "class":
                cls, tags = (a, b) if a.kind == "class" else (b, a)
                pairs[f"{cls.name} x {tags.name}"] = _class_tags(cat, cls, tags)
    return {"splits": _split_order(_splits(cat)), "rows": len(cat), "pairs": pairs}


def sample_rows(cat: Catalogue, task: TaskInfo, per_class: int = SAMPLES_PER_CLASS, seed: int = 0,
                max_classes: int = MAX_SAMPLE_CLASSES) -> dict[str, list[int]]:
    """Up to ``per_class`` random rows (seeded) of each class of ``task``, the ``max_classes``
    classes with the most rows, in the task's class order."""
    col = cat.frame[task.name]
    labels = col.where(col.map(lambda v: isinstance(v, str)))
    sizes = labels.value_counts()
    keep = set(sizes.index[:max_classes])
    rng = np.random.default_rng(seed)
    out = {}
    for c in _class_order(task, labels):
        if c not in keep:
            continue
        rows = np.flatnonzero((labels == c).to_numpy())
        out[c] = sorted(int(r) for r in rng.permutation(rows)[:per_class])
    return out


def thumbnail(data: bytes, side: int = THUMB):
    """A ``side`` x ``side`` RGB thumbnail (the photo fitted on white)."""
    from PIL import Image

    from catalens.ingest.images import decode

    im = decode(data, draft_to=side * 2).convert("RGB")
    im.thumbnail((side, side), Image.Resampling.BILINEAR)
    square = Image.new("RGB", (side, side), "white")
    square.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
    return square


def sample_thumbnails(cat: Catalogue, tasks: list[TaskInfo], per_class: int = SAMPLES_PER_CLASS,
                      seed: int = 0) -> dict[str, dict[str, list]]:
    """``{task: {class: [PIL images]}}`` for the class tasks; photos that cannot be read are skipped
    (and logged): they are already listed as problems of the evaluation."""
    out = {}
    for t in class_tasks(cat, tasks):
        grid = {}
        for c, rows in sample_rows(cat, t, per_class, seed).items():
            ims = []
            for r in rows:
                try:
                    ims.append(thumbnail(cat.read_bytes(r)))
                except Exception as e:  # noqa: BLE001 - a bad photo must not lose the report
                    logger.info(f"sample grid: row {r} ({cat.frame['path'].iat[r]}) skipped: {e}")
            grid[c] = ims
        out[t.name] = grid
    return out
