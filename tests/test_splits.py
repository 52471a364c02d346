"""Splits by product: catalens' own splits never cut a product; given splits that do are reported."""
from pathlib import Path

import pandas as pd

from catalens.ingest.catalogue import Catalogue
from catalens.tasks import TaskInfo
from catalens.train.splits import ensure_splits, products_across_splits


def _catalogue(split):
    n = len(split)
    frame = pd.DataFrame({"id": [f"i{i}" for i in range(n)], "product_id": [f"p{i // 2}" for i in range(n)],
                          "path": [f"/x/{i}.jpg" for i in range(n)], "split": split,
                          "label": ["a", "a", "b", "b"] * (n // 4)})
    return Catalogue(frame=frame, tasks=[TaskInfo("label", "class", ["a", "b"])], root=Path("/x"), source="table")


def test_made_splits_keep_products_whole():
    cat, note = ensure_splits(_catalogue([None] * 40), 0.2, 0.2, seed=0)
    per_product = cat.frame.groupby("product_id")["split"].nunique()
    assert (per_product == 1).all() and set(cat.frame["split"]) == {"train", "val", "test"}
    assert note.startswith("no split given") and "warning" not in note


def test_given_splits_that_cut_a_product_are_named_with_the_fix():
    split = ["train", "test", "train", "train", "val", "val", "train", "val"]
    assert products_across_splits(_catalogue(split).frame) == (
        "warning: 2 product(s) have photos in more than one split, e.g. p0 (test+train), p3 (train+val): "
        "their evaluation photos leak into training. Fix the split column so every photo of a product shares "
        "one split, or drop the split column to let catalens split by product")
    _, note = ensure_splits(_catalogue(split), 0.2, 0.2, seed=0)
    assert "2 product(s) have photos in more than one split" in note
    assert products_across_splits(_catalogue(["train"] * 4 + ["val"] * 4).frame) is None
