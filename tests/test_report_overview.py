"""Issue 14 item 6, the rest of the seeds' metrics: training history (history.json, learning curves,
the learning rate in MLflow), class sizes per split, sample grids and the correlation between tasks."""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from catalens.config import load_config
from catalens.evaluate.overview import NO_SPLIT, class_sizes, cramers_v, sample_rows, task_correlation
from catalens.heads.estimator import MultiTaskHead
from catalens.ingest.catalogue import Catalogue
from catalens.model.format import HISTORY_FILE, ModelError, TrainingHistory, read_history
from catalens.synthetic import make_catalogue
from catalens.tasks import TaskInfo

CFG = {"engine": {"progress": False, "runtime": "eager"}, "tracking": False}


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header, after checking the signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


# ------------------------------------------------------------------ Cramér's V, class sizes, correlation

def test_cramers_v_hand_computed_and_equal_to_scipy():
    from scipy.stats.contingency import association

    table = [[20, 10, 10], [10, 20, 30]]
    # expected counts 12 12 16 / 18 18 24: chi2 = 64/12 + 4/12 + 36/16 + 64/18 + 4/18 + 36/24
    chi2 = 64 / 12 + 4 / 12 + 36 / 16 + 64 / 18 + 4 / 18 + 36 / 24
    assert cramers_v(table) == pytest.approx(math.sqrt(chi2 / 100)) == pytest.approx(0.363242, abs=1e-6)
    assert cramers_v(table) == pytest.approx(association(np.array(table), method="cramer"))
    assert cramers_v([[10, 0], [0, 10]]) == pytest.approx(1.0)
    assert cramers_v([[5, 5], [5, 5]]) == pytest.approx(0.0)
    assert cramers_v([[3, 4]]) is None                      # one row: undefined
    assert cramers_v([[3, 0], [4, 0]]) is None              # one used column


def _catalogue() -> Catalogue:
    """12 rows: department x category labels, a pattern tag, three splits, gaps and one unknown label."""
    dept = ["men", "men", "men", "women", "women", "women", "men", "women", None, "men", "women", "kids"]
    cat_ = ["shirt", "shirt", "shoe", "dress", "dress", "shoe", "shirt", "dress", "shoe", None, "shoe", "shoe"]
    striped = [1, 0, 0, 1, 1, 0, 1, np.nan, 0, 1, 0, 0]
    split = ["train"] * 6 + ["val"] * 3 + ["test"] * 2 + [None]
    frame = pd.DataFrame({"id": [str(i) for i in range(12)], "product_id": [str(i) for i in range(12)],
                          "path": [f"/nowhere/{i}.jpg" for i in range(12)], "split": split, "text": None,
                          "row": range(2, 14), "department": dept, "category": cat_, "pattern/striped": striped})
    tasks = [TaskInfo("department", "class", ["men", "women"]), TaskInfo("category", "class", ["dress", "shirt", "shoe"]),
             TaskInfo("pattern", "tags", ["striped"])]
    return Catalogue(frame, tasks, Path("/nowhere"), "test")


def test_class_sizes_count_every_label_per_split():
    cat = _catalogue()
    sizes = class_sizes(cat, cat.tasks)
    assert set(sizes) == {"department", "category"}  # class tasks only
    d = sizes["department"]
    # labels the model does not know ("kids") come after its classes, in every split
    assert d["counts"] == {"train": {"men": 3, "women": 3, "kids": 0}, "val": {"men": 1, "women": 1, "kids": 0},
                           "test": {"men": 1, "women": 1, "kids": 0}, NO_SPLIT: {"men": 0, "women": 0, "kids": 1}}
    assert list(d["counts"]["train"]) == ["men", "women", "kids"]
    assert d["unlabelled"] == {"train": 0, "val": 1, "test": 0, NO_SPLIT: 0}
    # every row is counted once: labelled + unlabelled = rows per split
    for task, entry in sizes.items():
        for split, n in cat.frame["split"].fillna(NO_SPLIT).value_counts().items():
            assert sum(entry["counts"][split].values()) + entry["unlabelled"][split] == n, (task, split)
    assert sizes["category"]["counts"]["train"] == {"dress": 2, "shirt": 2, "shoe": 2}


