"""The head on frozen features: the AdamW-trained linear head against logistic regression fitted
by L-BFGS (``head.type logreg``), scored by 5-fold cross-validation over train + val on
clothing-small and fashion-products (image only).

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

from _report import ROOT, table, write_section  # noqa: E402
from bench_pooling import (BACKBONES, DATASETS, _save, compare_rows, config, cv_scores,  # noqa: E402
                           resumable_main)

WORK = ROOT / "runs" / "bench_heads"
RESULTS = WORK / "results.json"
#: name -> head settings over the config's defaults
HEADS = {"linear (AdamW, default)": {},
         "logreg C=0.1": {"type": "logreg", "C": 0.1}}
BASE = "linear (AdamW, default)"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def with_head(cfg, head: dict):
    c = cfg.model_copy(deep=True)
    c.head = type(c.head).model_validate({**c.head.model_dump(), **head})
    return c


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
                res[key] = {"scores": cv_scores(prep, cfg), "dim": int(prep.features.shape[1]),
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
             "features (docs/presets.md).")
    write_section("bench_heads", "The head on frozen features: AdamW linear vs logistic regression (5-fold CV)", body)


def main() -> None:
    resumable_main(__doc__, WORK, RESULTS, run_dataset, report, "forget earlier results (the features stay cached)")


if __name__ == "__main__":
    main()
