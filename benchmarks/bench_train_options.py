"""Fine-tuning options of issue 16 on clothing-small: mixup, CutMix, progressive resizing, and a
non-square input, each against the fast fine-tuning default, scored on validation.

Every recipe is ``catalens train DATA --finetune blocks`` (the measured fast default: last stage
+ conv head, 3 precomputed views, 6 epochs, seed 0) with one option added:

- ``baseline``     the default
- ``mixup``        ``--set finetune.mixup=0.2``
- ``cutmix``       ``--set finetune.cutmix=1.0``
- ``progressive``  ``--set finetune.progressive=0.5`` (epoch 1 at half the side, growing to 1)
- ``nonsquare``    the default on ``efficientnet_lite0@256x192`` (height x width: portrait photos)

Recipes on the same backbone share one linear probe, one pixel store and one set of precomputed
views (they do not depend on these options, :func:`catalens.train.finetune.views_key`), so each
recipe's time is its fine-tuning epochs; the first recipe of a backbone also pays for the views
(column "views s"). Only the validation split is used (the choice); test is never read here.
One run each: on 341 validation photos one photo is 0.3 points, so differences under about a
point are noise. Results go to ``runs/bench_train_options/results.json`` (an interrupted run
resumes; ``--fresh`` starts over).

    python benchmarks/bench_train_options.py [--only NAME ...] [--fresh]
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

DATA = SHARED_DATA / "clothing-small"
WORK = ROOT / "runs" / "bench_train_options"
RESULTS = WORK / "results.json"
BASE = {"tracking": False, "engine": {"progress": False}, "finetune": {"mode": "blocks"}}

RECIPES: dict[str, dict] = {
    "baseline": {},
    "mixup": {"finetune": {"mixup": 0.2}},
    "cutmix": {"finetune": {"cutmix": 1.0}},
    "progressive": {"finetune": {"progressive": 0.5}},
    "nonsquare": {"backbone": {"name": "efficientnet_lite0@256x192"}},
}


def config(overrides: dict):
    from catalens.config import load_config

    return load_config(overrides=[BASE, overrides])


class Probe:
    """One backbone's prepared rows (cached features), linear probe and views folder."""

    def __init__(self, cfg) -> None:
        from catalens.embed.factory import backbone_from_config
        from catalens.train.finetune import views_key
        from catalens.train.kfold import fit_on, prepare

        t0 = time.time()
        self.prep = prepare(DATA, cfg, log=log)
        split = self.prep.split
        self.train = (split == "train") & self.prep.usable
        self.val = (split == "val") & self.prep.usable
        self.backbone = backbone_from_config(cfg.backbone)
        self.fitted = fit_on(self.prep, split == "train", split == "val", cfg)
        self.views_dir = WORK / "views" / views_key(cfg, self.backbone, int(self.train.sum()), int(self.val.sum()))
        self.seconds = time.time() - t0
        task = self.fitted.tasks[0]  # the frozen linear probe fine-tuning starts from, on validation
        probs = self.fitted.head.predict_proba(self.prep.features[self.val])[task.name]
        self.val_accuracy = float((probs.argmax(1) == self.prep.Y[task.name][self.val]).mean())


def run(name: str, probes: dict, res: dict) -> None:
    from catalens.train.finetune import finetune

    cfg = config(RECIPES[name])
    key = cfg.backbone.name
    if key not in probes:
        probes[key] = Probe(cfg)
    p = probes[key]
    first = not p.views_dir.exists()
    load0 = os.getloadavg()[0]
    t0 = time.time()
    r = finetune(p.prep.cat, p.fitted.tasks, p.prep.Y, p.train, p.val, p.backbone, p.fitted.head, cfg,
                 WORK / "work" / name, log=lambda m: log(f"  {m}"), views_dir=p.views_dir)
    wall = time.time() - t0
    task = p.fitted.tasks[0]
    y = p.prep.Y[task.name][p.val]
    acc = float((r.probs_val[task.name].argmax(1) == y).mean())
    hist = r.history
    views_s = wall - sum(h["seconds"] for h in hist) if first else 0.0
    res[name] = {"val_accuracy": acc, "probe_val_accuracy": p.val_accuracy, "n_val": int(len(y)), "wall_s": round(wall, 1), "views_s": round(views_s, 1),
                 "epochs_s": round(sum(h["seconds"] for h in hist), 1), "load_before": round(load0, 2),
                 "load_after": round(os.getloadavg()[0], 2), "backbone": key,
                 "options": RECIPES[name].get("finetune", {}),
                 "val_by_epoch": [round(h.get("val_accuracy", float("nan")), 4) for h in hist]}
    log(f"{name}: val accuracy {acc:.4f} ({wall:.0f}s, load {load0:.1f})")
    shutil.rmtree(WORK / "work" / name, ignore_errors=True)