def test_task_correlation_tables_rates_and_cramers_v():
    cat = _catalogue()
    corr = task_correlation(cat, cat.tasks)
    assert corr["splits"] == ["train", "val", "test", NO_SPLIT] and corr["rows"] == 12
    assert list(corr["pairs"]) == ["department x category", "department x pattern", "category x pattern"]
    dc = corr["pairs"]["department x category"]
    # rows with both labels: 10 (row 8 has no department, row 9 no category)
    assert dc["n"] == 10 and dc["rows"] == ["men", "women", "kids"] and dc["columns"] == ["dress", "shirt", "shoe"]
    assert dc["contingency"] == [[0, 3, 1], [3, 0, 2], [0, 0, 1]]
    assert dc["cramers_v"] == pytest.approx(cramers_v([[0, 3, 1], [3, 0, 2], [0, 0, 1]]))
    cp = corr["pairs"]["category x pattern"]
    assert cp["kind"] == "class x tags" and cp["tags"] == ["striped"]
    # striped among labelled rows: dress 2 of 2 (row 7 has no tag), shirt 2 of 3, shoe 0 of 5
    assert cp["rate"] == [[1.0], [pytest.approx(2 / 3)], [0.0]] and cp["support"] == [[2], [3], [5]]
    assert cp["cramers_v"]["striped"] == pytest.approx(cramers_v([[0, 2], [1, 2], [5, 0]]))


def test_sample_rows_are_seeded_per_class_and_capped():
    cat = _catalogue()
    rows = sample_rows(cat, cat.tasks[1], per_class=2, seed=0)
    assert list(rows) == ["dress", "shirt", "shoe"]
    for c, r in rows.items():
        assert len(r) == 2 and all(cat.frame["category"].iat[i] == c for i in r)
    assert rows == sample_rows(cat, cat.tasks[1], per_class=2, seed=0)
    assert list(sample_rows(cat, cat.tasks[1], per_class=2, max_classes=1)) == ["shoe"]  # the largest class


def test_class_sizes_on_the_real_photos_equal_the_folder_counts(shared_data):
    from catalens.ingest.open import open_catalogue

    root = shared_data / "clothing-small"
    cat = open_catalogue(root)
    sizes = class_sizes(cat, [cat.task(cat.task_names[0])])
    counts = next(iter(sizes.values()))["counts"]
    for folder, split in (("train", "train"), ("validation", "val"), ("test", "test")):
        expected = {d.name: sum(1 for f in d.iterdir() if f.suffix.lower() in (".jpg", ".jpeg"))
                    for d in (root / folder).iterdir() if d.is_dir()}
        assert {k: v for k, v in counts[split].items() if v} == expected, split
    assert sum(sum(c.values()) for c in counts.values()) == 3781


# ------------------------------------------------------------------ history in the heads and the model folder

