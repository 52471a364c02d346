"""Hierarchy decoding of the presets' recipes, by 5-fold CV over fashion-products train + val.

``catalens train --preset best`` decides ``hierarchy_decoding`` (``preset.hierarchy_decoding: auto``)
on the chosen blend's out-of-fold probabilities: each fold's held-out rows are decoded to the most
probable label path among the paths of that fold's training rows, and decoding is kept when that
raises the presets' objective (the mean over tasks of accuracy, tags: mean average precision). This
benchmark makes that comparison for the recipes the fashion runs chose, image only and with titles
(each fold's title model fused, fitted once per fold and shared by the recipes, as the presets do):
wrong answers per level with the per-level argmax and decoded, and the objective both ways. Each
recipe is configured by ``catalens.train.presets.candidate_recipes`` (``logreg`` C 0.1, smoothing
0.1, crop 1, ``multilevel``), fitted on the presets' folds (split by product, early stopping on an
inner part). The test split is never read.

    python benchmarks/bench_hierarchy_decoding.py [--recipes lite2 three] [--presets-cache] [--fresh]

``--presets-cache``: read the features from the embedding cache of the last ``bench_presets``
fashion-image run (``runs/bench_presets/fashion-image/cache``: a run that refitted the three backbones
side by side holds them); else this benchmark's own cache ``runs/bench_hierarchy_decoding/cache``
(embedding 5,289 photos through the three backbones: ~10 minutes on 2 cores). The three backbones are
embedded through the multi-backbone, as their refit is; the presets score them on the members'
separately cached features (docs/presets.md). Results go to ``runs/bench_hierarchy_decoding/results.json``
(an interrupted run resumes).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import ROOT, cached_cv_args, log, table, write_section  # noqa: E402

WORK = ROOT / "runs" / "bench_hierarchy_decoding"
RESULTS = WORK / "results.json"
DATA = ROOT / "examples" / "fashion-products.yaml"
PRESETS_CACHE = ROOT / "runs" / "bench_presets" / "fashion-image" / "cache"
FOLDS = 5
#: short name -> the presets' recipe
RECIPES = {"lite2": "lite2@300 crop 1 multilevel",
           "three": "lite0@256+lite1@272+lite2@300 crop 1 multilevel"}


def recipe_config(recipe: str, cache: Path, titles: bool):
    """The configuration the presets score ``recipe`` with (``catalens.train.presets``)."""
    from catalens.config import load_config
    from catalens.train.presets import candidate_recipes

    base = load_config(overrides=[{"tracking": False, "cache_dir": str(cache), "engine": {"progress": False},
                                   "text": {"enabled": titles}}])
    recipes = {r.name: r for r in candidate_recipes("best")}
    return recipes[recipe].config(base, recipes)


def wrong(prep, probs: dict, rows, pred_index: dict | None = None) -> dict[str, int]:
    """Wrong answers per class task on labelled ``rows`` (argmax, or ``pred_index`` where given)."""
    import numpy as np

    from catalens.tasks import MISSING

    out = {}
    for t in prep.tasks:
        if t.kind != "class":
            continue
        y = prep.Y[t.name][rows]
        pred = pred_index[t.name][rows] if pred_index and t.name in pred_index else probs[t.name][rows].argmax(1)
        known = y != MISSING
        out[t.name] = int(np.sum(pred[known] != y[known]))
    return out


def measure(recipe: str, cache: Path, titles: bool, title_models) -> dict:
    """Out-of-fold probabilities of ``recipe`` on the presets' folds; the decision's two numbers."""
    from catalens.tasks import hierarchy_levels
    from catalens.train.kfold import fold_parts, out_of_fold, prepare, product_folds
    from catalens.train.presets import decoding_scores

    cfg = recipe_config(recipe, cache, titles)
    prep = prepare(DATA, cfg, log=lambda *a: None, classes_from="pool")
    parts = fold_parts(prep, product_folds(prep.cat, FOLDS, cfg.seed), FOLDS, cfg)
    t = time.time()
    oof, rows = out_of_fold(prep, parts, cfg, titles=title_models if titles else None)
    seconds = time.time() - t
    argmax, decoded, decided = decoding_scores(prep, oof, rows, parts)
    return {"chain": hierarchy_levels(prep.tasks)[0], "rows": int(rows.sum()), "features": prep.features.shape[1],
            "wrong_argmax": wrong(prep, oof, rows), "wrong_decoded": wrong(prep, oof, rows, decided),
            "cv_argmax": argmax, "cv_decoded": decoded, "seconds": round(seconds, 1)}


def report(res: dict) -> str:
    from catalens.train.presets import decoding_raises

    rows = []
    for key, r in res.items():
        recipe, titles = key.split("|")
        a, d = r["wrong_argmax"], r["wrong_decoded"]
        rows.append([RECIPES[recipe], titles, *(f"{a[n]} -> {d[n]}" for n in r["chain"]),
                     f"{r['cv_argmax']:.5f}", f"{r['cv_decoded']:.5f}",
                     "on" if decoding_raises(r["cv_argmax"], r["cv_decoded"]) else "off",
                     f"{r['seconds']:.0f}"])
    chain = next(iter(res.values()))["chain"] if res else ["level"]
    n = next(iter(res.values()))["rows"] if res else 0
    return (table(["recipe (`logreg`)", "titles", *(f"{c} wrong: argmax -> decoded" for c in chain),
                   "CV argmax", "CV decoded", "`auto` chooses", "5 fits, s"], rows)
            + f"\n\n5-fold out-of-fold predictions over fashion-products train + val ({n:,} photos; the presets' "
            "folds, split by product), each recipe as the presets configure it; with titles each fold's title "
            "model (TF-IDF + logistic regression) is fused by the weights chosen on that fold's inner rows. "
            "Decoded: each fold's held-out rows decoded to the most probable of the label paths of that fold's "
            "training rows (`catalens.train.kfold.decoded_out_of_fold`, what `preset.hierarchy_decoding: auto` "
            "compares). CV: the presets' objective, the mean over the four tasks (three class levels' accuracy, "
            "the pattern tags' mean average precision, which decoding leaves alone). Test never read. "
            "One photo is 0.019 points of a level's accuracy. *5 fits*: the five head fits and their fusion; the "
            "first recipe run with titles also fits the five title models, which the others reuse.")


def main() -> None:
    from catalens.train.kfold import TitleModels

    args, res, command = cached_cv_args(__doc__, WORK, RESULTS, "recipes", list(RECIPES))
    cache = PRESETS_CACHE if args.presets_cache else WORK / "cache"
    title_models = TitleModels()   # one per fold, shared by the recipes (the presets' reuse)
    for recipe in args.recipes:
        for titles in ("off", "on"):
            key = f"{recipe}|{titles}"
            if key in res:
                continue
            res[key] = measure(RECIPES[recipe], cache, titles == "on", title_models)
            RESULTS.write_text(json.dumps(res, indent=1))
            log(f"{key}: {res[key]}")
    write_section("bench_hierarchy_decoding", "Hierarchy decoding of the presets' recipes (5-fold CV)",
                  report(res), command)


if __name__ == "__main__":
    main()
