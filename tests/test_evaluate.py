"""Evaluation stage: metric values against hand computations and scikit-learn, thresholds, report folder."""
from __future__ import annotations

import base64
import csv
import io
import json
import re

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from catalens.evaluate import compute_metrics, tune_thresholds
from catalens.evaluate.metrics import expected_calibration_error
from catalens.evaluate.plots import confusion_matrix_png, most_confused
from catalens.evaluate.report import write_report
from catalens.tasks import TaskInfo

# ---------------------------------------------------------------- class tasks

Y6 = np.array([0, 1, 2, 2, 1, 0, 3, 3])
P6 = np.array([
    [0.70, 0.10, 0.10, 0.10],  # 0 → 0 right
    [0.20, 0.50, 0.20, 0.10],  # 1 → 1 right
    [0.10, 0.60, 0.25, 0.05],  # 2 → 1 wrong (true class 2nd)
    [0.05, 0.05, 0.80, 0.10],  # 2 → 2 right
    [0.40, 0.35, 0.15, 0.10],  # 1 → 0 wrong (true class 2nd)
    [0.60, 0.20, 0.10, 0.10],  # 0 → 0 right
    [0.30, 0.30, 0.30, 0.10],  # 3 → 0 wrong (true class last)
    [0.10, 0.10, 0.20, 0.60],  # 3 → 3 right
])
CLS = TaskInfo("category", "class", ["a", "b", "c", "d"])


def test_class_metrics_hand_computed_and_sklearn():
    m = compute_metrics([CLS], {"category": Y6}, {"category": P6})["category"]
    pred = P6.argmax(1)
    assert m["kind"] == "class" and m["n"] == 8
    assert m["accuracy"] == pytest.approx(5 / 8)
    # top-3 of 4 classes: only row 6 (true class has the lowest probability) misses
    assert m["top3_accuracy"] == pytest.approx(7 / 8)
    assert m["top5_accuracy"] == 1.0  # top-min(5, 4) = all classes
    assert m["macro_f1"] == pytest.approx(skm.f1_score(Y6, pred, average="macro"))
    assert m["weighted_f1"] == pytest.approx(skm.f1_score(Y6, pred, average="weighted"))
    assert m["log_loss"] == pytest.approx(skm.log_loss(Y6, P6, labels=[0, 1, 2, 3]))
    assert m["confusion"] == skm.confusion_matrix(Y6, pred, labels=[0, 1, 2, 3]).tolist()
    # class a: predicted 4 times (rows 0, 4, 5, 6), 2 right; support 2
    a = m["per_class"]["a"]
    assert (a["precision"], a["recall"], a["support"]) == (pytest.approx(0.5), pytest.approx(1.0), 2)
    assert a["f1"] == pytest.approx(2 / 3)
    assert m["top3_accuracy"] == pytest.approx(skm.top_k_accuracy_score(Y6, P6, k=3, labels=[0, 1, 2, 3]))


def test_topk_with_many_classes_matches_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 9, 300)
    p = rng.dirichlet(np.ones(9), 300)
    m = compute_metrics([TaskInfo("t", "class", list("abcdefghi"))], {"t": y}, {"t": p})["t"]
    for k in (3, 5):
        assert m[f"top{k}_accuracy"] == pytest.approx(skm.top_k_accuracy_score(y, p, k=k, labels=range(9)))


def test_missing_class_labels_are_masked():
    y = np.r_[Y6, [-1, -1, -1]]
    p = np.r_[P6, np.full((3, 4), 0.25)]  # would all be wrong (argmax 0) if counted
    p[-3:, 0] = 0.97
    full = compute_metrics([CLS], {"category": Y6}, {"category": P6})["category"]
    masked = compute_metrics([CLS], {"category": y}, {"category": p})["category"]
    assert masked["n"] == 8
    for key in ("accuracy", "top3_accuracy", "macro_f1", "weighted_f1", "log_loss", "ece", "confusion", "per_class"):
        assert masked[key] == full[key], key
    # dropping labels of rows changes n and the values
    y2 = Y6.copy()
    y2[[2, 4]] = -1  # two of the three mistakes
    fewer = compute_metrics([CLS], {"category": y2}, {"category": P6})["category"]
    assert fewer["n"] == 6 and fewer["accuracy"] == pytest.approx(5 / 6)


