"""Auto-accept at a target precision (selective classification).

A class task's answer is *accepted* when the probability of the decided label reaches the
task's accept threshold. The threshold is chosen on labelled held-out rows (the val split,
plus out-of-fold training rows when val is small, see :mod:`catalens.train.flags`) so that
the precision of the accepted rows reaches ``target_precision`` on photos **from another
collection** too, which the held-out rows do not contain. Two safeguards:

1. **a bound**: at every candidate threshold (each distinct probability, highest first) the
   accepted rows give ``k`` right out of ``n``; the one-sided Clopper-Pearson lower bound of
   their precision at ``bound_confidence`` (default 95%) must reach the target. This asks for
   evidence proportional to the target (100% right on fewer than ``log(0.05) / log(0.98)`` ≈ 149
   accepted rows does not prove 0.98) and protects against a lucky validation set;
2. **a shift margin**: the threshold is never under ``1 - (1 - target) / shift_margin``
   (default margin 2: 0.99 for a target of 0.98), i.e. the model's own calibrated
   probability must promise half the error budget. Measured (docs/benchmarks.md,
   bench_selective): a clothing head whose bound on its own photos says 0.947 realised 91%
   precision on another collection's photos, ``prob >= 0.98`` realised 96.8%, ``prob >= 0.99``
   98.4%: covariate shift makes calibrated probabilities over-confident, and the bound alone
   only covers photos like the validation ones.

The threshold kept is the lowest candidate (largest coverage) that satisfies both; when none
does, nothing is accepted (``threshold`` None).

numpy + scipy only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from catalens.model.decode import accept_mask
from catalens.tasks import MISSING

DEFAULT_TARGET = 0.98
DEFAULT_BOUND_CONFIDENCE = 0.95
DEFAULT_SHIFT_MARGIN = 2.0


def precision_lower_bound(k, n, confidence: float = DEFAULT_BOUND_CONFIDENCE) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound of a binomial proportion with ``k`` successes in
    ``n`` trials: the ``1 - confidence`` quantile of Beta(k, n - k + 1); 0 where ``k == 0``."""
    from scipy.stats import beta

    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        lb = beta.ppf(1.0 - confidence, np.maximum(k, 1e-12), n - k + 1.0)
    return np.where(k > 0, lb, 0.0)


@dataclass
class CoverageCurve:
    """Per distinct confidence (highest first): accept ``prob >= threshold`` → ``accepted`` rows,
    ``right`` of them correct; ``coverage`` and ``precision`` of that set."""

    threshold: np.ndarray
    accepted: np.ndarray
    right: np.ndarray
    total: int

    @property
    def coverage(self) -> np.ndarray:
        return self.accepted / max(self.total, 1)

    @property
    def precision(self) -> np.ndarray:
        return self.right / np.maximum(self.accepted, 1)


def coverage_curve(confidence: np.ndarray, correct: np.ndarray) -> CoverageCurve:
    """The precision–coverage curve of accepting rows by decreasing ``confidence``."""
    s = np.asarray(confidence, dtype=np.float64)
    c = np.asarray(correct, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    s, c = s[order], c[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1] if s.size else np.zeros(0, int)
    return CoverageCurve(s[last], last + 1.0, np.cumsum(c)[last] if s.size else np.zeros(0), int(s.size))


@dataclass
class AcceptThreshold:
    """The chosen threshold of one task (None: no threshold reaches the target) and what it
    gave on the rows it was chosen on."""

    threshold: float | None
    coverage: float
    precision: float | None
    lower_bound: float | None
    n: int

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "coverage": self.coverage, "precision": self.precision,
                "lower_bound": self.lower_bound, "n": self.n}


def probability_floor(target: float, shift_margin: float = DEFAULT_SHIFT_MARGIN) -> float:
    """The lowest accept threshold allowed: ``1 - (1 - target) / shift_margin`` (0 = no floor;
    1 = the target itself, i.e. trust the calibrated probability; 2 = half the error budget)."""
    if shift_margin < 0:
        raise ValueError(f"shift margin must be 0 (no floor) or positive, got {shift_margin}")
    return 0.0 if shift_margin == 0 else 1.0 - (1.0 - target) / shift_margin


def choose_threshold(confidence: np.ndarray, correct: np.ndarray, target: float = DEFAULT_TARGET,
                     bound_confidence: float = DEFAULT_BOUND_CONFIDENCE,
                     shift_margin: float = DEFAULT_SHIFT_MARGIN) -> AcceptThreshold:
    """The lowest probability threshold, not under :func:`probability_floor`, whose accepted
    rows have a Clopper-Pearson lower bound of precision ≥ ``target`` (see the module docstring)."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"target precision must lie strictly between 0 and 1, got {target}")
    floor = probability_floor(target, shift_margin)
    curve = coverage_curve(confidence, correct)
    if curve.total == 0:
        return AcceptThreshold(None, 0.0, None, None, 0)
    lb = precision_lower_bound(curve.right, curve.accepted, bound_confidence)
    good = np.flatnonzero((lb >= target) & (curve.threshold >= np.float32(floor) - 1e-12))
    if good.size == 0:
        return AcceptThreshold(None, 0.0, None, None, curve.total)
    i = int(good[-1])  # the lowest threshold (largest coverage) that reaches the target
    return AcceptThreshold(float(np.float32(curve.threshold[i])), float(curve.coverage[i]),
                           float(curve.precision[i]), float(lb[i]), curve.total)


def selective_metrics(confidence: np.ndarray, correct: np.ndarray, threshold: float | None,
                      target: float | None) -> dict:
    """``{"target_precision", "threshold", "coverage", "precision"}`` realised on labelled rows
    (``precision`` None when nothing is accepted)."""
    confidence = np.asarray(confidence)
    correct = np.asarray(correct, dtype=bool)
    acc = accept_mask(confidence, threshold)
    n = confidence.shape[0]
    return {"target_precision": None if target is None else float(target),
            "threshold": None if threshold is None else float(threshold),
            "coverage": float(acc.mean()) if n else None,
            "precision": float(correct[acc].mean()) if acc.any() else None}


def add_selective(metrics: dict, tasks, accept: dict | None, y: dict, probs: dict, decoded: dict | None) -> None:
    """Per class task, ``metrics[task]["selective"]``: the model's auto-accept threshold and the
    coverage and precision it realises on these rows (all None for a model without thresholds)."""
    for t in tasks:
        if t.kind != "class" or t.name not in metrics:
            continue
        yt, p = np.asarray(y[t.name]), np.asarray(probs[t.name])
        pred = (decoded or {}).get(t.name, p.argmax(1) if len(p) else np.zeros(0, np.int64))
        keep = yt != MISSING
        conf = p[np.arange(len(p)), pred][keep]
        if not accept or t.name not in (accept.get("thresholds") or {}):
            metrics[t.name]["selective"] = {"target_precision": None, "threshold": None, "coverage": None,
                                            "precision": None}
            continue
        metrics[t.name]["selective"] = selective_metrics(conf, pred[keep] == yt[keep], accept["thresholds"][t.name],
                                                         accept.get("target_precision"))
