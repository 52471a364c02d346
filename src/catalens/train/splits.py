"""Seeded, stratified splits made by product, so no product sits on both sides."""
from __future__ import annotations

import numpy as np
import pandas as pd

from catalens.ingest.catalogue import Catalogue


def _stratify_column(cat: Catalogue) -> str | None:
    """The deepest class task (the leaf of the hierarchy), or the first class task."""
    class_tasks = [t for t in cat.tasks if t.kind == "class"]
    if not class_tasks:
        return None
    parents = {t.parent for t in class_tasks}
    leaves = [t for t in class_tasks if t.name not in parents]
    return (leaves or class_tasks)[-1].name


def assign_splits(cat: Catalogue, fractions: dict[str, float], seed: int, among: str | None = None) -> pd.Series:
    """Split products (not images) into ``fractions`` (e.g. {"val": .15, "test": .15}; rest train).

    Stratified on the leaf class task: each class's products are shuffled with ``seed`` and
    cut by the fractions (a class with one product goes to train). Only rows whose split is
    ``among`` (``None`` = rows without a split) are re-assigned; others keep theirs.
    """
    frame = cat.frame
    split = frame["split"].copy()
    target = split.isna() if among is None else split == among
    sub = frame[target]
    col = _stratify_column(cat)
    labels = sub.groupby("product_id")[col].first() if col else pd.Series("all", index=sub["product_id"].unique())
    labels = labels.fillna("<missing>").astype(str)
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for _, products in sorted(labels.groupby(labels).groups.items(), key=lambda kv: kv[0]):
        prods = np.array(sorted(products))
        rng.shuffle(prods)
        n, start = len(prods), 0
        for name, frac in fractions.items():
            k = int(round(frac * n)) if n >= 3 else 0
            for p in prods[start:start + k]:
                assignment[p] = name
            start += k
        for p in prods[start:]:
            assignment[p] = "train"
    split[target] = sub["product_id"].map(assignment).to_numpy()
    return split


def ensure_splits(cat: Catalogue, val_fraction: float, test_fraction: float, seed: int) -> tuple[Catalogue, str | None]:
    """Give ``cat`` train/val(/test) splits when it lacks them; returns (catalogue, what was done)."""
    frame = cat.frame.copy()
    done = None
    if frame["split"].isna().all():
        frame["split"] = assign_splits(cat, {"val": val_fraction, "test": test_fraction}, seed)
        done = f"no split given: made a stratified split by product, seed {seed} (train/val/test)"
    elif not (frame["split"] == "val").any():
        cat2 = type(cat)(**{**cat.__dict__, "frame": frame})
        frame["split"] = assign_splits(cat2, {"val": val_fraction}, seed, among="train")
        done = f"no val split: carved {val_fraction:.0%} of train by product, seed {seed}"
    elif frame["split"].isna().any():
        frame.loc[frame["split"].isna(), "split"] = "train"
        done = "rows without a split were put in train"
    leak = products_across_splits(frame)
    if leak:
        done = f"{done}; {leak}" if done else leak
    out = type(cat)(**{**cat.__dict__, "frame": frame})
    return out, done


def products_across_splits(frame: pd.DataFrame, show: int = 3) -> str | None:
    """A warning naming products whose photos sit in more than one split (given splits only
    can do that: catalens' own splits are by product); ``None`` when there are none."""
    spans = frame.dropna(subset=["split"]).groupby("product_id")["split"].agg(lambda s: sorted(set(s)))
    spans = spans[spans.map(len) > 1]
    if spans.empty:
        return None
    examples = ", ".join(f"{p} ({'+'.join(v)})" for p, v in spans.head(show).items())
    return (f"warning: {len(spans)} product(s) have photos in more than one split, e.g. {examples}: "
            f"their evaluation photos leak into training. Fix the split column so every photo of a product "
            f"shares one split, or drop the split column to let catalens split by product")