def test_pred_index_overrides_argmax():
    pred = P6.argmax(1)
    pred[6] = 3  # fix the last mistake
    m = compute_metrics([CLS], {"category": Y6}, {"category": P6}, pred_index={"category": pred})["category"]
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["confusion"][3][3] == 2
    assert m["macro_f1"] == pytest.approx(skm.f1_score(Y6, pred, average="macro"))


def test_no_labelled_rows_gives_none_not_nan():
    m = compute_metrics([CLS], {"category": np.full(3, -1)}, {"category": P6[:3]})
    text = json.dumps(m, allow_nan=False)  # raises on NaN
    c = json.loads(text)["category"]
    assert c["n"] == 0 and c["accuracy"] is None and c["macro_f1"] is None and c["log_loss"] is None
    assert c["per_class"]["a"] == {"precision": None, "recall": None, "f1": None, "support": 0}


def test_ece_hand_computed():
    conf = np.array([0.9, 0.9, 0.9, 0.9, 0.3, 0.3])
    correct = np.array([1, 1, 1, 0, 1, 0])
    # bin of 0.9: |0.75 - 0.9| = 0.15 weight 4/6; bin of 0.3: |0.5 - 0.3| = 0.2 weight 2/6
    assert expected_calibration_error(conf, correct) == pytest.approx(0.15 * 4 / 6 + 0.2 * 2 / 6)


# ---------------------------------------------------------------- tags tasks

def _tags_case():
    y = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0], [1, 0, np.nan], [np.nan, 1, 0]], dtype=np.float32)
    p = np.array([[0.9, 0.2, 0.1], [0.4, 0.7, 0.3], [0.6, 0.8, 0.2], [0.1, 0.6, 0.7], [0.8, 0.1, 0.9],
                  [0.9, 0.3, 0.1]], dtype=np.float32)
    return TaskInfo("pattern", "tags", ["striped", "dotted", "plain"], thresholds=[0.5, 0.5, 0.5]), y, p