def cross_validation(res: dict, results: Path) -> None:
    """5-fold CV (train + val, by product) of the frozen linear probe of each backbone of the recipes:
    whether an input shape helps, chosen on 3,409 photos instead of validation's 341."""
    from catalens.train.kfold import cross_validate

    for name in dict.fromkeys(config(r).backbone.name for r in RECIPES.values()):
        key = f"cv:{name}"
        if key in res:
            continue
        t0 = time.time()
        r = cross_validate(DATA, WORK / "cv" / name, config({"backbone": {"name": name}}), folds=5,
                           log=lambda m: None)
        acc = r.summary["label.accuracy"]
        res[key] = {"accuracy": acc["mean"], "std_over_folds": acc["std"], "seconds": round(time.time() - t0, 1)}
        log(f"{name}: frozen probe 5-fold CV accuracy {acc['mean']:.4f} ± {acc['std']:.4f}")
        tmp = results.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(results)


def report(res: dict, command: str) -> None:
    base = res.get("baseline", {}).get("val_accuracy")
    rows = []
    for name in RECIPES:
        e = res.get(name)
        if not e or name.startswith("cv:"):
            continue
        gain = f"{(e['val_accuracy'] - base) * 100:+.1f} pts" if base is not None and name != "baseline" else ""
        opts = ", ".join(f"{k}={v}" for k, v in e["options"].items()) or ("@256x192" if name == "nonsquare" else
                                                                          "default")
        rows.append([name, opts, e.get("probe_val_accuracy", ""), e["val_accuracy"], gain, " ".join(f"{v:.3f}" for v in e["val_by_epoch"]),
                     f"{e['epochs_s']:.0f}", f"{e['views_s']:.0f}" if e["views_s"] else "",
                     f"{e['load_before']}/{e['load_after']}"])
    body = table(["recipe", "option", "frozen probe val acc", "val acc", "vs baseline", "val acc by epoch", "epochs s", "views s",
                  "load avg before/after"], rows)
    body += ("\n\nclothing-small, `--finetune blocks` default (last stage + conv head, 3 precomputed views, "
             "6 epochs, seed 0), one run each, scored on the 341 validation photos (one photo = 0.3 pts); "
             "test not read. Recipes of one backbone share the linear probe and the views.")
    cv = [[k[3:], f"{v['accuracy']:.4f} ± {v['std_over_folds']:.4f}", f"{v['seconds']:.0f}"]
          for k, v in res.items() if k.startswith("cv:")]
    if cv:
        body += "\n\nFrozen linear probe (the start of fine-tuning), 5-fold CV over train+val by product:\n\n"
        body += table(["backbone", "CV accuracy ± sd over folds", "seconds"], cv)
    write_section("bench_train_options", "Fine-tuning options on clothing-small (mixup, CutMix, progressive, "
                  "non-square)", body, command)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", choices=list(RECIPES))
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--cv", action="store_true", help="also the 5-fold CV accuracy over train+val of the frozen "
                    "linear probe of each input shape (square 224 vs 256x192)")
    ap.add_argument("--part", metavar="NAME", help="write this run's results to results-NAME.json (to run "
                    "recipes in parallel processes; the table merges every results*.json)")
    args = ap.parse_args()
    if not DATA.exists():
        sys.exit(f"no data at {DATA} (see ../shared/data/README.md)")
    if args.fresh:
        shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True, exist_ok=True)
    results = WORK / f"results-{args.part}.json" if args.part else RESULTS
    res = json.loads(results.read_text()) if results.exists() else {}
    probes: dict = {}
    for name in args.only or list(RECIPES):
        if name in res:
            continue
        if any(name in json.loads(f.read_text()) for f in WORK.glob("results*.json")):
            continue  # measured by another part
        try:
            run(name, probes, res)
        except Exception as e:  # one recipe failing (e.g. an option not built) must not lose the others
            log(f"{name}: failed ({type(e).__name__}: {e})")
            continue
        tmp = results.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(results)
    if args.cv:
        cross_validation(res, results)
    merged = {}
    for f in sorted(WORK.glob("results*.json")):
        merged.update(json.loads(f.read_text()))
    report(merged, "python " + " ".join(["benchmarks/bench_train_options.py"] + sys.argv[1:]))


if __name__ == "__main__":
    main()
