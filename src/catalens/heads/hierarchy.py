"""Hierarchy-consistent decoding: the most probable label path seen in training.

Independent per-level argmaxes can disagree (``Footwear > Watches``). Joint decoding
scores every path ``(master, sub, article)`` seen in training by the product of its level
probabilities (sum of logs) and returns, per row, the best path's class index at every
level. Paths come from ``model.meta["hierarchy_paths"]`` (``{"a > b > c": [[a, b, c], ...]}``).

Several chains may share a level (e.g. ``a > b`` and ``a > c``): chains are decoded one
after another, longest first, and a level already decided by an earlier chain is fixed
(only paths through that decision are considered).
"""
from __future__ import annotations

import numpy as np

from catalens.tasks import TaskInfo, hierarchy_levels

_EPS = 1e-12


def path_indices(levels: list[TaskInfo], paths: list[list[str]]) -> np.ndarray:
    """Known paths as class-index rows ``(P, L)``; paths naming an unknown class are skipped."""
    index = [{c: i for i, c in enumerate(t.classes)} for t in levels]
    rows = []
    for p in paths:
        if len(p) != len(levels):
            continue
        idx = [index[k].get(str(v)) for k, v in enumerate(p)]
        if None not in idx:
            rows.append(idx)
    return np.unique(np.asarray(rows, dtype=np.int64).reshape(-1, len(levels)), axis=0)


def path_scores(probs: list[np.ndarray], paths: np.ndarray, level_weights=None) -> np.ndarray:
    """``(n, P)``: sum over levels of ``weight * log p_level[path class]``."""
    w = np.ones(len(probs)) if level_weights is None else np.asarray(level_weights, dtype=np.float64)
    score = np.zeros((probs[0].shape[0], len(paths)))
    for k, p in enumerate(probs):
        score += w[k] * np.log(np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0))[:, paths[:, k]]
    return score


def decode_chain(probs: list[np.ndarray], paths: np.ndarray, fixed: dict[int, np.ndarray] | None = None,
                 level_weights=None) -> tuple[np.ndarray, np.ndarray]:
    """Best known path per row: ``(indices (n, L), log score (n,))``.

    ``fixed[k]``: per-row class indices already decided at level ``k`` (paths disagreeing
    are excluded for that row; when none remains the row keeps its fixed level and the
    best remaining path overall).
    """
    score = path_scores(probs, paths, level_weights)
    if fixed:
        allowed = np.ones_like(score, dtype=bool)
        for k, idx in fixed.items():
            allowed &= paths[None, :, k] == np.asarray(idx)[:, None]
        any_ok = allowed.any(1)
        score = np.where(allowed | ~any_ok[:, None], score, -np.inf)
    best = score.argmax(1)
    return paths[best], score[np.arange(len(best)), best]


def decode_hierarchy(tasks: list[TaskInfo], probs: dict[str, np.ndarray],
                     known_paths: dict[str, list[list[str]]] | list[list[str]],
                     level_weights: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """``{task: class index (n,)}`` for every class task in a hierarchy chain.

    Every returned row is a path seen in training (for chains that have known paths).
    Tasks outside any chain are not returned (their argmax stands). ``known_paths`` is
    ``model.meta["hierarchy_paths"]`` or a flat list of paths.
    """
    by_name = {t.name: t for t in tasks}
    chains = sorted(hierarchy_levels(tasks), key=len, reverse=True)
    flat = known_paths if isinstance(known_paths, list) else [p for v in known_paths.values() for p in v]
    out: dict[str, np.ndarray] = {}
    for chain in chains:
        levels = [by_name[c] for c in chain]
        named = [] if isinstance(known_paths, list) else known_paths.get(" > ".join(chain), [])
        paths = path_indices(levels, named or flat)
        if len(paths) == 0:
            continue
        fixed = {k: out[c] for k, c in enumerate(chain) if c in out}
        w = [(level_weights or {}).get(c, 1.0) for c in chain]
        idx, _ = decode_chain([probs[c] for c in chain], paths, fixed, w)
        for k, c in enumerate(chain):
            out.setdefault(c, idx[:, k])
    return out


def consistent_share(tasks: list[TaskInfo], pred_index: dict[str, np.ndarray],
                     known_paths: dict[str, list[list[str]]]) -> dict[str, float]:
    """Per chain, the share of rows whose predicted levels form a known path."""
    by_name = {t.name: t for t in tasks}
    out = {}
    for chain in hierarchy_levels(tasks):
        levels = [by_name[c] for c in chain]
        paths = path_indices(levels, known_paths.get(" > ".join(chain), []))
        if len(paths) == 0:
            continue
        pred = np.stack([pred_index[c] for c in chain], 1)
        known = {tuple(p) for p in paths.tolist()}
        out[" > ".join(chain)] = float(np.mean([tuple(r) in known for r in pred.tolist()])) if len(pred) else None
    return out
