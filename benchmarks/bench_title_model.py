"""The title model's settings, by 5-fold CV over fashion-products train + val, fused as the presets fuse it.

``text.C`` (30), the word n-grams (1-2) and the character n-grams (2-5) of the TF-IDF + logistic
regression title model (docs/recipes.md "Product titles fused with images"), and the Naive Bayes title
model, each scored alone and fused with the image recipe the fashion-with-titles preset runs chose
(Lite2@300, whole short side, ``multilevel``, ``logreg`` C 0.1 smoothing 0.1), on the presets' folds (split
by product; each fold's fusion weights chosen on its inner rows, as ``catalens train --folds`` does). The
image head is fitted once per fold and shared by the settings (it does not depend on them). Reported:
wrong answers per class level (argmax, and hierarchy-decoded as the presets decode), the pattern tags'
mean average precision, and the fused articleType answers' most frequent confusions with, for each, how
the *training* titles that name the true class are labelled (a dataset convention no title model can
learn against). The test split is never read.

    python benchmarks/bench_title_model.py [--settings C30 C100 ...] [--presets-cache] [--fresh]

``--presets-cache``: read the Lite2@300 features from the embedding cache of the last ``bench_presets``
fashion-image run (``runs/bench_presets/fashion-image/cache``, or ``runs/bench_presets_avx2/...`` on an
AVX2-only CPU); else this benchmark's own cache ``runs/bench_title_model/cache`` (embedding 5,289 photos
through Lite2@300: ~4 minutes on 2 cores). Results go to ``runs/bench_title_model/results.json`` (an
interrupted run resumes).
"""
from __future__ import annotations

import copy
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import ROOT, cached_cv_args, log, table, write_section  # noqa: E402

WORK = ROOT / "runs" / "bench_title_model"
RESULTS = WORK / "results.json"
DATA = ROOT / "examples" / "fashion-products.yaml"
PRESETS_CACHES = [ROOT / "runs" / name / "fashion-image" / "cache" for name in ("bench_presets", "bench_presets_avx2")]
FOLDS = 5
RECIPE = "lite2@300 crop 1 multilevel"
#: setting -> ``text`` overrides; the first is catalens's default
SETTINGS = {
    "C30": {}, "C10": {"C": 10.0}, "C100": {"C": 100.0}, "C300": {"C": 300.0},
    "no-char": {"char_ngram": None}, "char1-6": {"char_ngram": [1, 6]}, "word1-3": {"ngram": [1, 3]},
    "nb": {"model": "nb"},
}
LABEL = {"C30": "TF-IDF + logreg, C 30, words 1-2, characters 2-5 (default)", "C10": "C 10", "C100": "C 100",
         "C300": "C 300", "no-char": "no character n-grams", "char1-6": "characters 1-6", "word1-3": "words 1-3",
         "nb": "word counts + Naive Bayes (`text.model nb`)"}


def presets_cache() -> Path:
    """The first ``bench_presets`` fashion-image cache that exists (the plain one, else the AVX2-only one)."""
    return next((p for p in PRESETS_CACHES if p.exists()), PRESETS_CACHES[0])


def config(cache: Path, text: dict):
    """The presets' configuration of :data:`RECIPE`, titles on with ``text`` overrides."""
    from catalens.config import load_config
    from catalens.train.presets import candidate_recipes

    base = load_config(overrides=[{"tracking": False, "cache_dir": str(cache), "engine": {"progress": False},
                                   "text": {"enabled": True, **text}}])
    recipes = {r.name: r for r in candidate_recipes("best")}
    return recipes[RECIPE].config(base, recipes)


def image_heads(prep, parts, cfg) -> list[tuple[dict, dict]]:
    """Per fold: the image head's probabilities on its inner rows and on its held-out rows."""
    from catalens.heads import head_from_config

    out = []
    for train, inner, rows in parts:
        tr, va = train & prep.usable, inner & prep.usable
        head = head_from_config(cfg.head, copy.deepcopy(prep.tasks), cfg.seed)
        head.fit(prep.features[tr], prep.select(tr), prep.features[va], prep.select(va))
        out.append((head.predict_proba(prep.features[va]), head.predict_proba(prep.features[rows])))
    return out


def fused_out_of_fold(prep, parts, heads, cfg) -> tuple[dict, dict]:
    """Out-of-fold ``(fused, title-only)`` probabilities: each fold's title model fitted on its training
    titles, its fusion weights on its inner rows (:func:`catalens.text.fusion.fit_text_fusion`)."""
    import numpy as np

    from catalens.tasks import labelled_rows
    from catalens.text.fusion import fit_text_fusion

    n = len(prep.cat)
    fused = {t.name: np.full((n, t.n_outputs), np.nan, np.float32) for t in prep.tasks}
    title = {t.name: np.full((n, t.n_outputs), np.nan, np.float32) for t in prep.tasks}
    for (train, inner, rows), (p_inner, p_rows) in zip(parts, heads):
        va, fit_rows = inner & prep.usable, train & labelled_rows(prep.tasks, prep.Y)
        text = fit_text_fusion(copy.deepcopy(prep.tasks), prep.titles[fit_rows], prep.select(fit_rows),
                               prep.titles[va], prep.select(va), p_inner, cfg.text, log=lambda *_: None)
        for name, p in text.fuse(p_rows, prep.titles[rows]).items():
            fused[name][rows] = p
        for name, p in text.text_proba(list(prep.titles[rows])).items():   # a row without a title: the prior
            title[name][rows] = p
    return fused, title


