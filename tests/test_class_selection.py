"""Class selection per task: include, exclude, min_count, top_n; affected photos reported, never dropped silently."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from catalens.config import load_config
from catalens.ingest.open import open_catalogue
from catalens.synthetic import make_catalogue, make_folder_dataset
from catalens.train.classes import kept_classes, merged_selections, select_classes

COUNTS = {"a": 10, "b": 7, "c": 7, "d": 2, "Others": 30}


def test_kept_classes_rules():
    assert kept_classes(COUNTS, {"exclude": ["Others"]}, "t") == ["a", "b", "c", "d"]
    assert kept_classes(COUNTS, {"include": ["d", "a"]}, "t") == ["a", "d"]
    assert kept_classes(COUNTS, {"min_count": 7}, "t") == ["Others", "a", "b", "c"]
    assert kept_classes(COUNTS, {"top_n": 2, "exclude": ["Others"]}, "t") == ["a", "b"]  # ties broken by name
    with pytest.raises(ValueError, match=r"task 't': include names \['x'\], which have no training photos"):
        kept_classes(COUNTS, {"include": ["x", "a"]}, "t")
    with pytest.raises(ValueError, match=r"class selection of task 't' \(min_count 99\) keeps no class; it has 5 "
                                         r"classes, the largest with 30 training photos"):
        kept_classes(COUNTS, {"min_count": 99}, "t")


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    return open_catalogue(make_catalogue(tmp_path_factory.mktemp("sel") / "data", n_products=40, size=32))


def test_select_relabels_one_task_and_keeps_the_others(catalogue):
    fit = catalogue.subset(catalogue.frame["split"].isin(["train", "val"]).to_numpy())
    n_hat = int((fit.frame["category"] == "hat").sum())
    out, rep = select_classes(fit, {"category": {"exclude": ["hat"]}})
    assert len(out) == len(fit)  # the photos keep their department and pattern labels
    assert not (out.frame["category"] == "hat").any() and rep.removed_rows == 0
    r = rep.tasks["category"]
    assert r["excluded_classes"] == {"hat": n_hat} and r["rows_relabelled"] == n_hat
    assert r["classes_kept"] == r["classes_before"] - 1 and r["rule"] == "exclude ['hat']"
    assert rep.listing["label"].tolist() == ["hat"] * n_hat and not rep.listing["removed"].any()
    assert (fit.frame["category"] == "hat").sum() == n_hat  # the input catalogue is not modified


def test_unknown_task_and_tags_task_are_refused(catalogue):
    with pytest.raises(ValueError, match=r"class selection names task 'colour', which the data does not have; "
                                         r"tasks are \['department', 'category', 'pattern'\]"):
        select_classes(catalogue, {"colour": {"top_n": 2}})
    with pytest.raises(ValueError, match="class selection applies to class tasks; 'pattern' is a tags task"):
        select_classes(catalogue, {"pattern": {"top_n": 2}})


def test_dataset_file_selection_merged_with_config(tmp_path):
    root = make_catalogue(tmp_path / "data", n_products=20, size=32).parent
    text = (root / "dataset.yaml").read_text().replace(
        "category:   {kind: class, parent: department}",
        "category:   {kind: class, parent: department, exclude: [hat], top_n: 5}")
    (root / "dataset.yaml").write_text(text)
    cat = open_catalogue(root / "dataset.yaml")
    assert cat.meta["class_selection"] == {"category": {"exclude": ["hat"], "top_n": 5}}
    cfg = load_config(overrides=[{"data": {"classes": {"category": {"top_n": 3}}}}])
    assert merged_selections(cat, cfg.data.classes) == {"category": {"exclude": ["hat"], "top_n": 3}}
    bad = text.replace("pattern:    {kind: tags,", "pattern:    {kind: tags, top_n: 2,")
    (root / "dataset.yaml").write_text(bad)
    with pytest.raises(ValueError, match="include, exclude, min_count and top_n select classes of class tasks only"):
        open_catalogue(root / "dataset.yaml")


def test_training_reports_the_photos_it_left_out(tmp_path):
    from catalens.train.pipeline import train

    data = make_folder_dataset(tmp_path / "data", n_per_class=5, size=48)
    n_boot = sum(1 for s in ("train", "val") for _ in (data / s / "boot").glob("*.jpg"))
    cfg = load_config(overrides=[{"tracking": False, "engine": {"progress": False, "runtime": "eager", "workers": 0},
                                  "head": {"epochs": 3}, "backbone": {"weights": "random", "image_size": 48},
                                  "data": {"classes": {"label": {"exclude": ["boot"]}}}}])
    lines = []
    train(data, tmp_path / "m", cfg, log=lines.append)
    desc = json.loads((tmp_path / "m" / "model.json").read_text())
    assert "boot" not in desc["tasks"][0]["classes"] and len(desc["tasks"][0]["classes"]) == 8
    summary = json.loads((tmp_path / "m" / "ingest" / "summary.json").read_text())
    assert summary["excluded_by_class_selection"] == n_boot
    assert summary["class_selection"]["tasks"]["label"]["excluded_classes"] == {"boot": n_boot}
    listing = pd.read_csv(tmp_path / "m" / "ingest" / "class_selection.csv")
    assert len(listing) == n_boot and listing["removed"].all() and set(listing["label"]) == {"boot"}
    text = "\n".join(lines)
    assert f"({n_boot} more removed by class selection)" in text
    assert f"class selection label: 8 of 9 classes kept (exclude ['boot']); {n_boot} photos lost this label" in text
    assert desc["ingest"]["class_selection"]["removed_rows"] == n_boot