def test_tags_metrics_match_sklearn_with_nan_masked_per_tag():
    task, y, p = _tags_case()
    m = compute_metrics([task], {"pattern": y}, {"pattern": p})["pattern"]
    assert m["kind"] == "tags" and m["n"] == 6
    assert m["thresholds"] == {"striped": 0.5, "dotted": 0.5, "plain": 0.5}
    tp = fp = fn = 0
    f1s, aps = [], []
    for j, name in enumerate(task.classes):
        keep = ~np.isnan(y[:, j])
        yt, d = y[keep, j].astype(int), (p[keep, j] >= 0.5).astype(int)
        tp += int((yt & d).sum()); fp += int(((1 - yt) & d).sum()); fn += int((yt & (1 - d)).sum())
        row = m["per_tag"][name]
        assert row["support"] == int(yt.sum())
        assert row["precision"] == pytest.approx(skm.precision_score(yt, d, zero_division=0))
        assert row["recall"] == pytest.approx(skm.recall_score(yt, d, zero_division=0))
        assert row["f1"] == pytest.approx(skm.f1_score(yt, d, zero_division=0))
        if yt.sum():
            assert row["average_precision"] == pytest.approx(skm.average_precision_score(yt, p[keep, j]))
            aps.append(row["average_precision"])
        else:
            assert row["average_precision"] is None
        if yt.sum() or d.sum():
            f1s.append(row["f1"])
    assert m["micro_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m["macro_f1"] == pytest.approx(np.mean(f1s))  # 'plain' has no positives but one false alarm: counted, F1 0
    assert m["mean_average_precision"] == pytest.approx(np.mean(aps))  # 'plain' has no AP: left out
    # row 5 labels 'striped' with an NaN: if it were a 0 instead, precision of striped would drop
    y_zero = y.copy(); y_zero[5, 0] = 0
    m0 = compute_metrics([task], {"pattern": y_zero}, {"pattern": p})["pattern"]
    assert m0["per_tag"]["striped"]["precision"] < m["per_tag"]["striped"]["precision"]


def test_tags_use_task_thresholds_and_count_labelled_rows():
    task, y, p = _tags_case()
    task.thresholds = [0.95, 0.5, 0.5]  # nothing reaches 0.95: striped never predicted
    m = compute_metrics([task], {"pattern": y}, {"pattern": p})["pattern"]
    assert m["per_tag"]["striped"]["recall"] == 0.0 and m["thresholds"]["striped"] == pytest.approx(0.95)
    y2 = y.copy(); y2[3] = np.nan
    assert compute_metrics([task], {"pattern": y2}, {"pattern": p})["pattern"]["n"] == 5


# ---------------------------------------------------------------- thresholds

def _f1(y, decided) -> float:
    """Binary F1 in numpy (brute-force checks over many thresholds; sklearn is slow per call)."""
    y, d = np.asarray(y) > 0.5, np.asarray(decided)
    den = 2 * (y & d).sum() + (~y & d).sum() + (y & ~d).sum()
    return 2 * (y & d).sum() / den if den else 0.0


def test_tune_thresholds_finds_the_best_cut():
    y = np.array([[0], [0], [1], [1], [1], [0]], dtype=np.float32)
    p = np.array([[0.1], [0.3], [0.35], [0.6], [0.8], [0.7]], dtype=np.float32)
    # predicting >= 0.35 gives tp 3, fp 1: F1 6/7, the best; the threshold sits between 0.3 and 0.35
    t = tune_thresholds(y, p)
    assert t.dtype == np.float32 and t.shape == (1,)
    assert t[0] == pytest.approx(0.325)
    assert skm.f1_score(y[:, 0], p[:, 0] >= t[0]) == pytest.approx(6 / 7)
    grid = np.linspace(0, 1, 1001)
    assert max(_f1(y[:, 0], p[:, 0] >= g) for g in grid) == pytest.approx(6 / 7)


def test_tune_thresholds_nan_no_positives_grid_and_determinism():
    rng = np.random.default_rng(0)
    y = (rng.random((200, 3)) < 0.3).astype(np.float32)
    p = np.clip(0.35 * y + 0.65 * rng.random((200, 3)), 0, 1).astype(np.float32)
    y[:, 1] = 0  # no positives → 0.5
    y[::7, 2] = np.nan
    t = tune_thresholds(y, p)
    assert t[1] == 0.5
    np.testing.assert_array_equal(t, tune_thresholds(y, p))
    # exact tuning is at least as good as any grid point, and a grid run picks a grid value
    for j in (0, 2):
        keep = ~np.isnan(y[:, j])
        f_exact = skm.f1_score(y[keep, j], p[keep, j] >= t[j])
        f_grid = max(_f1(y[keep, j], p[keep, j] >= g) for g in np.linspace(0.01, 0.99, 99))
        assert f_exact >= f_grid - 1e-12
    grid = np.linspace(0.05, 0.95, 19)
    tg = tune_thresholds(y, p, grid=grid)
    assert all(np.isclose(grid, v).any() for v in tg[[0, 2]])
    keep = ~np.isnan(y[:, 2])
    best = max(_f1(y[keep, 2], p[keep, 2] >= np.float32(g)) for g in grid)
    assert skm.f1_score(y[keep, 2], p[keep, 2] >= tg[2]) == pytest.approx(best)


# ---------------------------------------------------------------- hierarchy

def _hierarchy_case():
    tasks = [TaskInfo("master", "class", ["Apparel", "Shoes"]),
             TaskInfo("sub", "class", ["Topwear", "Sneakers", "Boots"], parent="master")]
    known = [["Apparel", "Topwear"], ["Shoes", "Sneakers"], ["Shoes", "Boots"]]
    pm = np.array([[.9, .1], [.2, .8], [.6, .4], [.3, .7], [.5, .5]])  # argmax: A, S, A, S, A
    ps = np.array([[.8, .1, .1], [.1, .1, .8], [.1, .8, .1], [.7, .2, .1], [.3, .3, .4]])  # T, B, Sn, T, B
    y = {"master": np.array([0, 1, 0, 1, -1]), "sub": np.array([0, 2, 0, -1, -1])}
    return tasks, known, {"master": pm, "sub": ps}, y


def test_hierarchy_consistent_share():
    tasks, known, probs, y = _hierarchy_case()
    h = compute_metrics(tasks, y, probs, known_paths=known)["hierarchy"]
    chain = h["master > sub"]
    # row 4 has no label at any level: left out. Predicted paths of rows 0-3: A>T ok, S>B ok, A>Sn no, S>T no
    assert chain["levels"] == ["master", "sub"] and chain["n"] == 4
    assert chain["consistent_share"] == pytest.approx(0.5)
    # rows labelled at both levels: 0 (right), 1 (right), 2 (sub wrong)
    assert chain["path_accuracy"] == pytest.approx(2 / 3)
    fixed = compute_metrics(tasks, y, probs, known_paths=known, pred_index={"sub": np.array([0, 2, 0, 1, 2])})
    assert fixed["hierarchy"]["master > sub"]["consistent_share"] == pytest.approx(1.0)
    assert fixed["sub"]["accuracy"] == 1.0 and fixed["hierarchy"]["master > sub"]["path_accuracy"] == 1.0


def test_no_hierarchy_key_without_paths_or_chains():
    tasks, known, probs, y = _hierarchy_case()
    assert "hierarchy" not in compute_metrics(tasks, y, probs)
    assert "hierarchy" not in compute_metrics([CLS], {"category": Y6}, {"category": P6}, known_paths=known)


# ---------------------------------------------------------------- plots and report

def test_confusion_png_many_classes(tmp_path):
    rng = np.random.default_rng(1)
    cm = np.diag(rng.integers(5, 20, 80))
    cm[3, 70] = cm[70, 3] = 9
    keep = most_confused(cm)
    assert len(keep) == 40 and {3, 70} <= set(keep.tolist())
    path = confusion_matrix_png(cm, [f"class {i}" for i in range(80)], "many", tmp_path / "cm.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 600


def _thumb_b64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 20, 20)).save(buf, "JPEG")
    return base64.b64encode(buf.getvalue()).decode()


