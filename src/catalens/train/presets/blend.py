"""Combining scored recipes: greedy forward selection with replacement over their out-of-fold
probabilities (Caruana et al., 2004), within what their refit may cost."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from catalens.train.presets.recipes import Scored, crop_mode


#: tags probabilities are clipped to [EPS, 1 - EPS] before their log (class tasks: the report's log-loss,
#: :func:`catalens.evaluate.metrics.log_loss`)
EPS = 1e-7


def neg_log_loss(tasks, Y: dict, probs: dict) -> float:
    """Minus the mean over tasks of their log-loss (higher is better): class tasks the report's log-loss
    (:func:`catalens.evaluate.metrics.log_loss`, rows labelled ``MISSING`` left out), tags tasks the binary
    cross-entropy of each labelled (not NaN) tag. :func:`greedy_blend` selects by it."""
    from catalens.evaluate.metrics import log_loss
    from catalens.tasks import MISSING

    losses = []
    for t in tasks:
        y = np.asarray(Y[t.name])
        if t.kind == "class":
            keep = y != MISSING   # p (n, C), y (n,): the report's log-loss
            if keep.any():
                losses.append(log_loss(y[keep], np.asarray(probs[t.name])[keep]))
        else:
            p = np.clip(np.asarray(probs[t.name], dtype=np.float64), EPS, 1 - EPS)
            lab = ~np.isnan(y)  # p, y (n, T)
            if lab.any():
                losses.append(-(y[lab] * np.log(p[lab]) + (1 - y[lab]) * np.log(1 - p[lab])).mean())
    return -float(np.mean(losses)) if losses else float("nan")


def greedy_blend(done: list[Scored], refit_cost: Callable[[list[Scored]], float], left: Callable[[], float],
                 rounds: int = 10, select_by: Callable = neg_log_loss) -> tuple[list[Scored], list[float], float]:
    """The recipes to refit, their integer weights and the blend's out-of-fold objective.

    Starts from the best of ``done`` (recipes with out-of-fold probabilities) and adds whichever
    recipe, again or new, raises ``select_by`` of the averaged probabilities most; stops when
    nothing does, after ``rounds`` picks, or when no candidate's blend can be refitted in the
    seconds ``left()`` (``refit_cost(members)``). Members share one crop mode: an ensemble decodes
    each photo once for all of them. Rows scored by every recipe are compared.

    ``select_by(tasks, Y, probs)``, higher is better: :func:`neg_log_loss` by default. Selecting by the
    preset's objective itself (accuracy) over-fits the out-of-fold rows: by nested CV
    (``benchmarks/bench_blend.py``) the log-loss selection had fewer errors on clothing-small and
    fashion-products. The value returned is the preset's objective of the chosen blend
    (:func:`catalens.train.search.objective_value`: accuracy of class tasks, mAP of tags, their mean).
    """
    from catalens.train.search import objective_value

    if not done:
        return [], [], float("nan")
    rows = np.logical_and.reduce([s.scored for s in done])
    prep = done[0].prep
    Y = prep.select(rows)
    counts = {id(s): 0 for s in done}
    total: dict | None = None
    best_val, picks = -math.inf, 0
    for _ in range(rounds):
        cand = []
        for s in done:
            mix = {k: (total[k] if total else 0) + s.oof[k][rows] for k in s.oof}
            cand.append((select_by(prep.tasks, Y, {k: v / (picks + 1) for k, v in mix.items()}), -counts[id(s)],
                         s, mix))
        seconds = left()  # what the refit may take: members cost their refit once
        cand = [c for c in cand if not picks or refit_cost([x for x in done if counts[id(x)] or x is c[2]]) <= seconds]
        mode = next((crop_mode(x) for x in done if counts[id(x)]), None)
        cand = [c for c in cand if mode is None or crop_mode(c[2]) == mode]
        if not cand:
            break
        val, _, s, mix = max(cand, key=lambda c: (c[0], c[1]))
        if val <= best_val + 1e-9 and picks:
            break
        best_val, total, picks = val, mix, picks + 1
        counts[id(s)] += 1
    if not picks:
        return [], [], float("nan")
    chosen = [s for s in done if counts[id(s)]]
    value = objective_value(prep.tasks, Y, {k: v / picks for k, v in total.items()})
    return chosen, [float(counts[id(s)]) for s in chosen], value
