"""Does an ensemble's shared decode cost its single-backbone members accuracy? 5-fold CV over train + val.

An ensemble (``catalens ensemble``, a preset's blend) decodes each photo once, at the widest member's
preprocessing, and resizes it to each member's side (:func:`catalens.embed.multi.shared_preprocess`,
bilinear). A single-backbone member was fitted on features of its own decode (Pillow, bicubic, at its
own side), so inside the ensemble it predicts from slightly different features. Here, for Lite0@256,
Lite1@272 and Lite2@300 (crop 1, multilevel, the presets' ``logreg`` head) and their equal-weight
mean (what a preset's blend of the three singles predicts), the out-of-fold wrong answers of the main
task when each head is:

- fitted and predicting on its own decode (what the preset's CV scores);
- fitted on its own decode, predicting from the ensemble's decode (what such an ensemble does);
- fitted and predicting on the ensemble's decode (what refitting the members on the ensemble's
  decode would give).

The ensemble's decode of the three members is the three backbones side by side
(``lite0@256+lite1@272+lite2@300``): the same shared preprocessing (checked below), so its blocks
are each member's features inside the ensemble. Folds by product as in the presets; the test split
is never read.

    python benchmarks/bench_ensemble_decode.py [--only clothing fashion] [--presets-cache] [--fresh]

``--presets-cache``: read the features from the last ``bench_presets`` runs' embedding caches.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import ROOT, cached_cv_args, log, table, write_section  # noqa: E402
from bench_blend import DATASETS, MAIN_TASK, PRESETS_CACHE, THREE, config  # noqa: E402

WORK = ROOT / "runs" / "bench_ensemble_decode"
RESULTS = WORK / "results.json"
FOLDS = 5
SINGLES = ("efficientnet_lite0@256", "efficientnet_lite1@272", "efficientnet_lite2@300")
WAYS = ("own -> own (the CV)", "own -> ensemble (the ensemble now)", "ensemble -> ensemble")


def check_same_decode() -> None:
    """The ensemble of the three singles decodes as the three side by side do (else this measures nothing)."""
    from catalens.embed.factory import backbone_from_config
    from catalens.embed.multi import shared_preprocess

    pres = [backbone_from_config(config(WORK, b, {}).backbone).preprocess for b in SINGLES]
    ens, _ = shared_preprocess(pres)
    three = backbone_from_config(config(WORK, THREE, {}).backbone).preprocess
    if ens.to_dict() != three.to_dict():
        raise SystemExit(f"the ensemble decodes {ens.to_dict()}, the three side by side {three.to_dict()}")


def measure(name: str, cache: Path) -> dict:
    """Wrong answers of the main task per single and for their mean, each way; mean feature difference."""
    from catalens.train import kfold as K
    from catalens.train.presets import LOGREG

    quiet = lambda *a: None  # noqa: E731
    cfg = config(cache, THREE, dict(LOGREG))
    three = K.prepare(DATASETS[name], cfg, log=quiet, classes_from="pool")
    parts = K.fold_parts(three, K.product_folds(three.cat, FOLDS, cfg.seed), FOLDS, cfg)
    task, y = MAIN_TASK[name], three.Y[MAIN_TASK[name]]
    out, probs, start = {"n": 0, "singles": {}}, {w: [] for w in WAYS}, 0
    for b in SINGLES:
        t = time.time()
        own = K.prepare(DATASETS[name], config(cache, b, dict(LOGREG)), log=quiet, classes_from="pool")
        if list(own.cat.frame["path"]) != list(three.cat.frame["path"]):
            raise SystemExit(f"{name}: {b} and the three side by side list different photos")
        d = own.features.shape[1]
        ens = replace(own, features=three.features[:, start:start + d])
        start += d
        ways = {WAYS[0]: K.out_of_fold(own, parts, cfg), WAYS[1]: K.out_of_fold(own, parts, cfg, predict_from=ens),
                WAYS[2]: K.out_of_fold(ens, parts, cfg)}
        rows = ways[WAYS[0]][1] & (y >= 0)
        out["n"] = int(rows.sum())
        out["singles"][b] = {w: int((p[task][rows].argmax(1) != y[rows]).sum()) for w, (p, _) in ways.items()}
        out["singles"][b]["difference"] = float(np.abs(own.features - ens.features).mean()
                                                / np.abs(own.features).mean())
        for w, (p, _) in ways.items():
            probs[w].append(np.where(rows[:, None], p[task], 0))
        log(f"{name} {b}: {out['singles'][b]} ({time.time() - t:.0f}s)")
    out["mean"] = {w: int((sum(ps)[rows].argmax(1) != y[rows]).sum()) for w, ps in probs.items()}
    return out


def report(res: dict) -> str:
    rows = []
    for name, r in res.items():
        for b, v in r["singles"].items():
            rows.append([name, b.replace("efficientnet_", ""), f"{v['difference']:.1%}"] + [v[w] for w in WAYS])
        rows.append([name, "mean of the three (a blend)", ""] + [r["mean"][w] for w in WAYS])
    n = ", ".join(f"{name} {r['n']:,}" for name, r in res.items())
    return (table(["data", "member", "feature difference"] + [f"wrong: fitted {w}" for w in WAYS], rows)
            + f"\n\nOut-of-fold wrong answers of the main task (clothing `label`, fashion-products `articleType`) of "
            f"{n} train + val photos, 5 folds by product, `logreg` C 0.1 smoothing 0.1 on multilevel features, crop 1. "
            "*own*: features of the member's own decode; *ensemble*: its block of the three backbones side by side, "
            "which an ensemble of the three singles computes (the same shared preprocessing, checked). *Feature "
            "difference*: mean absolute difference over mean magnitude. Lite2@300 is the widest member, so its "
            "input is the same either way. One photo is 0.03 points on clothing, 0.02 on fashion-products.")


def main() -> None:
    args, res, command = cached_cv_args(__doc__, WORK, RESULTS, "only", list(DATASETS))
    check_same_decode()
    for name in args.only:
        cache = PRESETS_CACHE[name] if args.presets_cache else WORK / "cache"
        res[name] = measure(name, cache)
        RESULTS.write_text(json.dumps(res, indent=1))
    write_section("bench_ensemble_decode", "An ensemble's shared decode and its single-backbone members",
                  report(res), command)


if __name__ == "__main__":
    main()
