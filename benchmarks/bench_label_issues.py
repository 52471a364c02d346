"""Label issues found by ``catalens audit --labels`` on real photos with planted label noise.

clothing-small's train split (3,068 photos, 10 classes) in memory, 5% of its labels flipped to
another class chosen at random (seeds 0, 1, 2); out-of-fold probabilities from 5 heads on cached
EfficientNet-Lite0 features (:func:`catalens.audit.labels.out_of_fold_probabilities`), then:

- **shipped**: the flagged rows of :func:`catalens.audit.labels.label_issues` (cleanlab's
  ``find_label_issues`` when installed), ranked by score;
- **confident learning without cleanlab**: :func:`catalens.audit.labels.confident_issues`;
- **plain self-confidence**: every row ranked by the out-of-fold probability of its given label.

Precision and recall at N (N = the number of flipped labels, so they are equal there) of the
ranking, and precision / recall of the flagged set itself. The folder's own labels are not
clean (about 0.7% disputed): a "false" hit may be a real mistake of the data set.

    python benchmarks/bench_label_issues.py [--no-write]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _report import SHARED_DATA, publish, table  # noqa: E402

DATA = SHARED_DATA / "clothing-small"
SHARE = 0.05


def flipped_catalogue(seed: int):
    from catalens.ingest.open import open_catalogue

    cat = open_catalogue(DATA)
    cat = cat.subset((cat.frame["split"] == "train").to_numpy())
    task = cat.tasks[0].name
    classes = sorted(cat.frame[task].unique())
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(cat), int(round(SHARE * len(cat))), replace=False)
    labels = cat.frame[task].to_numpy(dtype=object).copy()
    for r in rows:
        labels[r] = rng.choice([c for c in classes if c != labels[r]])
    cat.frame[task] = labels
    return cat, task, rows


def at_n(ranked_rows: np.ndarray, flipped: set, n: int) -> float:
    return len(set(ranked_rows[:n].tolist()) & flipped) / n


def one_seed(seed: int) -> dict:
    from catalens.audit.labels import (confident_issues, find_issues, lowest_self_confidence,
                                       out_of_fold_probabilities)
    from catalens.config import Config

    cfg = Config()
    cfg.engine.progress = False
    cat, task, rows = flipped_catalogue(seed)
    t0 = time.time()
    prep, probs = out_of_fold_probabilities(cat, cfg, 5, log=lambda *_: None)
    oof_s = time.time() - t0
    y, p = prep.Y[task], probs[task]
    use = np.flatnonzero(prep.usable & (y >= 0))
    y, p = y[use], p[use]
    flipped = set(np.flatnonzero(np.isin(use, rows)).tolist())
    n = len(flipped)
    self_conf = p[np.arange(len(y)), y]
    order_all = np.argsort(self_conf, kind="mergesort")
    out = {"n": n, "oof_s": oof_s}
    variants = [("shipped", find_issues(y, p)),
                ("fallback", lowest_self_confidence(y, p, int(confident_issues(y, p).sum())))]
    try:
        from cleanlab.filter import find_label_issues

        q = p.astype(np.float64) / p.astype(np.float64).sum(1, keepdims=True)
        variants.append(("cl_default", find_label_issues(y, q)))
    except ImportError:
        pass
    for name, mask in variants:
        flagged = np.flatnonzero(mask)
        ranked = flagged[np.argsort(self_conf[flagged], kind="mergesort")]
        hits = len(set(flagged.tolist()) & flipped)
        out[name] = (at_n(ranked, flipped, n), len(flagged), hits / max(len(flagged), 1), hits / n)
    out["self"] = (at_n(order_all, flipped, n), None, None, None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if not DATA.exists():
        sys.exit(f"benchmark photos not found at {DATA}")
    try:
        import cleanlab
        shipped = f"cleanlab {cleanlab.__version__} find_label_issues, filter_by=low_self_confidence"
    except ImportError:
        shipped = "confident learning (cleanlab not installed)"
    runs = [one_seed(s) for s in (0, 1, 2)]
    names = {"shipped": f"shipped: {shipped}", "fallback": "without cleanlab: confident-learning count, "
                                                         "lowest self-confidence",
             "cl_default": "cleanlab's default filter (prune_by_noise_rate)",
             "self": "plain out-of-fold self-confidence (every row ranked)"}
    rows = []
    for key, label in names.items():
        if key not in runs[0]:
            continue
        at = np.mean([r[key][0] for r in runs])
        if key == "self":
            rows.append([label, f"{at:.3f}", "–", "–", "–"])
        else:
            rows.append([label, f"{at:.3f}", f"{np.mean([r[key][1] for r in runs]):.0f}",
                         f"{np.mean([r[key][2] for r in runs]):.3f}", f"{np.mean([r[key][3] for r in runs]):.3f}"])
    body = (f"clothing-small train split, {runs[0]['n']} of 3,068 labels (5%) flipped, mean of seeds 0, 1, 2; "
            f"5 out-of-fold heads on cached features: {np.mean([r['oof_s'] for r in runs]):.1f} s per run.\n\n"
            + table(["ranking", "precision = recall at N", "flagged rows", "precision of flagged",
                     "recall of flagged"], rows)
            + "\n\nThe flagged rows are ranked by self-confidence, so at N the shipped list equals the plain "
              "ranking; confident learning adds where to stop (how many rows to review). Tried without gain "
              "(precision at N, 3 seeds): 10 folds 0.813-0.819, label smoothing 0.2 0.802, an MLP head 0.804, "
              "cleanlab's normalized margin 0.684 / confidence-weighted entropy 0.784, kNN label agreement "
              "0.623, pruning the flagged rows and re-fitting 0.815-0.826: the frozen features are the limit.")
    publish("bench_label_issues", "Label issues: flipped labels found by catalens audit --labels", body,
            write=not args.no_write)


if __name__ == "__main__":
    main()