def _separable(n=150, d=8, k=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    X = rng.normal(size=(n, d)).astype(np.float32) + np.eye(k, d, dtype=np.float32)[y] * 3
    return X, y.astype(np.int64)


def test_head_history_has_loss_accuracy_per_task_and_lr_per_epoch():
    X, y = _separable()
    y2 = (y > 0).astype(np.int64)
    y2[:10] = -1  # unlabelled rows do not count
    tasks = [TaskInfo("fine", "class", ["a", "b", "c"]), TaskInfo("coarse", "class", ["a", "bc"])]
    head = MultiTaskHead(tasks, epochs=15, lr=0.01, patience=100, batch_size=32)
    head.fit(X[:110], {"fine": y[:110], "coarse": y2[:110]}, X[110:], {"fine": y[110:], "coarse": y2[110:]})
    hist = head.history_
    assert [h["epoch"] for h in hist] == list(range(1, 16))  # one row per epoch, no early stop
    for h in hist:
        assert set(h) == {"epoch", "train_loss", "lr", "val_loss", "train_accuracy", "train_accuracy_by_task",
                          "val_accuracy", "val_accuracy_by_task"}
        assert list(h["val_accuracy_by_task"]) == ["fine", "coarse"]  # finest first
        assert h["val_accuracy"] == h["val_accuracy_by_task"]["fine"]
        assert 0 <= h["train_accuracy_by_task"]["coarse"] <= 1
    # val accuracy of the kept (best) epoch = the accuracy of the fitted head on the val rows
    best = hist[head.best_epoch_ - 1]
    pred = head.predict_proba(X[110:])
    assert best["val_accuracy_by_task"]["fine"] == pytest.approx(float((pred["fine"].argmax(1) == y[110:]).mean()))
    keep = y2[110:] >= 0
    assert best["val_accuracy_by_task"]["coarse"] == pytest.approx(
        float((pred["coarse"].argmax(1)[keep] == y2[110:][keep]).mean()))
    assert hist[-1]["train_accuracy_by_task"]["fine"] > 0.9  # separable data is learnt
    assert hist[-1]["lr"] < hist[2]["lr"]  # one-cycle: annealed by the end


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A synthetic catalogue, a model trained on it (20 epochs) and its evaluation report."""
    from catalens.evaluate.pipeline import evaluate_model
    from catalens.train.pipeline import train

    root = tmp_path_factory.mktemp("overview")
    data = make_catalogue(root / "data", n_products=90, size=96, seed=3)
    cfg = load_config(None, [CFG, {"head": {"epochs": 20, "patience": 100}}])
    result = train(data, root / "model", cfg, log=lambda *_: None)
    ev = evaluate_model(root / "model", data, root / "report", cfg, log=lambda *_: None)
    return root, data, result, ev


def test_model_folder_holds_a_typed_history(trained):
    root, _, result, _ = trained
    raw = json.loads((root / "model" / HISTORY_FILE).read_text())
    assert raw["format"] == "catalens-history/1" and raw["stage"] == "heads"
    hist = read_history(root / "model")
    rows = result.model.head.history_
    assert len(hist.epochs) == len(rows) == 20 and hist.best_epoch == result.model.head.best_epoch_
    assert [e.epoch for e in hist.epochs] == list(range(1, 21))
    first = hist.epochs[0]
    assert first.train_loss == pytest.approx(rows[0]["train_loss"]) and first.lr == pytest.approx(rows[0]["lr"])
    assert set(first.val_accuracy) == {"department", "category"} == set(first.train_accuracy)
    assert first.val_accuracy["category"] == pytest.approx(rows[0]["val_accuracy_by_task"]["category"])


def test_a_folder_without_history_loads_and_a_broken_one_names_the_field(trained, tmp_path):
    import shutil

    from catalens.model.load import load_model

    root = trained[0]
    old = tmp_path / "old"
    shutil.copytree(root / "model", old)
    (old / HISTORY_FILE).unlink()
    assert read_history(old) is None
    assert [t.name for t in load_model(old).tasks] == ["department", "category", "pattern"]
    raw = json.loads((root / "model" / HISTORY_FILE).read_text())
    raw["epochs"][1]["epoch"] = 1
    (old / HISTORY_FILE).write_text(json.dumps(raw))
    with pytest.raises(ModelError, match=r"history.json': field '\(top level\)': .*increasing and unique"):
        load_model(old)
    raw["epochs"][1]["epoch"] = 2
    raw["epochs"][0]["lr"] = "fast"
    (old / HISTORY_FILE).write_text(json.dumps(raw))
    with pytest.raises(ModelError, match=r"field 'epochs.0.lr'.*delete the file"):
        read_history(old)


def test_history_from_rows_drops_non_finite_numbers():
    h = TrainingHistory.from_rows([{"epoch": 1, "train_loss": float("nan"), "lr": 0.1, "seconds": 3.0,
                                    "val_accuracy_by_task": {"a": 0.5, "b": float("inf")}}], "finetune", 1)
    assert h.epochs[0].train_loss is None and h.epochs[0].val_accuracy == {"a": 0.5}
    assert json.loads(h.model_dump_json())["epochs"][0]["seconds"] == 3.0


# ------------------------------------------------------------------ the evaluation report

def test_evaluate_writes_class_sizes_correlation_and_learning_curves(trained):
    root, data, result, ev = trained
    folder = root / "report"
    metrics = json.loads((folder / "metrics.json").read_text())
    labels = pd.read_csv(Path(data).parent / "products.csv")
    # class sizes = the labels' counts, per split, over the whole data given (not only the test rows)
    got = metrics["class_sizes"]["category"]["counts"]
    for split, part in labels.groupby("split"):
        name = {"validation": "val"}.get(split, split)
        assert {k: v for k, v in got[name].items() if v} == part["category"].value_counts().to_dict(), split
    # correlation on the labels: the contingency table is pandas' crosstab; the hierarchy makes V = 1
    pair = metrics["task_correlation"]["pairs"]["department x category"]
    table = pd.crosstab(labels["department"], labels["category"]).reindex(
        index=pair["rows"], columns=pair["columns"], fill_value=0)
    assert pair["contingency"] == table.to_numpy().tolist()
    assert pair["cramers_v"] == pytest.approx(1.0)  # each category lies under one department
    tags = metrics["task_correlation"]["pairs"]["category x pattern"]
    assert tags["kind"] == "class x tags" and len(tags["rate"]) == len(tags["classes"])
    assert metrics["learning_curves"] == {"file": "learning_curves.png", "stage": "heads", "epochs": 20,
                                          "best_epoch": result.model.head.best_epoch_}
    # the figures: valid PNGs of a plausible size, and in the page
    for name in ("learning_curves.png", "class_sizes_category.png", "samples_category.png", "samples_department.png",
                 "correlation_department__category.png", "correlation_category__pattern.png"):
        w, h = _png_size(folder / name)
        assert w >= 300 and h >= 150 and (folder / name).stat().st_size > 8_000, name
    page = (folder / "report.html").read_text()
    for anchor in ('id="training"', 'id="data"', 'id="correlation"', 'href="#training"'):
        assert anchor in page
    assert "Cramér's V" in page and "history.json of the model folder" in page


def test_sample_grid_has_one_row_of_photos_per_class(trained):
    """The grid image grows with the classes: department (fewer classes) is shorter than category."""
    root = trained[0]
    _, h_dep = _png_size(root / "report" / "samples_department.png")
    _, h_cat = _png_size(root / "report" / "samples_category.png")
    meta = json.loads((root / "model" / "model.json").read_text())
    n = {t["name"]: len(t["classes"]) for t in meta["tasks"]}
    assert n["category"] > n["department"] and h_cat > h_dep


def test_report_of_a_model_without_history_says_none(trained, tmp_path):
    import shutil

    from catalens.evaluate.pipeline import evaluate_model

    root, data, _, _ = trained
    shutil.copytree(root / "model", tmp_path / "old")
    (tmp_path / "old" / HISTORY_FILE).unlink()
    evaluate_model(tmp_path / "old", data, tmp_path / "rep", load_config(None, [CFG]), log=lambda *_: None)
    assert json.loads((tmp_path / "rep" / "metrics.json").read_text())["learning_curves"] is None
    assert not (tmp_path / "rep" / "learning_curves.png").exists()
    assert 'id="training"' not in (tmp_path / "rep" / "report.html").read_text()


# ------------------------------------------------------------------ the learning rate in MLflow

def test_learning_rate_is_logged_per_epoch_and_follows_the_schedule(tmp_path, monkeypatch):
    """A real SQLite MLflow store: ``lr`` has one point per epoch (step = epoch) and follows the step
    schedule (x0.1 every 3 epochs; the 5% warm-up ends inside epoch 1); losses are there per epoch too."""
    pytest.importorskip("mlflow")
    from catalens.track import log_training
    from catalens.track.mlflow_tracking import client, experiment_id
    from catalens.train.pipeline import train

    for k in ("MLFLOW_TRACKING_URI", "CATALENS_TRACKING", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(tmp_path)
    data = make_catalogue(tmp_path / "data", n_products=60, size=96, seed=4)
    head = {"epochs": 8, "lr": 0.02, "patience": 100, "schedule": "step", "step_epochs": 3, "gamma": 0.1}
    cfg = load_config(None, [CFG, {"tracking": True, "head": head}])
    r = train(data, tmp_path / "m", cfg, log=lambda *_: None)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = log_training(r, cfg, data=data, uri=uri, log=lambda *_: None)
    assert run_id is not None
    cl = client(uri)
    assert cl.get_run(run_id).info.experiment_id == experiment_id(cl, "catalens", create=False)
    lr = cl.get_metric_history(run_id, "lr")
    assert [m.step for m in lr] == list(range(1, 9))
    assert [m.value for m in lr] == pytest.approx([0.02 * 0.1 ** ((e - 1) // 3) for e in range(1, 9)])
    for key in ("train_loss", "val_loss", "val_accuracy_by_task.category", "train_accuracy_by_task.category"):
        assert [m.step for m in cl.get_metric_history(run_id, key)] == list(range(1, 9)), key
    assert os.path.exists(tmp_path / "mlflow.db")
