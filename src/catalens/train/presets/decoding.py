"""Whether a preset's model decodes label paths (``preset.hierarchy_decoding``): the two out-of-fold
scores the decision compares, ``auto``'s rule, and the one line the log and the report show."""
from __future__ import annotations

import numpy as np


def decoding_scores(prep, probs: dict[str, np.ndarray], rows: np.ndarray,
                    parts: list) -> tuple[float, float, dict[str, np.ndarray]]:
    """The objective (:func:`catalens.train.search.objective_value`) of out-of-fold ``probs`` ``{task: (n, C)}``
    on ``rows``, by the per-level argmax and hierarchy-decoded (each part's held-out rows with the label paths
    of that part's training rows, :func:`catalens.train.kfold.decoded_out_of_fold`); and the decoded classes
    ``{task: (n,)}``. What ``preset.hierarchy_decoding: auto`` decides on (and ``bench_hierarchy_decoding``
    measures)."""
    from catalens.train.kfold import decoded_out_of_fold
    from catalens.train.search import objective_value

    decided = decoded_out_of_fold(prep, probs, [(tr, inner, held & rows) for tr, inner, held in parts])
    Y, at = prep.select(rows), {k: v[rows] for k, v in probs.items()}
    argmax = objective_value(prep.tasks, Y, at)
    decoded = objective_value(prep.tasks, Y, at, pred_index={k: v[rows] for k, v in decided.items()})
    return argmax, decoded, decided


def decoding_raises(argmax: float, decoded: float) -> bool:
    """``auto``'s rule: decode when that raises the out-of-fold objective (beyond float noise)."""
    return decoded > argmax + 1e-12


def decoding_summary(dec: dict) -> str:
    """One line for the preset's hierarchy decoding record (``model.json`` ``preset.hierarchy_decoding``),
    as the preset logs it and the evaluation report shows it."""
    line = f"{'on' if dec['chosen'] else 'off'} ({dec['mode']})"
    if "cv_decoded" in dec:
        line += f": CV {dec['cv_decoded']:.4f} decoded, {dec['cv_argmax']:.4f} per-level argmax"
    return line
