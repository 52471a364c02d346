"""``unknown_score``: how unlike the trained classes a photo is, from probabilities alone.

Every path that answers (torch, the exported graph, the server, Ray) has the task
probabilities and nothing more, so the score is a function of them (higher = less likely to
be one of the trained classes):

- ``msp``: 1 - the highest probability (maximum softmax probability);
- ``entropy``: the entropy of the distribution divided by log(C) (0 = certain, 1 = uniform);
- ``margin``: 1 - (highest - second highest probability).

With several class tasks the score is the mean of the tasks' scores. The method is chosen by
measurement (benchmarks/bench_unknown.py, docs/benchmarks.md): feature-distance scores (kNN,
Mahalanobis) were measured there too and are not used, see the benchmark's notes.
A photo is flagged ``unknown`` when its score exceeds the threshold that keeps ``keep``
(default 95%) of validation photos. numpy only.
"""
from __future__ import annotations

import numpy as np

DEFAULT_METHOD = "entropy"
DEFAULT_KEEP = 0.95


def _msp(p: np.ndarray) -> np.ndarray:
    return 1.0 - p.max(axis=1)


def _entropy(p: np.ndarray) -> np.ndarray:
    c = p.shape[1]
    if c < 2:
        return np.zeros(len(p))
    q = np.clip(p, 1e-12, 1.0)
    q = q / q.sum(axis=1, keepdims=True)
    return -(q * np.log(q)).sum(axis=1) / np.log(c)


def _margin(p: np.ndarray) -> np.ndarray:
    if p.shape[1] < 2:
        return np.zeros(len(p))
    top2 = -np.partition(-p, 1, axis=1)[:, :2]
    return 1.0 - (top2[:, 0] - top2[:, 1])


METHODS = {"msp": _msp, "entropy": _entropy, "margin": _margin}


def unknown_score(probs: dict[str, np.ndarray], tasks: list[str], method: str = DEFAULT_METHOD) -> np.ndarray:
    """``(n,)`` float64 scores of ``method`` averaged over the class tasks ``tasks``."""
    if method not in METHODS:
        raise ValueError(f"unknown-score method {method!r} is not one of {sorted(METHODS)}")
    fn = METHODS[method]
    scores = [fn(np.asarray(probs[t], dtype=np.float64)) for t in tasks]
    return np.mean(scores, axis=0) if scores else np.zeros(0)


def keep_threshold(scores: np.ndarray, keep: float = DEFAULT_KEEP) -> float:
    """The score at or under which ``keep`` of ``scores`` lie (flag: ``score > threshold``)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("no validation photos to set the unknown threshold on")
    return float(np.quantile(scores, keep, method="higher"))


def describe(probs_val: dict[str, np.ndarray], tasks: list[str], method: str = DEFAULT_METHOD,
             keep: float = DEFAULT_KEEP) -> dict:
    """model.json's ``unknown`` entry for validation probabilities ``probs_val``."""
    return {"method": method, "tasks": list(tasks), "keep": float(keep),
            "threshold": keep_threshold(unknown_score(probs_val, tasks, method), keep)}