def test_write_report_folder(tmp_path):
    cls = TaskInfo("category", "class", ["<b>&x", "b", "c", "d"])
    tags, yt, pt = _tags_case()
    y, probs = {"category": Y6[:6], "pattern": yt}, {"category": P6[:6], "pattern": pt}
    metrics = compute_metrics([cls, tags], y, probs)
    context = {"model": "models/m1", "data": "data/test.csv", "images": 7, "excluded": 1,
               "problems": [{"id": "x", "error": "truncated <jpeg>"}]}
    examples = [{"image_b64": _thumb_b64(), "caption": "x: true <b>&x, predicted b", "correct": False}]
    out = write_report(tmp_path / "rep", metrics, [cls, tags], y, probs, title="eval <run>", context=context,
                       examples=examples)
    folder = tmp_path / "rep"
    assert out == folder / "report.html"
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved.pop("context") == context
    assert saved == json.loads(json.dumps(metrics))
    for name in ("per_class_category.csv", "per_class_pattern.csv", "confusion_category.png", "pr_pattern.png",
                 "calibration_category.png", "calibration_pattern.png", "roc_category.png", "coverage_category.png"):
        assert (folder / name).stat().st_size > 0, name
    assert not list(folder.glob("*.tmp")) and not list(folder.glob(".*"))
    rows = list(csv.DictReader((folder / "per_class_category.csv").open()))
    assert [r["class"] for r in rows] == cls.classes
    assert float(rows[1]["recall"]) == pytest.approx(metrics["category"]["per_class"]["b"]["recall"])

    page = out.read_text()
    assert "&lt;b&gt;&amp;x" in page and "<b>&x" not in page
    assert "eval &lt;run&gt;" in page and "truncated &lt;jpeg&gt;" in page
    assert page.count("data:image/png;base64,") >= 4
    assert "data:image/jpeg;base64," + examples[0]["image_b64"] in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<link" not in page and "@import" not in page
    assert "models/m1" in page and "striped" in page
    assert "ROC-AUC (one-vs-rest, macro)" in page and "Cohen's κ" in page and "TN FP / FN TP" in page
    # every embedded PNG decodes
    for b64 in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page):
        with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
            assert im.format == "PNG"


