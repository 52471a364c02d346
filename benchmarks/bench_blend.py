"""Is the presets' blend worth it out of sample? Nested CV of the greedy blend over train + val.

The preset (``--preset best``) picks its blend by greedy forward selection with replacement
(:func:`catalens.train.presets.blend.greedy_blend`, by log-loss) on the recipes' out-of-fold
probabilities, and reports the blend's accuracy on the same predictions: an optimistic number. Here the choice is made
one level deeper: for each of the 5 folds, the blend (or the best single recipe) is chosen on the
out-of-fold rows of the other four and counted on this fold's rows. Compared: the best single
recipe, the preset's greedy blend (selected by log-loss), the same selection by accuracy, and every recipe
averaged with equal weights. The recipes are the preset's frozen ones (``LOGREG`` head) and the
search's first heads (``SEARCH_FIRST``) on the three backbones side by side; folds by product as in
the presets. The test split is never read.

    python benchmarks/bench_blend.py [--only clothing fashion] [--presets-cache] [--fresh]

``--presets-cache``: read the features from the last ``bench_presets`` runs' embedding caches
(``runs/bench_presets/{clothing,fashion-image}/cache``). Out-of-fold probabilities are kept in
``runs/bench_blend/`` (an interrupted run resumes).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import ROOT, SHARED_DATA, cached_cv_args, log, table, write_section  # noqa: E402

WORK = ROOT / "runs" / "bench_blend"
RESULTS = WORK / "results.json"
FOLDS = 5
DATASETS = {"clothing": SHARED_DATA / "clothing-small", "fashion": ROOT / "examples" / "fashion-products.yaml"}
MAIN_TASK = {"clothing": "label", "fashion": "articleType"}
PRESETS_CACHE = {"clothing": ROOT / "runs" / "bench_presets" / "clothing" / "cache",
                 "fashion": ROOT / "runs" / "bench_presets" / "fashion-image" / "cache"}
THREE = "efficientnet_lite0@256+efficientnet_lite1@272+efficientnet_lite2@300"
BACKBONES = ("efficientnet_lite1@272", "efficientnet_lite0@256", "efficientnet_lite2@300", THREE,
             "efficientnet_lite0@256+efficientnet_lite1@272")


def recipes() -> dict[str, tuple[str, dict]]:
    """name -> (backbone spec, head settings): the preset's frozen recipes and its search's first heads."""
    from catalens.train.presets import LOGREG, SEARCH_FIRST

    out = {b.replace("efficientnet_", ""): (b, dict(LOGREG)) for b in BACKBONES}
    for head in SEARCH_FIRST:
        out[f"three, {head['type']} {'C ' + str(head['C']) if 'C' in head else head.get('hidden', '')}"] = (THREE, head)
    return out


def config(cache: Path, backbone: str, head: dict):
    from catalens.config import load_config

    return load_config(overrides=[{"tracking": False, "cache_dir": str(cache), "text": {"enabled": False},
                                   "engine": {"progress": False},
                                   "backbone": {"name": backbone, "crop_pct": 1.0, "pool": "multilevel"},
                                   "head": head}])


def out_of_fold(name: str, cache: Path) -> dict:
    """Each recipe's out-of-fold probabilities of the main task (kept in WORK/<data>/<recipe>.npz)."""
    from catalens.train import kfold as K

    out = {}
    for rname, (backbone, head) in recipes().items():
        path = WORK / name / f"{rname.replace(' ', '_').replace(',', '')}.npz"
        if not path.exists():
            t = time.time()
            cfg = config(cache, backbone, head)
            prep = K.prepare(DATASETS[name], cfg, log=lambda *a: None, classes_from="pool")
            fold = K.product_folds(prep.cat, FOLDS, cfg.seed)
            probs, scored = K.out_of_fold(prep, K.fold_parts(prep, fold, FOLDS, cfg), cfg)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, p=probs[MAIN_TASK[name]], y=prep.Y[MAIN_TASK[name]], fold=fold, scored=scored)
            tmp.replace(path)
            log(f"{name}: {rname} out of fold in {time.time() - t:.0f}s")
        out[rname] = dict(np.load(path))
    return out


def _acc(p: np.ndarray, y: np.ndarray, rows: np.ndarray) -> float:
    return float((p[rows].argmax(1) == y[rows]).mean())


