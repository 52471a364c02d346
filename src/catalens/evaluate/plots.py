"""PNG figures of the evaluation report (matplotlib, Agg canvas, no pyplot global state).

Each function draws one figure, writes it atomically (temporary file, then ``os.replace``)
and returns the path written. Figures are built with ``matplotlib.figure.Figure`` on an
Agg canvas, so they work headless, in threads, and never touch the user's pyplot backend.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from catalens.evaluate.metrics import N_CALIBRATION_BINS, pr_curve, reliability_bins
from catalens.files import atomic_write_bytes

MAX_CONFUSION_CLASSES = 40
DPI = 110


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def most_confused(cm: np.ndarray, limit: int = MAX_CONFUSION_CLASSES) -> np.ndarray:
    """Indices of the ``limit`` classes with the most errors (as true or as predicted class), in class order."""
    cm = np.asarray(cm)
    if cm.shape[0] <= limit:
        return np.arange(cm.shape[0])
    off = cm - np.diag(np.diag(cm))
    errors = off.sum(axis=0) + off.sum(axis=1)
    return np.sort(np.argsort(-errors, kind="mergesort")[:limit])


def confusion_matrix_png(cm, classes: list[str], title: str, path: str | Path, normalise: bool = True) -> Path:
    """Confusion matrix (rows = true, columns = predicted), row-normalised by default.

    More than 40 classes: only the 40 most confused classes are drawn (the title says so).
    Figure size and fonts scale with the number of classes so labels stay readable.
    """
    cm = np.asarray(cm, dtype=np.float64)
    keep = most_confused(cm)
    sub = cm[np.ix_(keep, keep)]
    names = [str(classes[i]) for i in keep]
    if len(keep) < cm.shape[0]:
        title = f"{title} ({len(keep)} most confused of {cm.shape[0]} classes)"
    if normalise:
        rows = cm[keep].sum(axis=1, keepdims=True)  # share of all rows of the true class
        sub = np.divide(sub, rows, out=np.zeros_like(sub), where=rows > 0)
    k = max(len(keep), 1)
    side = float(np.clip(2.5 + 0.28 * k, 4.5, 22.0))
    font = float(np.clip(280.0 / k, 6.0, 10.0))
    fig = _new_figure(side + 1.2, side)
    ax = fig.add_subplot()
    vmax = 1.0 if normalise else max(float(sub.max()), 1.0)
    im = ax.imshow(sub, cmap="Blues", vmin=0, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=font)
    ax.set_yticks(range(len(names)), names, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=11)
    if k <= 20:
        for (i, j), v in np.ndenumerate(sub):
            if v > 0:
                ax.text(j, i, f"{v:.2f}" if normalise else f"{int(v)}", ha="center", va="center",
                        fontsize=font * 0.85, color="white" if v > 0.55 * vmax else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def pr_curves_png(y, probs, tags: list[str], path: str | Path, thresholds=None, max_curves: int = 20) -> Path:
    """Precision-recall curve per tag (NaN labels ignored), with the operating point of each threshold.

    With more than ``max_curves`` tags, the ones with the most positives are drawn.
    """
    y, probs = np.asarray(y, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    positives = np.nansum(y, axis=0)
    order = [j for j in np.argsort(-positives, kind="mergesort") if positives[j] > 0][:max_curves]
    fig = _new_figure(7.5, 5.5)
    ax = fig.add_subplot()
    for j in order:
        keep = ~np.isnan(y[:, j])
        precision, recall, cuts = pr_curve(y[keep, j], probs[keep, j])
        line, = ax.step(np.r_[0, recall], np.r_[precision[0], precision], where="post", lw=1.4,
                        label=f"{tags[j]} (n+={int(positives[j])})")
        if thresholds is not None:
            at = np.flatnonzero(cuts >= thresholds[j])
            if at.size:
                ax.plot(recall[at[-1]], precision[at[-1]], "o", color=line.get_color(), ms=5)
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    shown = f" ({len(order)} of {len(tags)} tags)" if len(order) < len(tags) else ""
    ax.set_title("precision-recall per tag" + shown + ("; dots = decision thresholds" if thresholds is not None else ""),
                 fontsize=10)
    ax.grid(alpha=0.3)
    if order:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    else:
        ax.text(0.5, 0.5, "no tag has a positive label", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, path)


def calibration_png(y, probs, path: str | Path, kind: str = "class", title: str = "",
                    n_bins: int = N_CALIBRATION_BINS, pred_index=None) -> Path:
    """Reliability diagram: accuracy against confidence per bin, with the count of rows per bin.

    ``kind="class"``: confidence = probability of the predicted class, correct = prediction
    is right (rows labelled -1 left out). ``kind="tags"``: every labelled (row, tag) cell,
    confidence = sigmoid output, "correct" = the tag is present.
    """
    conf, correct = _calibration_points(y, probs, kind, pred_index)
    count, mean_conf, acc = reliability_bins(conf, correct, n_bins)
    edges = np.linspace(0, 1, n_bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig = _new_figure(6.0, 6.4)
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfectly calibrated")
    used = count > 0
    ax.bar(centres[used], acc[used], width=1 / n_bins, edgecolor="#1f4e79", color="#5b9bd5", alpha=0.8,
           label="observed" if kind == "class" else "share positive")
    ax.plot(mean_conf[used], acc[used], "o", color="#c00000", ms=3, label="mean confidence")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy" if kind == "class" else "share of tags present")
    ax.set_title(title or "reliability diagram", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    hist.bar(centres, count, width=1 / n_bins, color="#a5a5a5", edgecolor="#7f7f7f")
    hist.set_xlim(0, 1)
    hist.set_xlabel("confidence" if kind == "class" else "predicted probability")
    hist.set_ylabel("rows" if kind == "class" else "cells")
    hist.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
    return _save(fig, path)


def _calibration_points(y, probs, kind: str, pred_index=None) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct) pairs of labelled rows (class) or labelled cells (tags)."""
    probs = np.asarray(probs, dtype=np.float64)
    if kind == "tags":
        y = np.asarray(y, dtype=np.float64)
        keep = ~np.isnan(y)
        return probs[keep], y[keep] > 0.5
    y = np.asarray(y)
    pred = probs.argmax(axis=1) if pred_index is None else np.asarray(pred_index)
    keep = y >= 0
    rows = np.flatnonzero(keep)
    return probs[rows, pred[rows]], pred[rows] == y[rows]