def test_write_report_without_context_keeps_metrics_exactly(tmp_path):
    tasks, known, probs, y = _hierarchy_case()
    metrics = compute_metrics(tasks, y, probs, known_paths=known)
    out = write_report(tmp_path, metrics, tasks, y, probs, title="h")
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert "Hierarchy consistency" in out.read_text()


# ---------------------------------------------------------------- the seeds' metrics (issue 14)

def test_roc_auc_mcc_kappa_top_k_equal_sklearn():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 6, 400)
    logits = rng.normal(size=(400, 6)) + 2.0 * np.eye(6)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = compute_metrics([TaskInfo("t", "class", list("abcdef"))], {"t": y}, {"t": p})["t"]
    pred = p.argmax(1)
    assert m["roc_auc_ovr_macro"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(y, pred))
    assert m["cohen_kappa"] == pytest.approx(skm.cohen_kappa_score(y, pred))
    assert list(m["top_k_accuracy"]) == ["1", "2", "3", "5"]
    for k in (1, 2, 3, 5):
        assert m["top_k_accuracy"][str(k)] == pytest.approx(skm.top_k_accuracy_score(y, p, k=k, labels=range(6)))
    assert m["top_k_accuracy"]["1"] == pytest.approx(m["accuracy"])


def test_agreement_metrics_on_the_hand_case_and_degenerate_cases():
    m = compute_metrics([CLS], {"category": Y6}, {"category": P6})["category"]
    assert m["top_k_accuracy"] == {"1": pytest.approx(5 / 8), "2": pytest.approx(7 / 8), "3": pytest.approx(7 / 8),
                                   "5": 1.0}
    # every class occurs: the one-vs-rest mean equals sklearn's multiclass score
    assert m["roc_auc_ovr_macro"] == pytest.approx(skm.roc_auc_score(Y6, P6, multi_class="ovr"))
    # one class only in the labels and predictions: undefined, None (not NaN)
    one = compute_metrics([CLS], {"category": np.zeros(3, int)}, {"category": np.tile(P6[:1], (3, 1))})["category"]
    assert (one["roc_auc_ovr_macro"], one["mcc"], one["cohen_kappa"]) == (None, None, None)
    none = compute_metrics([CLS], {"category": np.full(2, -1)}, {"category": P6[:2]})["category"]
    assert none["top_k_accuracy"] == {"1": None, "2": None, "3": None, "5": None}


def test_two_by_two_confusion_per_tag_equals_sklearn():
    task, y, p = _tags_case()
    m = compute_metrics([task], {"pattern": y}, {"pattern": p})["pattern"]
    for j, name in enumerate(task.classes):
        keep = ~np.isnan(y[:, j])
        want = skm.confusion_matrix(y[keep, j].astype(int), (p[keep, j] >= 0.5).astype(int), labels=[0, 1])
        assert m["per_tag"][name]["confusion"] == want.tolist()