def library_blend(P: dict, y: np.ndarray, rows: np.ndarray, by_accuracy: bool = False) -> np.ndarray:
    """The preset's :func:`greedy_blend` chosen on ``rows`` (by its own criterion, log-loss, or by the accuracy
    it reports), the blend's averaged probabilities over every row."""
    from catalens.tasks import TaskInfo
    from catalens.train.presets.blend import greedy_blend
    from catalens.train.presets.recipes import Recipe, Scored
    from catalens.train.search import objective_value

    class _Prep:  # what greedy_blend reads of a prepared data set
        tasks = [TaskInfo("label", "class", [str(i) for i in range(next(iter(P.values())).shape[1])])]

        @staticmethod
        def select(mask):
            return {"label": y[mask]}

    cfg = config(WORK, THREE, {})
    done = [Scored(Recipe(k), oof={"label": p}, prep=_Prep(), cfg=cfg, scored=rows) for k, p in P.items()]
    kw = {"select_by": objective_value} if by_accuracy else {}
    chosen, weights, _ = greedy_blend(done, lambda members: 0.0, lambda: float("inf"), **kw)
    return sum(w * s.oof["label"] for s, w in zip(chosen, weights)) / sum(weights)


def nested(oofs: dict) -> dict:
    """Wrong answers per way of choosing, counted on rows held out of the choice; and in-sample."""
    first = next(iter(oofs.values()))
    y, fold = first["y"], first["fold"]
    rows = np.logical_and.reduce([o["scored"] for o in oofs.values()]) & (y >= 0)
    P = {k: np.nan_to_num(o["p"]) for k, o in oofs.items()}
    ways = {
        "best single": lambda r: P[max(P, key=lambda k: _acc(P[k], y, r))],
        "greedy blend, accuracy": lambda r: library_blend(P, y, r, by_accuracy=True),
        "greedy blend, log-loss (the preset's)": lambda r: library_blend(P, y, r),
        "all recipes, equal weights": lambda r: sum(P.values()) / len(P),
    }
    out = {}
    for way, choose in ways.items():
        wrong = 0
        for f in np.unique(fold[rows]):
            held = rows & (fold == f)
            p = choose(rows & (fold != f))
            wrong += int((p[held].argmax(1) != y[held]).sum())
        out[way] = {"nested_wrong": wrong, "n": int(rows.sum()), "in_sample": _acc(choose(rows), y, rows)}
    out["singles"] = {k: _acc(p, y, rows) for k, p in P.items()}
    return out


def report(res: dict) -> str:
    lines = []
    for name, r in res.items():
        n = next(v["n"] for k, v in r.items() if k != "singles")
        rows = [[name, way, f"{v['in_sample']:.4f}", f"{1 - v['nested_wrong'] / n:.4f}", f"{v['nested_wrong']} of {n}"]
                for way, v in r.items() if way != "singles"]
        lines.append(table(["data", "chosen by", "out-of-fold accuracy, chosen on the same rows (what the preset "
                            "reports)", "nested: chosen on 4 folds, counted on the 5th", "wrong (nested)"], rows))
        lines.append("Recipes (out-of-fold accuracy of the main task): "
                     + "; ".join(f"{k} {v:.4f}" for k, v in r["singles"].items()) + ".")
    return ("\n\n".join(lines) + "\n\n5-fold out-of-fold probabilities over train + val (folds by product, as the presets), "
            "crop 1, multilevel pooling; accuracy of the main task (clothing `label`, fashion-products `articleType`). "
            "The preset's blend is what `greedy_blend` chooses, here on the main task alone (the preset scores the "
            "mean over the tasks); one photo is 0.03 points on clothing's 3,409, 0.02 on fashion's 5,289.")


def main() -> None:
    args, res, command = cached_cv_args(__doc__, WORK, RESULTS, "only", list(DATASETS))
    for name in args.only:
        oofs = out_of_fold(name, PRESETS_CACHE[name] if args.presets_cache else WORK / "cache")
        res[name] = nested(oofs)
        RESULTS.write_text(json.dumps(res, indent=1))
        log(f"{name}: {res[name]}")
    write_section("bench_blend", "The presets' blend, nested: is its CV honest, is blending worth it",
                  report(res), command)


if __name__ == "__main__":
    main()
