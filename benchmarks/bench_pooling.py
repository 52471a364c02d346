"""How the backbone's feature map becomes the feature vector (``backbone.pool``), scored by 5-fold
cross-validation over train + val on clothing-small and fashion-products (image only).

For each frozen backbone of the presets (Lite0@256, Lite1@272, Lite2@300, whole short side) and
the three side by side, each pooling:

- ``avg``         the net's own global average (what catalens did before; ``catalens train``'s default)
- ``gem``         generalised mean, p = 3, of the same final map
- ``multilevel``  that GeM vector + the averages of the last three stages' outputs

is embedded through the catalens engine (the runtime ``auto`` picks here), and a linear head is
fitted as ``catalens train --folds 5`` does (split by product, each fold stopping early on an
inner part of its training products). The score is the out-of-fold accuracy per class task (the
same numbers the presets rank recipes by). The test split is never read: this is how the presets'
pooling was chosen. Results go to ``runs/bench_pooling/results.json`` (an interrupted run resumes;
``--fresh`` starts over).

    python benchmarks/bench_pooling.py [--only clothing fashion] [--fresh]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import ROOT, SHARED_DATA, log, table, write_section  # noqa: E402

WORK = ROOT / "runs" / "bench_pooling"
RESULTS = WORK / "results.json"
DATASETS = {"clothing": (SHARED_DATA / "clothing-small", ["label"]),
            "fashion": (ROOT / "examples" / "fashion-products.yaml", ["articleType", "subCategory"])}
BACKBONES = ["efficientnet_lite0@256", "efficientnet_lite1@272", "efficientnet_lite2@300"]
POOLS = ["avg", "gem", "multilevel"]
FOLDS = 5


def config(spec: str, pool: str):
    from catalens.config import load_config

    return load_config(overrides=[{"tracking": False, "cache_dir": str(WORK / "cache"), "text": {"enabled": False},
                                   "engine": {"progress": False},
                                   "backbone": {"name": spec, "crop_pct": 1.0, "pool": pool}}])


def cv_scores(prep, cfg) -> dict[str, float]:
    """Out-of-fold accuracy per class task (K = FOLDS, as ``catalens train --folds``)."""
    from catalens.train.kfold import fold_parts, out_of_fold, product_folds
    from catalens.train.search import objective_value

    parts = fold_parts(prep, product_folds(prep.cat, FOLDS, cfg.seed), FOLDS, cfg)
    oof, scored = out_of_fold(prep, parts, cfg)
    Y, probs = prep.select(scored), {k: v[scored] for k, v in oof.items()}
    return {t.name: float(objective_value(prep.tasks, Y, probs, t.name)) for t in prep.tasks if t.kind == "class"}


def run_dataset(name: str, res: dict) -> None:
    from dataclasses import replace

    import numpy as np

    from catalens.train.kfold import prepare

    data, _ = DATASETS[name]
    for pool in POOLS:
        preps = []
        for spec in BACKBONES:
            key = f"{name}|{spec}|{pool}"
            cfg = config(spec, pool)
            t = time.time()
            prep = prepare(data, cfg, log=lambda *a: None, classes_from="pool")
            embed_s = time.time() - t
            preps.append(prep)
            if key not in res:
                t = time.time()
                res[key] = {"scores": cv_scores(prep, cfg), "dim": int(prep.features.shape[1]),
                            "embed_s": round(embed_s, 1), "fit_s": round(time.time() - t, 1)}
                _save(res)
            log(f"{key}: {res[key]}")
        key = f"{name}|concat|{pool}"
        if key not in res:
            both = replace(preps[0], features=np.hstack([p.features for p in preps]),
                           usable=np.logical_and.reduce([p.usable for p in preps]))
            t = time.time()
            res[key] = {"scores": cv_scores(both, config(BACKBONES[0], pool)), "dim": int(both.features.shape[1]),
                        "embed_s": 0.0, "fit_s": round(time.time() - t, 1)}
            _save(res)
        log(f"{key}: {res[key]}")


def _save(res: dict, path: Path = RESULTS) -> None:
    """``res`` as JSON at ``path``, atomically (an interrupted run resumes from it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(path)


def compare_rows(res: dict, variants, base: str, extra=lambda r: []) -> list[list]:
    """Table rows per dataset, feature set and variant (``res`` keys ``data|spec|variant``): the
    features, the variant, dim, the first task's CV score, points per task against ``base``, the
    second task's score, then ``extra(result)``."""
    rows = []
    for name, (_, tasks) in DATASETS.items():
        for spec in BACKBONES + ["concat"]:
            b = res.get(f"{name}|{spec}|{base}")
            for variant in variants:
                r = res.get(f"{name}|{spec}|{variant}")
                if not r:
                    continue
                label = "Lite0@256 + Lite1@272 + Lite2@300" if spec == "concat" else spec.replace("efficientnet_", "")
                gain = [f"{100 * (r['scores'][t] - b['scores'][t]):+.1f}" for t in tasks] if b else ["-"] * len(tasks)
                rows.append([name, label, variant, r["dim"], f"{r['scores'][tasks[0]]:.4f}", " / ".join(gain),
                             (f"{r['scores'][tasks[1]]:.4f}" if len(tasks) > 1 else "-"), *extra(r)])
    return rows


def report(res: dict) -> None:
    rows = compare_rows(res, POOLS, "avg")
    body = table(["data", "features (crop 1)", "pool", "dim", "CV accuracy (label / articleType)",
                  "points vs avg (per task)", "CV subCategory"], rows)
    body += ("\n\n5-fold out-of-fold accuracy over train + val (clothing-small 3,409 photos, 10 classes; "
             "fashion-products 5,289 photos, image only), linear head as `catalens train --folds 5`; test never "
             "read. One run each: on clothing one photo is 0.03 points. `multilevel` is what the `medium`/`best` "
             "presets use for their frozen recipes (docs/recipes.md, Pooling).")
    write_section("bench_pooling", "Pooling the feature map: avg, GeM, multilevel (5-fold CV)", body)


def resumable_main(doc: str, work: Path, results: Path, run_dataset, report,
                   fresh_help: str = "forget earlier results and cached features") -> None:
    """The command line of a resumable CV benchmark: ``--only`` datasets, ``--fresh`` forgets ``work``."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    ap.add_argument("--fresh", action="store_true", help=fresh_help)
    args = ap.parse_args()
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    res = json.loads(results.read_text()) if results.exists() else {}
    for name in args.only:
        run_dataset(name, res)
    report(res)


def main() -> None:
    resumable_main(__doc__, WORK, RESULTS, run_dataset, report)


if __name__ == "__main__":
    main()