def roc_curves_png(y, probs, classes: list[str], path: str | Path, title: str = "", max_curves: int = 12) -> Path:
    """One-vs-rest ROC curve of the ``max_curves`` most frequent classes (sklearn's roc_curve)."""
    from sklearn.metrics import auc, roc_curve

    y, probs = np.asarray(y), np.asarray(probs, dtype=np.float64)
    keep = y >= 0
    y, probs = y[keep], probs[keep]
    counts = np.bincount(y, minlength=len(classes)) if y.size else np.zeros(len(classes), int)
    order = [c for c in np.argsort(-counts, kind="mergesort") if 0 < counts[c] < y.size][:max_curves]
    fig = _new_figure(6.5, 5.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    for c in order:
        fpr, tpr, _ = roc_curve(y == c, probs[:, c])
        ax.plot(fpr, tpr, lw=1.3, label=f"{classes[c]} (AUC {auc(fpr, tpr):.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    shown = f" ({len(order)} most frequent of {len(classes)})" if len(order) < len(classes) else ""
    ax.set_title((title or "ROC one-vs-rest") + shown, fontsize=10)
    ax.grid(alpha=0.3)
    if order:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _save(fig, path)


def coverage_png(y, probs, path: str | Path, pred_index=None, selective: dict | None = None, title: str = "") -> Path:
    """Precision–coverage curve of accepting rows by decreasing confidence (the probability of the
    decided label), with the target precision and the model's accept threshold when it has one."""
    from catalens.evaluate.selective import coverage_curve

    conf, correct = _calibration_points(y, probs, "class", pred_index)
    curve = coverage_curve(conf, correct)
    fig = _new_figure(6.0, 4.6)
    ax = fig.add_subplot()
    ax.plot(curve.coverage, curve.precision, color="#1f4e79", lw=1.5, label="accept prob ≥ t")
    sel = selective or {}
    if sel.get("target_precision") is not None:
        ax.axhline(sel["target_precision"], ls="--", color="grey", lw=1, label=f"target {sel['target_precision']:g}")
    if sel.get("coverage") is not None and sel.get("precision") is not None:
        ax.plot(sel["coverage"], sel["precision"], "o", color="#c00000", ms=6,
                label=f"model threshold {sel['threshold']:.3f}")
    low = float(np.min(curve.precision)) if curve.precision.size else 0.0
    ax.set_ylim(max(0.0, min(low, (sel.get("target_precision") or 1.0)) - 0.02), 1.005)
    ax.set_xlim(0, 1)
    ax.set_xlabel("coverage (share of photos auto-accepted)")
    ax.set_ylabel("precision of the accepted photos")
    ax.set_title(title or "precision–coverage", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return _save(fig, path)


def class_counts_png(classes: list[str], counts, title: str, path: str | Path, top: int = 60) -> Path:
    """Horizontal bars of rows per class, most frequent first (the ``top`` most frequent when more)."""
    counts = np.asarray(counts, dtype=np.int64)
    order = np.argsort(-counts, kind="mergesort")[:top]
    names = [str(classes[i]) for i in order]
    height = float(np.clip(0.9 + 0.19 * len(order), 2.5, 14.0))
    fig = _new_figure(7.0, height)
    ax = fig.add_subplot()
    ax.barh(range(len(order)), counts[order], color="#5b9bd5")
    _class_bars_axes(ax, names, "rows", title, f"top {len(order)} of {len(classes)}", len(order) < len(classes))
    return _save(fig, path)


def _class_bars_axes(ax, names: list[str], xlabel: str, title: str, subset: str, partial: bool) -> None:
    """The shared look of a horizontal bar chart with one bar (group) per class, largest on top."""
    ax.set_yticks(range(len(names)), names, fontsize=float(np.clip(500 / max(len(names), 1), 6, 9)))
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title + (f" ({subset})" if partial else ""), fontsize=10)
    ax.grid(axis="x", alpha=0.3)


def learning_curves_png(epochs: list[dict], path: str | Path, title: str = "", best_epoch: int | None = None,
                        max_tasks: int = 6) -> Path:
    """Learning curves from history rows (``epoch``, ``train_loss``, ``val_loss``, ``lr``,
    ``train_accuracy`` / ``val_accuracy`` as ``{task: value}``): a loss panel and an accuracy panel,
    train dashed and val solid, one colour per class task, and the learning rate below."""
    x = [e["epoch"] for e in epochs]
    fig = _new_figure(11.0, 6.2)
    loss_ax, acc_ax, lr_ax, note_ax = fig.subplots(2, 2, gridspec_kw={"height_ratios": [3, 1.2]}).ravel()
    for key, style in (("train_loss", "--"), ("val_loss", "-")):
        ys = [np.nan if e.get(key) is None else e[key] for e in epochs]
        if not np.all(np.isnan(ys)):
            loss_ax.plot(x, ys, style, color="#1f4e79", lw=1.4, label=key.replace("_", " "))
    tasks = list(dict.fromkeys(k for e in epochs for side in ("val_accuracy", "train_accuracy")
                               for k in (e.get(side) or {})))[:max_tasks]
    colours = [f"C{i}" for i in range(10)]
    for i, task in enumerate(tasks):
        for side, style in (("train_accuracy", "--"), ("val_accuracy", "-")):
            ys = [(e.get(side) or {}).get(task, np.nan) for e in epochs]
            if not np.all(np.isnan(ys)):
                acc_ax.plot(x, ys, style, color=colours[i % 10], lw=1.3, label=f"{task} {side.split('_')[0]}")
    lrs = [np.nan if e.get("lr") is None else e["lr"] for e in epochs]
    lr_ax.plot(x, lrs, color="#7f7f7f", lw=1.2)
    for ax, name in ((loss_ax, "loss"), (acc_ax, "accuracy"), (lr_ax, "learning rate")):
        if best_epoch is not None and ax is not lr_ax:
            ax.axvline(best_epoch, color="#c00000", ls=":", lw=1)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if loss_ax.lines:
        loss_ax.legend(fontsize=8)
    if acc_ax.lines:
        acc_ax.legend(fontsize=7, ncol=2)
    else:
        acc_ax.text(0.5, 0.5, "no accuracy recorded", ha="center", va="center", transform=acc_ax.transAxes)
    note_ax.axis("off")
    note = f"{len(epochs)} epochs" + (f"; dotted red line: best epoch {best_epoch}" if best_epoch else "")
    note_ax.text(0, 0.5, note + "\ntrain: running mean over the epoch's batches (training mode)\n"
                 "val: validation split after the epoch", fontsize=8, va="center")
    fig.suptitle(title or "learning curves", fontsize=11)
    return _save(fig, path)


def class_sizes_png(counts: dict[str, dict[str, int]], title: str, path: str | Path, top: int = 60) -> Path:
    """Horizontal bars of labelled rows per class, one bar per split (``counts``: ``{split: {class:
    rows}}``), classes by total rows, the ``top`` largest when more."""
    splits = list(counts)
    classes = list(next(iter(counts.values()))) if counts else []
    table = np.array([[counts[s].get(c, 0) for s in splits] for c in classes], dtype=np.int64).reshape(
        len(classes), len(splits))
    order = np.argsort(-table.sum(axis=1), kind="mergesort")[:top]
    height = float(np.clip(1.0 + 0.26 * len(order) * max(1, len(splits)) / 2, 2.5, 18.0))
    fig = _new_figure(7.5, height)
    ax = fig.add_subplot()
    bar = 0.8 / max(1, len(splits))
    for j, s in enumerate(splits):
        ax.barh(np.arange(len(order)) + (j - (len(splits) - 1) / 2) * bar, table[order, j], height=bar,
                label=f"{s} ({int(table[:, j].sum()):,})", color=f"C{j}")
    _class_bars_axes(ax, [str(classes[i]) for i in order], "labelled rows", title,
                     f"largest {len(order)} of {len(classes)}", len(order) < len(classes))
    if splits:
        ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def sample_grid_png(samples: dict[str, list], title: str, path: str | Path) -> Path:
    """A row of thumbnails (PIL images of one size) per class, the class name on the left."""
    from PIL import Image

    names = list(samples)
    per_row = max([len(v) for v in samples.values()] + [1])
    side = next((im.width for v in samples.values() for im in v), 96)
    fig = _new_figure(2.2 + 1.05 * per_row, max(1.6, 0.3 + 1.05 * len(names)))
    axes = fig.subplots(max(1, len(names)), 1, squeeze=False)[:, 0]
    for ax, name in zip(axes, names):
        strip = Image.new("RGB", (per_row * (side + 4), side), "white")
        for k, im in enumerate(samples[name]):
            strip.paste(im, (k * (side + 4), 0))
        ax.imshow(np.asarray(strip))
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_ylabel(f"{name} ({len(samples[name])})", rotation=0, ha="right", va="center", fontsize=8)
    if not names:
        axes[0].axis("off")
        axes[0].text(0.5, 0.5, "no labelled photo", ha="center", va="center")
    axes[0].set_title(title, fontsize=10, loc="left")
    return _save(fig, path)


def heatmap_png(values, rows: list[str], cols: list[str], title: str, path: str | Path, label: str,
                vmax: float = 1.0, max_side: int = MAX_CONFUSION_CLASSES) -> Path:
    """A 0..``vmax`` heat map (None/NaN cells grey) with row and column names; at most ``max_side``
    rows and columns (the first ones: callers order by size)."""
    v = np.array([[np.nan if x is None else x for x in r] for r in values], dtype=np.float64).reshape(
        len(rows), len(cols))[:max_side, :max_side]
    rows, cols = [str(r) for r in rows[:max_side]], [str(c) for c in cols[:max_side]]
    k = max(len(rows), len(cols), 1)
    font = float(np.clip(280.0 / k, 6.0, 10.0))
    fig = _new_figure(float(np.clip(2.5 + 0.28 * len(cols), 4.5, 20)) + 1.5,
                      float(np.clip(2.0 + 0.28 * len(rows), 3.0, 20)))
    ax = fig.add_subplot()
    cmap = matplotlib_cmap("viridis")
    im = ax.imshow(np.ma.masked_invalid(v), cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=font)
    ax.set_yticks(range(len(rows)), rows, fontsize=font)
    if len(rows) <= 20 and len(cols) <= 20:
        for (i, j), x in np.ndenumerate(v):
            if np.isfinite(x):
                ax.text(j, i, f"{x:.2f}", ha="center", va="center", fontsize=font * 0.8,
                        color="black" if x > 0.6 * vmax else "white")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=label)
    return _save(fig, path)


def matplotlib_cmap(name: str):
    """A copy of a named colour map whose masked (missing) cells are light grey."""
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad="#d9d9d9")
