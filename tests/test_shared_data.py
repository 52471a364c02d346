"""Integration on the real benchmark photos in ../shared/data (skipped when absent)."""
import json

import pandas as pd
import pytest

from catalens.config import load_config
from catalens.evaluate.pipeline import evaluate_model
from catalens.ingest.open import open_catalogue
from catalens.train.pipeline import train

CFG = [{"engine": {"progress": False}, "head": {"epochs": 120}}]


def _subset_csv(shared, tmp_path, per_class):
    """A dataset file over clothing-small with `per_class` photos per class and split."""
    cat = open_catalogue(shared / "clothing-small")
    f = cat.frame
    parts = [g.head(per_class[s]) for (s, _), g in f.groupby(["split", "label"]) if s in per_class]
    sub = pd.concat(parts)[["id", "path", "split", "label"]]
    sub.to_csv(tmp_path / "clothing.csv", index=False)
    (tmp_path / "clothing.yaml").write_text("table: clothing.csv\nimage: path\nid: id\nsplit: split\n"
                                            "tasks:\n  label: {kind: class}\n")
    return tmp_path / "clothing.yaml", len(sub)


def test_clothing_small_layout_is_read_as_is(shared_data):
    cat = open_catalogue(shared_data / "clothing-small")
    assert len(cat) == 3781
    assert cat.frame["split"].value_counts().to_dict() == {"train": 3068, "val": 341, "test": 372}
    assert len(cat.tasks[0].classes) == 10


def test_real_photos_train_and_evaluate(shared_data, tmp_path):
    data, n = _subset_csv(shared_data, tmp_path, {"train": 25, "val": 8, "test": 8})
    assert n == 410
    cfg = load_config(None, CFG)
    res = train(data, tmp_path / "m", cfg, log=lambda *_: None)
    assert res.model.tasks[0].classes[:3] == ["dress", "hat", "longsleeve"]
    ev = evaluate_model(tmp_path / "m", data, tmp_path / "r", cfg, log=lambda *_: None)
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())["label"]
    assert m["n"] == 80 and ev.excluded == 0
    assert m["accuracy"] >= 0.7           # 25 photos per class already carry most of the signal
    assert m["top5_accuracy"] >= 0.95
    # the report's data overview and learning curves (issue 14 item 6) on the real photos
    full = json.loads((tmp_path / "r" / "metrics.json").read_text())
    classes = res.model.tasks[0].classes
    assert full["class_sizes"]["label"]["counts"] == {"train": dict.fromkeys(classes, 25),
                                                      "val": dict.fromkeys(classes, 8), "test": dict.fromkeys(classes, 8)}
    assert full["learning_curves"]["epochs"] == len(res.model.head.history_)
    for name in ("samples_label.png", "learning_curves.png", "class_sizes_label.png"):
        assert (tmp_path / "r" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert (tmp_path / "r" / "samples_label.png").stat().st_size > 100_000  # 10 classes x 4 real photos


def test_fashion_products_dataset_file(shared_data):
    from pathlib import Path

    yaml = Path(__file__).resolve().parents[1] / "examples" / "fashion-products.yaml"
    if not (shared_data / "fashion-products").exists():
        pytest.skip("fashion-products not present")
    cat = open_catalogue(yaml)
    assert len(cat) == 5968
    assert [(t.name, t.kind, t.parent) for t in cat.tasks] == [
        ("masterCategory", "class", None), ("subCategory", "class", "masterCategory"),
        ("articleType", "class", "subCategory"), ("pattern", "tags", None)]
    assert len(cat.task("articleType").classes) == 75
    y = cat.encode()
    assert y["pattern"].shape == (5968, 4)
    assert cat.frame["text"].notna().mean() > 0.99
