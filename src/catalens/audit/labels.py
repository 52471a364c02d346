"""``catalens audit DATA --labels``: rows whose label is probably wrong (confident learning).

1. **Out-of-fold probabilities** on cached embeddings: every labelled row of the catalogue (all
   splits) is predicted by a head that never saw it — products dealt into ``folds`` folds
   (:func:`catalens.train.kfold.product_folds`), each fold's head fit on the others with an
   inner validation part for early stopping and temperature scaling
   (:func:`catalens.train.kfold.fit_on`, as ``catalens train --folds`` does). Seconds on a
   cached catalogue.
2. **Confident learning** per class task decides *how many* rows are wrong, self-confidence
   *which*: cleanlab's ``find_label_issues(filter_by="low_self_confidence")`` when cleanlab is
   installed (the confident joint estimates the number of issues per class; the rows of
   lowest out-of-fold probability of their given label are flagged). Without cleanlab the
   same idea here: the count is the number of rows for which another class's out-of-fold
   probability reaches that class's own threshold (its mean probability over the rows
   labelled with it) and beats the given label's (:func:`confident_issues`), and the rows
   are the as many of lowest self-confidence. Measured (bench_label_issues): with 5% of
   clothing-small's labels flipped, cleanlab's default ``prune_by_noise_rate`` flags 309 rows
   (precision 0.43, recall 0.86), ``low_self_confidence`` 226 (0.62, 0.91).
3. Ranked most likely wrong first by ``score`` = 1 - the out-of-fold probability of the given
   label (self-confidence); ``suggested`` = the most probable class.

Written as ``REPORT/label_issues.csv`` (``path, task, given, suggested, score``, plus ``id`` and
``split``) and as a thumbnail section of ``audit.html``. Tags tasks are not audited here.
docs/benchmarks.md (bench_label_issues) measures precision and recall at N on clothing-small
with 5% of the training labels flipped.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from catalens.config import Config
from catalens.ingest.catalogue import Catalogue
from catalens.tasks import MISSING

_logger = logging.getLogger(__name__)

DEFAULT_FOLDS = 5
COLUMNS = ["path", "task", "given", "suggested", "score", "id", "split"]


def out_of_fold_probabilities(cat: Catalogue, cfg: Config, folds: int = DEFAULT_FOLDS, log=None):
    """``(prep, probs)``: the catalogue's features and labels (every label in it, all splits) and
    the out-of-fold probabilities of every usable row (zeros elsewhere)."""
    from catalens.embed.factory import backbone_from_config
    from catalens.embed.features import catalogue_features
    from catalens.train.kfold import Prepared, fit_on, fold_parts, pool_tasks, predict_rows, product_folds
    from catalens.tasks import labelled_rows

    log = log or _logger.info
    cfg = cfg.model_copy(deep=True)
    cfg.text.enabled = False  # images only: a title model would read the label off the title
    feats = catalogue_features(cat, backbone_from_config(cfg.backbone), cfg)
    tasks = [t for t in pool_tasks(cat) if t.kind == "class"]
    if not tasks:
        raise ValueError(f"'{cat.source}' has no class task to audit labels of; --labels checks class labels")
    Y = cat.encode(tasks)
    prep = Prepared(cat, tasks, Y, feats.features, labelled_rows(tasks, Y, feats.ok),
                    np.full(len(cat), None, dtype=object))
    fold = product_folds(cat, folds, cfg.seed)
    probs = {t.name: np.zeros((len(cat), t.n_outputs), np.float32) for t in tasks}
    for f, (train, inner, scored) in enumerate(fold_parts(prep, fold, folds, cfg)):
        if not scored.any() or not (train & prep.usable).any():
            continue
        fitted = fit_on(prep, train, inner, cfg)
        for name, p in predict_rows(prep, fitted, scored).items():
            probs[name][scored] = p
        log(f"audit labels: fold {f + 1}/{folds} scored {int(scored.sum())} rows")
    return prep, probs


def confident_issues(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """``(n,)`` bool: confident-learning label issues without cleanlab (see the module docstring)."""
    n, k = probs.shape
    thresholds = np.array([probs[labels == j, j].mean() if (labels == j).any() else 1.0 for j in range(k)])
    above = probs >= thresholds[None, :] - 1e-12
    above[np.arange(n), labels] = False
    masked = np.where(above, probs, -1.0)
    best = masked.argmax(1)
    return above.any(1) & (probs[np.arange(n), best] > probs[np.arange(n), labels])


def lowest_self_confidence(labels: np.ndarray, probs: np.ndarray, count: int) -> np.ndarray:
    """``(n,)`` bool: the ``count`` rows of lowest probability of their given label."""
    out = np.zeros(len(labels), dtype=bool)
    self_conf = probs[np.arange(len(labels)), labels]
    out[np.argsort(self_conf, kind="mergesort")[:count]] = True
    return out


def find_issues(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """``(n,)`` bool label issues: cleanlab's ``find_label_issues(filter_by="low_self_confidence")``
    when installed, else as many rows of lowest self-confidence as :func:`confident_issues` finds."""
    try:
        from cleanlab.filter import find_label_issues
    except ImportError:
        return lowest_self_confidence(labels, probs, int(confident_issues(labels, probs).sum()))
    p = np.clip(probs.astype(np.float64), 1e-12, None)
    return np.asarray(find_label_issues(labels, p / p.sum(1, keepdims=True), filter_by="low_self_confidence"),
                      dtype=bool)


def label_issues(prep, probs: dict[str, np.ndarray]) -> pd.DataFrame:
    """The flagged rows of every class task, most likely wrong first (``score`` descending)."""
    f = prep.cat.frame
    out = []
    for t in prep.tasks:
        y = prep.Y[t.name]
        rows = np.flatnonzero(prep.usable & (y != MISSING))
        if rows.size == 0:
            continue
        p, labels = probs[t.name][rows], y[rows]
        issue = find_issues(labels, p)
        names = np.asarray(t.classes, dtype=object)
        score = 1.0 - p[np.arange(len(rows)), labels]
        hit = np.flatnonzero(issue)
        out.append(pd.DataFrame({"path": f["path"].to_numpy(dtype=object)[rows[hit]], "task": t.name,
                                 "given": names[labels[hit]], "suggested": names[p[hit].argmax(1)],
                                 "score": score[hit].astype(np.float64),
                                 "id": f["id"].astype(str).to_numpy()[rows[hit]],
                                 "split": f["split"].to_numpy(dtype=object)[rows[hit]]}))
    if not out:
        return pd.DataFrame(columns=COLUMNS)
    df = pd.concat(out, ignore_index=True)
    return df.sort_values(["score", "task", "id"], ascending=[False, True, True], kind="mergesort",
                          ignore_index=True)[COLUMNS]


def audit_labels(cat: Catalogue, cfg: Config, folds: int = DEFAULT_FOLDS, log=None) -> pd.DataFrame:
    """Out-of-fold probabilities, then :func:`label_issues`."""
    log = log or _logger.info
    prep, probs = out_of_fold_probabilities(cat, cfg, folds, log)
    issues = label_issues(prep, probs)
    labelled = int(prep.usable.sum())
    log(f"audit labels: {len(issues)} likely wrong labels among {labelled} labelled photos "
        f"({'cleanlab' if _has_cleanlab() else 'confident learning'}; {folds} folds)")
    return issues


def _has_cleanlab() -> bool:
    try:
        import cleanlab  # noqa: F401
    except ImportError:
        return False
    return True