def wrong_and_map(prep, probs: dict, rows, decided: dict | None = None) -> dict:
    """Wrong answers per class task (argmax, or ``decided``: bench_hierarchy_decoding's count) and mAP per
    tags task on ``rows``."""
    import numpy as np
    from sklearn.metrics import average_precision_score

    from bench_hierarchy_decoding import wrong

    out = wrong(prep, probs, rows, decided)
    for t in prep.tasks:
        if t.kind != "class":
            y, p = prep.Y[t.name][rows], probs[t.name][rows]
            aps = [average_precision_score(y[:, j][~np.isnan(y[:, j])], p[:, j][~np.isnan(y[:, j])])
                   for j in range(y.shape[1]) if np.nansum(y[:, j]) > 0]
            out[t.name] = round(float(np.mean(aps)), 4)
    return out


def confusions(prep, probs: dict, rows, decided: dict, task: str = "articleType", top: int = 6) -> list[dict]:
    """The most frequent (truth, answer) pairs of ``task``, each with how the training + val titles that
    end in the true class's name (e.g. "... Black Flats") are labelled."""
    import numpy as np

    t = next(t for t in prep.tasks if t.name == task)
    y = prep.Y[task]
    pred = decided[task] if task in decided else probs[task].argmax(1)
    bad = np.flatnonzero(rows & (y >= 0) & (pred != y))
    labels = prep.cat.frame[task].astype(str).to_numpy()
    titles = np.array(["" if s is None else str(s) for s in prep.titles])
    out = []
    for (truth, answer), count in Counter((t.classes[y[i]], t.classes[pred[i]]) for i in bad).most_common(top):
        named = np.array([bool(re.search(rf"\b{re.escape(truth)}\s*$", s, re.I)) for s in titles])
        out.append({"truth": truth, "answer": answer, "count": count,
                    "titles_naming_truth": dict(Counter(labels[named]).most_common(3))})
    return out


def measure(prep, parts, heads, scored, cache: Path, setting: str) -> dict:
    from catalens.train.kfold import decoded_out_of_fold

    cfg = config(cache, SETTINGS[setting])
    t = time.time()
    fused, title = fused_out_of_fold(prep, parts, heads, cfg)
    seconds = time.time() - t
    decided = decoded_out_of_fold(prep, fused, parts)
    return {"rows": int(scored.sum()), "title": wrong_and_map(prep, title, scored),
            "fused": wrong_and_map(prep, fused, scored), "decoded": wrong_and_map(prep, fused, scored, decided),
            "confusions": confusions(prep, fused, scored, decided), "seconds": round(seconds, 1)}


def report(res: dict) -> str:
    image = res.get("_image", {})
    keys = [k for k in SETTINGS if k in res]
    chain = ["masterCategory", "subCategory", "articleType"]
    rows = [["image head alone (Lite2@300)", *(image.get(c, "") for c in chain), "", image.get("pattern", ""), ""]]
    for k in keys:
        r = res[k]
        rows.append([LABEL[k], *(f"{r['title'][c]} / {r['fused'][c]}" for c in chain), r["decoded"]["articleType"],
                     f"{r['title']['pattern']} / {r['fused']['pattern']}", f"{r['seconds']:.0f}"])
    n = res[keys[0]]["rows"] if keys else 0
    conf = res[keys[0]]["confusions"] if keys else []
    conf_rows = [[c["truth"], c["answer"], c["count"],
                  ", ".join(f"{lab} {cnt}" for lab, cnt in c["titles_naming_truth"].items()) or "-"] for c in conf]
    return (table(["title model", *(f"{c} wrong: title alone / fused" for c in chain), "articleType wrong, fused "
                   "+ decoded", "pattern mAP: title / fused", "5 fits, s"], rows)
            + f"\n\n5-fold out-of-fold answers over fashion-products train + val ({n:,} photos; the presets' folds, "
            "split by product); the image head is the presets' Lite2@300 recipe (crop 1, multilevel, `logreg`), "
            "each fold's title model is fitted on its training titles and fused by the weights chosen on its "
            "inner rows. Test never read. One photo is 0.019 points of a level's accuracy. *5 fits*: the title "
            "models' fits and their fusion (one thread).\n\n"
            "The most frequent confusions of the default's fused (and decoded) articleType, with how the train + "
            "val titles that end in the true class's name are labelled:\n\n"
            + table(["true articleType", "answered", "photos", "titles ending in the true class's name are labelled"],
                    conf_rows))


def main() -> None:
    import numpy as np

    from catalens.train.kfold import fold_parts, prepare, product_folds

    args, res, command = cached_cv_args(__doc__, WORK, RESULTS, "settings", list(SETTINGS))
    cache = presets_cache() if args.presets_cache else WORK / "cache"
    cfg = config(cache, {})
    t = time.time()
    prep = prepare(DATA, cfg, log=lambda *a: None, classes_from="pool")
    parts = fold_parts(prep, product_folds(prep.cat, FOLDS, cfg.seed), FOLDS, cfg)
    heads = image_heads(prep, parts, cfg)
    log(f"{len(prep.cat)} photos x {prep.features.shape[1]} features, five image heads: {time.time() - t:.0f}s")
    scored = sum(p[2] for p in parts).astype(bool)
    image = {t_.name: np.full((len(prep.cat), t_.n_outputs), np.nan, np.float32) for t_ in prep.tasks}
    for (*_, rows), (_, p_rows) in zip(parts, heads):
        for name, p in p_rows.items():
            image[name][rows] = p
    res["_image"] = wrong_and_map(prep, image, scored)
    for setting in args.settings:
        if setting in res:
            continue
        res[setting] = measure(prep, parts, heads, scored, cache, setting)
        RESULTS.write_text(json.dumps(res, indent=1))
        log(f"{setting}: {res[setting]}")
    write_section("bench_title_model", "The title model's settings, fused with the image head (5-fold CV)",
                  report(res), command)


if __name__ == "__main__":
    main()
