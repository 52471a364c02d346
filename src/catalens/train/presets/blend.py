"""Combining scored recipes: greedy forward selection with replacement over their out-of-fold
probabilities (Caruana et al., 2004), within what their refit may cost."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from catalens.train.presets.recipes import Scored, crop_mode


def greedy_blend(done: list[Scored], refit_cost: Callable[[list[Scored]], float], left: Callable[[], float],
                 rounds: int = 10, objective: Callable | None = None) -> tuple[list[Scored], list[float], float]:
    """The recipes to refit, their integer weights and the blend's out-of-fold objective.

    Starts from the best of ``done`` (recipes with out-of-fold probabilities) and adds whichever
    recipe, again or new, raises the objective of the averaged probabilities most; stops when
    nothing does, after ``rounds`` picks, or when no candidate's blend can be refitted in the
    seconds ``left()`` (``refit_cost(members)``). Members share one crop mode: an ensemble decodes
    each photo once for all of them. Rows scored by every recipe are compared. ``objective(tasks, Y,
    probs)``: higher is better; the preset's search objective by default
    (:func:`catalens.train.search.objective_value`: accuracy of class tasks, mAP of tags, their mean).
    """
    from catalens.train.search import objective_value

    objective = objective or objective_value
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
            cand.append((objective(prep.tasks, Y, {k: v / (picks + 1) for k, v in mix.items()}), -counts[id(s)],
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
    chosen = [s for s in done if counts[id(s)]]
    return chosen, [float(counts[id(s)]) for s in chosen], best_val
