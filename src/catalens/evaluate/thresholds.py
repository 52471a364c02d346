"""Per-tag decision thresholds that maximise F1 on labelled data (usually the val split).

A tag is predicted present when ``prob >= threshold``. For each tag the scores are sorted
once and F1 is evaluated at every distinct cut point at the same time (cumulative sums),
so tuning is exact and costs one sort per tag rather than a scan over a grid.
"""
from __future__ import annotations

import numpy as np

DEFAULT_THRESHOLD = 0.5


def _pick(thresholds: np.ndarray, f1: np.ndarray) -> float:
    """The threshold of best F1; ties go to the threshold closest to 0.5 (then the lower)."""
    best = f1.max()
    tied = np.flatnonzero(f1 >= best - 1e-12)
    order = np.lexsort((thresholds[tied], np.abs(thresholds[tied] - DEFAULT_THRESHOLD)))
    return float(thresholds[tied[order[0]]])


def _exact_candidates(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """F1 at every distinct cut of the scores ``s`` and a threshold for each cut.

    The threshold of a cut sits halfway between the lowest score kept and the next lower
    score (half the lowest score for the last cut), so it generalises better than the
    score itself while giving exactly the same decisions on these rows.
    """
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each run of equal scores
    tp = np.cumsum(y)[last]
    predicted = last + 1
    f1 = 2.0 * tp / (predicted + y.sum())
    kept = s[last].astype(np.float64)
    below = np.r_[kept[1:], 0.0]
    thr = ((kept + below) / 2.0).astype(np.float32)
    # float32 rounding may land the midpoint on the lower score: keep the cut then
    thr = np.where(thr > below.astype(np.float32), thr, s[last].astype(np.float32))
    return thr, f1


def _grid_candidates(y: np.ndarray, s: np.ndarray, grid) -> tuple[np.ndarray, np.ndarray]:
    """F1 at each threshold of ``grid`` (sorted scores + searchsorted, no loop)."""
    thr = np.unique(np.asarray(grid, dtype=np.float32))
    order = np.argsort(s, kind="mergesort")
    s, y = s[order], y[order]
    start = np.searchsorted(s, thr, side="left")  # first score >= threshold
    suffix = np.r_[np.cumsum(y[::-1])[::-1], 0.0]
    tp = suffix[start]
    predicted = s.size - start
    f1 = 2.0 * tp / np.maximum(predicted + y.sum(), 1e-12)
    return thr, f1


def tune_threshold(y: np.ndarray, scores: np.ndarray, grid=None) -> float:
    """The F1-maximising threshold of one tag; NaN labels are ignored; 0.5 without positives."""
    y = np.asarray(y, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float32)
    keep = ~np.isnan(y)
    y, s = y[keep], s[keep]
    if y.size == 0 or y.sum() == 0:
        return DEFAULT_THRESHOLD
    thr, f1 = _grid_candidates(y, s, grid) if grid is not None else _exact_candidates(y, s)
    return _pick(thr, f1)


def tune_thresholds(y: np.ndarray, probs: np.ndarray, grid=None) -> np.ndarray:
    """Per tag, the threshold maximising F1 on ``(y, probs)``; returns float32 ``(n_tags,)``.

    ``y`` is ``(n, n_tags)`` of 0/1 with NaN = missing (ignored per tag); ``probs`` the
    sigmoid outputs of the same shape. ``grid`` (optional) restricts the candidates to
    given values; by default every distinct cut of the scores is tried (exact optimum).
    A tag without positives keeps 0.5. Deterministic: ties go to the threshold nearest 0.5.
    """
    y = np.asarray(y, dtype=np.float64)
    probs = np.asarray(probs)
    if y.ndim != 2 or y.shape != probs.shape:
        raise ValueError(f"tune_thresholds needs y and probs of one shape (n, n_tags); got {y.shape} and {probs.shape}")
    out = np.full(y.shape[1], DEFAULT_THRESHOLD, dtype=np.float32)
    for j in range(y.shape[1]):
        out[j] = tune_threshold(y[:, j], probs[:, j], grid)
    return out
