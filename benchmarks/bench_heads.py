"""The head on frozen features: the AdamW-trained linear head against logistic regression fitted
by L-BFGS (``head.type logreg``), each also refitted on train + val (``data.refit_full``), scored by
5-fold cross-validation over train + val on clothing-small and fashion-products (image only).

Features: the presets' frozen backbones (Lite0@256, Lite1@272, Lite2@300, whole short side,
``multilevel`` pooling) and the three side by side, embedded through the catalens engine into
``bench_pooling``'s cache (shared, so neither benchmark embeds twice). Each head is fitted as
``catalens train --folds 5`` does (split by product; each fold's inner part of its training
products stops the AdamW head early and calibrates both). The score is the out-of-fold accuracy
per class task, the number the presets rank recipes by. The test split is never read: this is
how the presets' head was chosen (``C`` from 0.03 / 0.1 / 0.3 by an earlier run of the same
protocol: docs/recipes.md). Results go to ``runs/bench_heads/results.json``
(an interrupted run resumes; ``--fresh`` starts over).

    python benchmarks/bench_heads.py [--only clothing fashion] [--fresh]
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import ROOT, log, table, write_section  # noqa: E402
from bench_pooling import (BACKBONES, DATASETS, _save, compare_rows, config, cv_scores,  # noqa: E402
                           resumable_main)

WORK = ROOT / "runs" / "bench_heads"
RESULTS = WORK / "results.json"
#: name -> head settings over the config's defaults
HEADS = {"linear (AdamW, default)": {},
         "logreg C=0.1": {"type": "logreg", "C": 0.1},
         "linear (AdamW), refit_full": {"refit": True},
         "logreg C=0.1, refit_full": {"type": "logreg", "C": 0.1, "refit": True}}
BASE = "linear (AdamW, default)"


def with_head(cfg, head: dict):
    c = cfg.model_copy(deep=True)
    c.head = type(c.head).model_validate({**c.head.model_dump(), **{k: v for k, v in head.items() if k != "refit"}})
    return c


def cv_scores_refit(prep, cfg) -> dict[str, float]:
    """``cv_scores`` with ``data.refit_full``: each fold's head, once fitted (and calibrated) as
    ``catalens train`` does, is fitted again on the fold's training and inner photos together."""
    import numpy as np

    from bench_pooling import FOLDS
    from catalens.train.kfold import fit_on, fold_parts, predict_rows, product_folds
    from catalens.train.search import objective_value

    n = len(prep.cat)
    oof = {t.name: np.full((n, t.n_outputs), np.nan, np.float32) for t in prep.tasks}
    scored = np.zeros(n, bool)
    for train, inner, rows in fold_parts(prep, product_folds(prep.cat, FOLDS, cfg.seed), FOLDS, cfg):
        fitted = fit_on(prep, train, inner, cfg)
        both = (train | inner) & prep.usable
        fitted.head.refit(prep.features[both], prep.select(both))
        for name, p in predict_rows(prep, fitted, rows).items():
            oof[name][rows] = p
        scored |= rows
    Y, probs = prep.select(scored), {k: v[scored] for k, v in oof.items()}
    return {t.name: float(objective_value(prep.tasks, Y, probs, t.name)) for t in prep.tasks if t.kind == "class"}


def run_dataset(name: str, res: dict) -> None:
    from dataclasses import replace

    import numpy as np

    from catalens.train.kfold import prepare

    data, _ = DATASETS[name]
    preps = {}
    for spec in BACKBONES:
        preps[spec] = prepare(data, config(spec, "multilevel"), log=lambda *a: None, classes_from="pool")
    first = preps[BACKBONES[0]]
    preps["concat"] = replace(first, features=np.hstack([p.features for p in preps.values()]),
                              usable=np.logical_and.reduce([p.usable for p in preps.values()]))
    for spec, prep in preps.items():
        for head_name, head in HEADS.items():
            key = f"{name}|{spec}|{head_name}"
            if key not in res:
                t = time.time()
                cfg = with_head(config(BACKBONES[0] if spec == "concat" else spec, "multilevel"), head)
                score = cv_scores_refit if head.get("refit") else cv_scores
                res[key] = {"scores": score(prep, cfg), "dim": int(prep.features.shape[1]),
                            "fit_s": round(time.time() - t, 1)}
                _save(res, RESULTS)
            log(f"{key}: {res[key]}")


def report(res: dict) -> None:
    rows = compare_rows(res, HEADS, BASE, extra=lambda r: [f"{r['fit_s']:.1f}"])
    body = table(["data", "features (crop 1, multilevel)", "head", "dim", "CV accuracy (label / articleType)",
                  "points vs linear (per task)", "CV subCategory", "5 folds, s"], rows)
    body += ("\n\n5-fold out-of-fold accuracy over train + val (clothing-small 3,409 photos, 10 classes; "
             "fashion-products 5,289 photos, image only), each head fitted as `catalens train --folds 5` does; "
             "test never read. One run each: on clothing one photo is 0.03 points. Seconds: the five fits (AdamW heads "
             "run on one thread, L-BFGS on all). `logreg` with `C` 0.1 is what the `medium`/`best` presets fit on frozen "
             "features (docs/presets.md). *refit_full*: each fold's head, fitted and calibrated as above, is then fitted "
             "again on the fold's training and inner photos together (`data.refit_full`: the AdamW head for the epoch "
             "count its early stopping chose, `logreg` to convergence); the presets refit their chosen `logreg` "
             "recipes (seconds: both fits).")
    write_section("bench_heads", "The head on frozen features: AdamW linear vs logistic regression, and refit on train + val (5-fold CV)", body)


def main() -> None:
    resumable_main(__doc__, WORK, RESULTS, run_dataset, report, "forget earlier results (the features stay cached)")


if __name__ == "__main__":
    main()
