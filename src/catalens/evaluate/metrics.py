"""Metrics of a model's outputs against labels, as one JSON-serialisable dict.

Label encoding (see :mod:`catalens.tasks`): class labels are int64 ``(n,)`` with ``-1`` =
missing; tag labels are float32 ``(n, n_tags)`` of 0/1 with NaN = missing. Missing labels
are masked out of every metric. Every float in the result is a plain Python float, and a
value that is undefined (no labelled rows, a class that never occurs) is ``None``, never NaN.

The generic agreement metrics (ROC-AUC one-vs-rest, MCC, Cohen's kappa, top-k accuracy, the
2x2 confusion of each tag) come from ``sklearn.metrics`` (imported on first use); the others
are numpy, checked against scikit-learn by the tests. Domain metrics (hierarchy, products)
stay here.
"""
from __future__ import annotations

import math

import numpy as np

from catalens.tasks import MISSING, TaskInfo, hierarchy_levels

N_CALIBRATION_BINS = 15
_EPS = 1e-15


def _f(x) -> float | None:
    """A plain float, or None when undefined (None, NaN or infinite)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _nan_if_none(x) -> float:
    return np.nan if x is None else float(x)


def _prf(tp: np.ndarray, predicted: np.ndarray, support: np.ndarray):
    """Precision, recall and F1 per class; 0 where a denominator is 0 (scikit-learn's zero_division=0)."""
    tp, predicted, support = (np.asarray(a, dtype=np.float64) for a in (tp, predicted, support))
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(predicted + support > 0, 2 * tp / (predicted + support), 0.0)
    return precision, recall, f1


def _per_label(names: list[str], precision, recall, f1, support, predicted, extra: dict | None = None) -> dict:
    """``{name: {precision, recall, f1, support, ...}}``; None for labels neither true nor predicted."""
    out = {}
    for i, name in enumerate(names):
        seen = support[i] > 0 or predicted[i] > 0
        row = {"precision": _f(precision[i]) if seen else None, "recall": _f(recall[i]) if seen else None,
               "f1": _f(f1[i]) if seen else None, "support": int(support[i])}
        for key, values in (extra or {}).items():
            row[key] = _f(values[i])
        out[name] = row
    return out


def pr_curve(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and threshold at each distinct score, from the highest score down."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    s, y = np.asarray(scores, dtype=np.float64)[order], np.asarray(y, dtype=np.float64)[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1] if s.size else np.zeros(0, int)
    tp = np.cumsum(y)[last]
    predicted = last + 1.0
    positives = y.sum()
    recall = tp / positives if positives > 0 else np.zeros_like(tp)
    return tp / predicted, recall, s[last]


def average_precision(y: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the precision-recall step curve (as scikit-learn's average_precision_score)."""
    y = np.asarray(y, dtype=np.float64)
    if y.size == 0 or y.sum() == 0:
        return None
    precision, recall, _ = pr_curve(y, scores)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_CALIBRATION_BINS):
    """Per equal-width confidence bin: count, mean confidence and accuracy (NaN when empty)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    # bins (0, 1/B], (1/B, 2/B], ...; a confidence of exactly 0 goes to the first bin
    idx = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        conf = np.bincount(idx, confidence, minlength=n_bins) / count
        acc = np.bincount(idx, correct, minlength=n_bins) / count
    return count, conf, acc


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_CALIBRATION_BINS) -> float | None:
    """Sum over bins of |accuracy - confidence| weighted by the bin's share of rows."""
    count, conf, acc = reliability_bins(confidence, correct, n_bins)
    if count.sum() == 0:
        return None
    used = count > 0
    return float(np.sum(count[used] * np.abs(acc[used] - conf[used])) / count.sum())


def _topk_accuracy(y: np.ndarray, p: np.ndarray, k: int) -> float | None:
    """Share of rows whose true class is among the ``k`` highest probabilities."""
    if y.size == 0:
        return None
    k = min(k, p.shape[1])
    if k >= p.shape[1]:
        return 1.0
    top = np.argpartition(-p, k - 1, axis=1)[:, :k]
    return float((top == y[:, None]).any(axis=1).mean())


def log_loss(y: np.ndarray, p: np.ndarray) -> float | None:
    """Mean negative log probability of the true class: ``y`` (n,) class indices, ``p`` (n, C) rows
    renormalised to sum to 1, clipped at 1e-15; None without rows. The report's ``log_loss`` and the
    preset blend's selection (:func:`catalens.train.presets.blend.neg_log_loss`) both use it."""
    if y.size == 0:
        return None
    p = np.asarray(p, dtype=np.float64)
    total = p.sum(axis=1, keepdims=True)
    p = np.where(total > 0, p / np.where(total > 0, total, 1.0), p)
    return float(-np.mean(np.log(np.clip(p[np.arange(y.size), y], _EPS, 1.0))))


TOP_K = (1, 2, 3, 5)


def agreement_metrics(y: np.ndarray, pred: np.ndarray, probs: np.ndarray) -> dict:
    """``roc_auc_ovr_macro`` (mean one-vs-rest ROC-AUC over the classes that occur with both
    outcomes in ``y``; None with fewer than two), ``mcc``, ``cohen_kappa`` and ``top_k_accuracy``
    (k = 1, 2, 3, 5; 1.0 once k reaches the number of classes), by ``sklearn.metrics``."""
    from sklearn.metrics import cohen_kappa_score, matthews_corrcoef, roc_auc_score, top_k_accuracy_score

    n, n_classes = probs.shape
    if n == 0:
        return {"roc_auc_ovr_macro": None, "mcc": None, "cohen_kappa": None,
                "top_k_accuracy": {str(k): None for k in TOP_K}}
    present = np.unique(y)
    aucs = [roc_auc_score(y == c, probs[:, c]) for c in present] if present.size >= 2 else []
    single = np.unique(np.r_[y, pred]).size < 2  # one label everywhere: kappa/MCC undefined (sklearn: 0 / nan)
    labels = np.arange(n_classes)
    # sklearn takes two classes as a binary problem (1-d scores); argmax is top-1 there
    topk = {str(k): (1.0 if k >= n_classes else _f(top_k_accuracy_score(y, probs, k=k, labels=labels))
                     if n_classes > 2 else _topk_accuracy(y, probs, k)) for k in TOP_K}
    return {"roc_auc_ovr_macro": _f(np.mean(aucs)) if aucs else None,
            "mcc": None if single else _f(matthews_corrcoef(y, pred)),
            "cohen_kappa": None if single else _f(cohen_kappa_score(y, pred)),
            "top_k_accuracy": topk}


def class_metrics(task: TaskInfo, y: np.ndarray, probs: np.ndarray, pred_index: np.ndarray | None = None) -> dict:
    """Metrics of one class task; rows labelled ``-1`` are left out."""
    y = np.asarray(y, dtype=np.int64)
    probs = np.asarray(probs)
    n_classes = task.n_outputs
    if probs.shape != (y.size, n_classes):
        raise ValueError(f"task '{task.name}': probs have shape {probs.shape}, expected {(y.size, n_classes)}")
    pred = probs.argmax(axis=1) if pred_index is None else np.asarray(pred_index, dtype=np.int64)
    keep = y != MISSING
    yt, yp, p = y[keep], pred[keep], probs[keep]
    if yt.size and (yt.min() < 0 or yt.max() >= n_classes):
        raise ValueError(f"task '{task.name}': labels outside 0..{n_classes - 1} (and -1 for missing)")
    cm = np.bincount(yt * n_classes + yp, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    support, predicted, tp = cm.sum(axis=1), cm.sum(axis=0), np.diag(cm)
    precision, recall, f1 = _prf(tp, predicted, support)
    seen = (support > 0) | (predicted > 0)
    n = int(yt.size)
    confidence = p[np.arange(n), yp] if n else np.zeros(0)
    return {
        "kind": "class", "n": n,
        "accuracy": _f((yt == yp).mean()) if n else None,
        "top5_accuracy": _topk_accuracy(yt, p, 5), "top3_accuracy": _topk_accuracy(yt, p, 3),
        "macro_f1": _f(f1[seen].mean()) if n else None,
        "weighted_f1": _f(np.sum(f1 * support) / n) if n else None,
        "log_loss": log_loss(yt, p),
        "ece": expected_calibration_error(confidence, yt == yp),
        **agreement_metrics(yt, yp, p),
        "per_class": _per_label(task.classes, precision, recall, f1, support, predicted),
        "confusion": cm.tolist(),
    }


def tags_metrics(task: TaskInfo, y: np.ndarray, probs: np.ndarray) -> dict:
    """Metrics of one tags task at the task's thresholds; NaN labels are masked per tag."""
    y = np.asarray(y, dtype=np.float64)
    probs = np.asarray(probs)
    if y.shape != probs.shape or y.ndim != 2 or y.shape[1] != task.n_outputs:
        raise ValueError(f"task '{task.name}': labels {y.shape} and probs {probs.shape} must both be (n, {task.n_outputs})")
    thr = task.threshold_array()
    labelled = ~np.isnan(y)
    truth = np.where(labelled, y, 0.0) > 0.5
    decided = (probs >= thr[None, :]) & labelled
    tp = (truth & decided).sum(axis=0)
    support, predicted = truth.sum(axis=0), decided.sum(axis=0)
    precision, recall, f1 = _prf(tp, predicted, support)
    ap = np.array([_nan_if_none(average_precision(y[labelled[:, j], j], probs[labelled[:, j], j]))
                   for j in range(y.shape[1])])
    seen = (support > 0) | (predicted > 0)
    n = int(labelled.any(axis=1).sum())
    micro_den = predicted.sum() + support.sum()
    per_tag = _per_label(task.classes, precision, recall, f1, support, predicted, extra={"average_precision": ap})
    for j, name in enumerate(task.classes):
        per_tag[name]["confusion"] = tag_confusion(truth[labelled[:, j], j], decided[labelled[:, j], j])
    return {
        "kind": "tags", "n": n,
        "micro_f1": _f(2 * tp.sum() / micro_den) if micro_den else None,
        "macro_f1": _f(f1[seen].mean()) if seen.any() else None,
        "mean_average_precision": _f(np.nanmean(ap)) if np.isfinite(ap).any() else None,
        "thresholds": {name: float(t) for name, t in zip(task.classes, thr)},
        "per_tag": per_tag,
    }


def tag_confusion(truth: np.ndarray, decided: np.ndarray) -> list[list[int]]:
    """``[[tn, fp], [fn, tp]]`` of one tag (rows = truth absent/present), by sklearn."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(np.asarray(truth, bool), np.asarray(decided, bool), labels=[False, True]).tolist()


def _path_keys(tasks: list[TaskInfo], known_paths: list[list[str]]) -> np.ndarray:
    """Known label paths of the chain ``tasks`` as integer keys (mixed radix of class indices)."""
    index = [{c: i for i, c in enumerate(t.classes)} for t in tasks]
    keys = []
    for path in known_paths:
        if len(path) != len(tasks):
            continue
        idx = [index[k].get(str(v)) for k, v in enumerate(path)]
        if None not in idx:
            keys.append(_encode(tasks, idx))
    return np.unique(np.asarray(keys, dtype=np.int64))


def _encode(tasks: list[TaskInfo], idx) -> np.ndarray:
    """Mixed-radix integer key of class indices, one index (or array) per level."""
    key = np.zeros_like(np.asarray(idx[0], dtype=np.int64))
    for t, i in zip(tasks, idx):
        key = key * t.n_outputs + np.asarray(i, dtype=np.int64)
    return key


def hierarchy_metrics(tasks: list[TaskInfo], y: dict, probs: dict, known_paths: list[list[str]],
                      pred_index: dict | None = None) -> dict:
    """Per chain of levels: how often the predicted labels form a path seen in training.

    Rows count when at least one level of the chain is labelled (unlabelled rows, e.g.
    images that failed to decode, are left out). ``path_accuracy`` is the share of rows
    labelled at every level whose predictions are right at every level.
    """
    by_name = {t.name: t for t in tasks}
    out = {}
    for chain in hierarchy_levels(tasks):
        preds = [np.asarray((pred_index or {}).get(name, np.asarray(probs[name]).argmax(axis=1))) for name in chain]
        labels = [np.asarray(y[name]) for name in chain]
        rows = np.flatnonzero(np.any([lab != MISSING for lab in labels], axis=0))
        levels = [by_name[c] for c in chain]
        known = _path_keys(levels, known_paths)
        consistent = np.isin(_encode(levels, [p[rows] for p in preds]), known)
        full = np.all([lab[rows] != MISSING for lab in labels], axis=0) if rows.size else np.zeros(0, bool)
        right = np.all([preds[k][rows] == labels[k][rows] for k in range(len(chain))], axis=0) if rows.size else full
        out[" > ".join(chain)] = {
            "levels": list(chain), "n": int(rows.size), "known_paths": len(known),
            "consistent_share": _f(consistent.mean()) if rows.size else None,
            "path_accuracy": _f(right[full].mean()) if full.any() else None,
        }
    return out


def compute_metrics(tasks: list[TaskInfo], y: dict[str, np.ndarray], probs: dict[str, np.ndarray],
                    known_paths: list[list[str]] | None = None,
                    pred_index: dict[str, np.ndarray] | None = None) -> dict:
    """``{task_name: {...}, ..., "hierarchy": {...}}`` for labels ``y`` and outputs ``probs``.

    ``pred_index`` optionally replaces the argmax prediction of class tasks (e.g. with
    hierarchy-consistent decoding). ``hierarchy`` is present only when the tasks form
    chains (``parent`` links) and ``known_paths`` (label paths seen in training) is given.
    """
    out: dict = {}
    for t in tasks:
        if t.kind == "class":
            out[t.name] = class_metrics(t, y[t.name], probs[t.name], (pred_index or {}).get(t.name))
        elif t.kind == "tags":
            out[t.name] = tags_metrics(t, y[t.name], probs[t.name])
        else:
            raise ValueError(f"task '{t.name}' has unknown kind '{t.kind}'")
    if known_paths is not None and hierarchy_levels(tasks):
        out["hierarchy"] = hierarchy_metrics(tasks, y, probs, known_paths, pred_index)
    return out
