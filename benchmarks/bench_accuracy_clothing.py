"""Accuracy recipes on clothing-small, side by side: test accuracy, macro-F1, wall time.

Every recipe is the same ``catalens train`` a user runs (``train()`` with a config), then the
model folder is scored on ``validation`` (choices) and ``test`` (reported only; nothing is
chosen on it). Recipes:

- ``frozen-lite0``          the plain ``catalens train`` (frozen backbone, linear heads): baseline
- ``frozen-aug-lite0``      heads trained on K augmented views of the frozen features + hflip TTA
                            (``--finetune blocks --set finetune.blocks=0 --tta hflip``)
- ``finetune-blocks-lite0`` last stage(s) + conv head fine-tuned on precomputed views, hflip TTA
- ``frozen-lite1`` / ``frozen-lite2``    other members for the ensemble
- ``ensemble``              ``catalens ensemble`` of the members above, weights chosen on validation
- ``finetune-all-lite0``    everything trained (online augmentation): only with ``--all``
                            (hours on a 2-core CPU; minutes on a GPU)

Results are kept in ``runs/bench_accuracy_clothing/results.json``: an interrupted run resumes
with the recipes it has not finished (``--fresh`` starts over). The machine is shared, so wall
times carry the 1-minute load average measured around each recipe.

    python benchmarks/bench_accuracy_clothing.py [--only NAME ...] [--all] [--fresh]
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

import numpy as np  # noqa: E402
from _report import ROOT, SHARED_DATA, choose_weights, log, table, write_section  # noqa: E402

DATA = SHARED_DATA / "clothing-small"
WORK = ROOT / "runs" / "bench_accuracy_clothing"
RESULTS = WORK / "results.json"

BASE = {"tracking": False, "engine": {"progress": False}}
FT_BLOCKS = {"mode": "blocks", "blocks": 1, "epochs": 6, "views": 3, "lr": 0.02, "backbone_lr_mult": 0.25,
             "warmup_epochs": 1.0, "label_smoothing": 0.1, "batch_size": 32, "tta": ["hflip"]}
#: three offline backbones side by side, each a little above its native side, whole short side kept
MULTI = "efficientnet_lite0@256+efficientnet_lite1@272+efficientnet_lite2@300"
#: head seeds whose test accuracies give the spread of a frozen recipe (features cached: seconds each)
SEEDS = 5

RECIPES: dict[str, dict] = {
    "frozen-lite0": {"cfg": {}},
    "finetune-blocks-lite0": {"cfg": {"finetune": FT_BLOCKS}},
    "frozen-lite1": {"cfg": {"backbone": {"name": "efficientnet_lite1"}, "finetune": {"tta": ["hflip"]}}},
    "frozen-lite2": {"cfg": {"backbone": {"name": "efficientnet_lite2"}, "finetune": {"tta": ["hflip"]}}},
    "ensemble": {"members": ["finetune-blocks-lite0", "frozen-lite1", "frozen-lite2"]},
    "frozen-lite1-272-full": {"cfg": {"backbone": {"name": "efficientnet_lite1@272", "crop_pct": 1.0},
                                      "finetune": {"tta": ["hflip"]}}},
    "frozen-multi": {"cfg": {"backbone": {"name": MULTI, "crop_pct": 1.0}, "finetune": {"tta": ["hflip"]}}},
    "frozen-aug-lite0": {"cfg": {"finetune": {"mode": "blocks", "blocks": 0, "epochs": 10, "views": 3,
                                              "lr": 0.01, "label_smoothing": 0.1, "tta": ["hflip"]}},
                         "optional": True},
    "finetune-all-lite0": {"cfg": {"finetune": {"mode": "all", "epochs": 6, "views": 0, "lr": 0.01,
                                                "backbone_lr_mult": 0.3, "tta": ["hflip"]}}, "optional": True},
    "ensemble-all": {"members": ["finetune-all-lite0", "frozen-lite1", "frozen-lite2"], "optional": True},
    "finetune-blocks-lite1": {"cfg": {"backbone": {"name": "efficientnet_lite1"}, "finetune": FT_BLOCKS}},
    "ensemble-lite1": {"members": ["finetune-blocks-lite1", "frozen-lite1", "finetune-blocks-lite0"]},
    "frozen-multi-searched": {"cfg": {"backbone": {"name": MULTI, "crop_pct": 1.0}, "finetune": {"tta": ["hflip"]}},
                              "search": {"minutes": 12, "cv": 5}},
    "ensemble-multi": {"members": ["frozen-multi", "finetune-blocks-lite0", "finetune-blocks-lite1"]},
}


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def save_results(res: dict) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(RESULTS)


def config(overrides: dict):
    from catalens.config import load_config

    return load_config(overrides=[BASE, {"cache_dir": str(WORK / "cache")}, overrides])


def trained_config(name: str):
    """The configuration recipe ``name`` trains with: its settings, or for a searched recipe the
    ``best_config.yaml`` its search wrote (once written)."""
    best = WORK / "search" / name / "best_config.yaml"
    if "search" in RECIPES[name] and best.exists():
        from catalens.config import load_config

        return load_config(best)
    return config(RECIPES[name].get("cfg", {}))


def scores(model, cat, cfg) -> dict:
    """Accuracy, macro-F1 and probabilities of ``model`` on the rows of ``cat``."""
    import torch
    from sklearn.metrics import f1_score

    from catalens.embed.cache import EmbeddingCache
    from catalens.embed.engine import stream_features
    from catalens.embed.features import engine_config

    task = model.tasks[0]
    cache = EmbeddingCache(cfg.cache_dir, model.backbone.fingerprint(), model.backbone.feature_dim)
    probs = np.zeros((len(cat), task.n_outputs), np.float32)
    with torch.inference_mode():
        for b in stream_features(cat, model.backbone, cache, engine_config(cfg)):
            probs[b.rows] = model.predict_proba_features(b.features)[task.name]
    y = cat.encode(model.tasks)[task.name]
    pred = probs.argmax(1)
    return {"accuracy": float((pred == y).mean()), "macro_f1": float(f1_score(y, pred, average="macro")),
            "n": int(len(y)), "probs": probs, "y": y}


def splits():
    from catalens.ingest.open import open_catalogue

    cat = open_catalogue(DATA)
    return cat.split("val"), cat.split("test")


def evaluate(name: str, folder: Path, cfg, res: dict, val, test) -> None:
    """Validation + test scores, with and without the model's TTA."""
    from catalens.model.single import CatalensModel
    from catalens.model.tta import apply_model_tta

    model = CatalensModel.load(folder)
    entry = res[name]
    tta = list(model.meta.get("tta") or [])
    passes = ([("tta", tta)] if tta else []) + [("plain", [])]
    if hasattr(model, "members"):  # an ensemble: members keep their own TTA
        passes = [("members", None)]
    for label, views in passes:
        if views is not None:
            apply_model_tta(model, views)
        t0 = time.time()
        # validation: for choices (the model's own setting; ensembles were chosen on member scores)
        need_val = label != "members" and not (label == "plain" and tta)
        v = scores(model, val, cfg) if need_val else None
        t = scores(model, test, cfg)
        entry[label] = {"test_accuracy": t["accuracy"], "test_macro_f1": t["macro_f1"],
                        "eval_s": round(time.time() - t0, 1)}
        if v is not None:
            entry[label].update(val_accuracy=v["accuracy"], val_macro_f1=v["macro_f1"])
            np.save(WORK / f"{name}.{label}.val.npy", v["probs"])
        np.save(WORK / f"{name}.{label}.test.npy", t["probs"])
        log(f"{name} [{label}]: " + (f"val acc {v['accuracy']:.4f}, " if v else "")
            + f"test acc {t['accuracy']:.4f}, test macro-F1 {t['macro_f1']:.4f}")
    entry["score"] = entry.get("tta") or entry.get("members") or entry["plain"]


def run_recipe(name: str, res: dict, val, test) -> None:
    from catalens.train.pipeline import train

    spec = RECIPES[name]
    out = WORK / "models" / name
    cfg = config(spec.get("cfg", {}))
    if "members" in spec:
        return run_ensemble(name, spec["members"], res, val, test, cfg)
    if name in res and "wall_s" in res[name] and (out / "model.json").exists():  # trained, not yet scored
        evaluate(name, out, cfg, res, val, test)
        save_results(res)
        return
    load0 = os.getloadavg()[0]
    t0 = time.time()
    if "search" in spec:  # catalens search (head settings by k-fold CV on cached features), then train
        from catalens.train.search import search

        search(DATA, WORK / "search" / name, cfg, log=lambda m: log(f"  {m}"), **spec["search"])
        cfg = trained_config(name)
    r = train(DATA, out, cfg, log=lambda m: log(f"  {m}"))
    wall = time.time() - t0
    res[name] = {"wall_s": round(wall, 1), "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2),
                 "val_accuracy_at_train": r.metrics.get("label", {}).get("accuracy"),
                 "finetune": {k: v for k, v in (r.model.meta.get("finetune") or {}).items() if k != "history"},
                 "history": (r.model.meta.get("finetune") or {}).get("history")}
    save_results(res)
    evaluate(name, out, cfg, res, val, test)
    save_results(res)
    if cfg.finetune.mode == "none":
        spread(name, cfg, res, test)
        save_results(res)


def spread(name: str, cfg, res: dict, test) -> None:
    """Frozen recipes: 5-fold CV accuracy over train+val (the choice criterion: 3,409 photos instead
    of validation's 341) and the test accuracy of ``SEEDS`` head seeds (how much one run can vary)."""
    from catalens.model.single import CatalensModel
    from catalens.train.kfold import cross_validate
    from catalens.train.pipeline import train

    e = res[name]
    if "cv" not in e:
        r = cross_validate(DATA, WORK / "models" / name, cfg, folds=5, log=lambda m: None)
        acc = r.summary["label.accuracy"]
        e["cv"] = {"accuracy": acc["mean"], "std_over_folds": acc["std"], "seconds": round(r.seconds, 1)}
        log(f"{name}: 5-fold CV accuracy {acc['mean']:.4f} ± {acc['std']:.4f}")
    if "seeds" not in e:
        accs = [e["score"]["test_accuracy"]]
        for seed in range(1, SEEDS):
            folder = WORK / "seeds" / f"{name}-{seed}"
            train(DATA, folder, cfg.model_copy(update={"seed": seed}), log=lambda m: None)
            accs.append(scores(CatalensModel.load(folder), test, cfg)["accuracy"])
            shutil.rmtree(folder)
        e["seeds"] = {"test_accuracy": accs, "mean": float(np.mean(accs)), "std": float(np.std(accs, ddof=1))}
        log(f"{name}: test accuracy over {SEEDS} head seeds {np.mean(accs):.4f} ± {np.std(accs, ddof=1):.4f}")


def run_ensemble(name: str, members: list[str], res: dict, val, test, cfg) -> None:
    """Weights on a small grid chosen by validation accuracy (then log-loss), never by test."""
    from catalens.model.ensemble import build_ensemble

    have = [m for m in members if m in res and "score" in res[m]]
    if len(have) < 2:
        log(f"{name}: needs at least two finished members of {members}; skipped")
        return
    y = val.encode()["label"]
    label = {m: ("tta" if "tta" in res[m] else "members" if "members" in res[m] else "plain") for m in have}
    weights, acc = choose_weights({m: np.load(WORK / f"{m}.{label[m]}.val.npy") for m in have}, y)
    used = list(weights.items())
    log(f"{name}: weights chosen on validation {dict(used)} (val acc {acc:.4f})")
    load0 = os.getloadavg()[0]
    t0 = time.time()
    out = WORK / "models" / name
    build_ensemble([WORK / "models" / m for m, _ in used], out, [float(wi) for _, wi in used], log=log)
    res[name] = {"wall_s": round(time.time() - t0 + sum(res[m]["wall_s"] for m, _ in used), 1),
                 "val_accuracy_of_chosen_weights": acc,
                 "build_s": round(time.time() - t0, 1), "members": {m: wi for m, wi in used},
                 "load_before": round(load0, 2)}
    evaluate(name, out, cfg, res, val, test)
    res[name]["load_after"] = round(os.getloadavg()[0], 2)
    save_results(res)


def report(res: dict) -> None:
    base = res.get("frozen-lite0", {}).get("score", {}).get("test_accuracy")
    rows = []
    for name in RECIPES:
        e = res.get(name)
        if not e or "score" not in e:
            continue
        s = e["score"]
        gain = f"{(s['test_accuracy'] - base) * 100:+.1f} pts" if base is not None else ""
        tta_gain = ""
        if "tta" in e and "plain" in e:
            tta_gain = f"{(e['tta']['test_accuracy'] - e['plain']['test_accuracy']) * 100:+.1f} pts"
        load = f"{e.get('load_before', '')}/{e.get('load_after', '')}"
        val_acc = s.get("val_accuracy", e.get("val_accuracy_of_chosen_weights"))
        cv = f"{e['cv']['accuracy']:.4f} ± {e['cv']['std_over_folds']:.4f}" if "cv" in e else ""
        seeds = f"{e['seeds']['mean']:.4f} ± {e['seeds']['std']:.4f}" if "seeds" in e else ""
        rows.append([name, cv, f"{val_acc:.4f}", f"{s['test_accuracy']:.4f}", seeds, f"{s['test_macro_f1']:.4f}",
                     gain, tta_gain, f"{e['wall_s'] / 60:.1f}", load])
    with_cv = [r for r in rows if r[1]]
    best = max(with_cv, key=lambda r: float(r[1].split()[0]), default=None)
    top_val = max(rows, key=lambda r: float(r[2]), default=None)
    body = [f"Data: `clothing-small` (train 3,068 / validation 341 / test 372, 10 classes). Every recipe is "
            f"`catalens train` with the settings below; the test split is only reported, choices "
            f"are made on train+val: the winner by 5-fold cross-validation over train+val (3,409 photos; "
            f"frozen recipes, where the folds refit only the head on cached features), ensemble weights on "
            f"validation. Validation alone (341 photos) is too small to rank recipes: one photo is 0.3 "
            f"points, and the head's seed alone moves test accuracy by about 1 point, so frozen recipes "
            f"also show test accuracy over {SEEDS} head seeds (mean ± sd; the 'test acc' column is seed 0, "
            f"the model the recipe writes). Wall time is train + everything it "
            f"needs (decode, embedding, views, epochs) on this 2-core machine (1-minute load average "
            f"before/after each recipe given: with 2 cores, a load above 2 means other processes took "
            f"part of them). The ensemble's time is the sum of its members'.", "",
            table(["recipe", "5-fold CV acc", "val acc", "test acc", f"test acc, {SEEDS} head seeds",
                   "test macro-F1", "gain vs frozen linear", "TTA gain (test)", "wall (min)",
                   "load avg before/after"], rows), ""]
    if best:
        body.append(f"Best by cross-validation: **{best[0]}** (test accuracy {best[3]}; over {SEEDS} head seeds "
                    f"{best[4]}). Highest validation accuracy: **{top_val[0]}** (val {top_val[2]}, test "
                    f"{top_val[3]}; ensembles have no CV score: their fine-tuned members would have to be "
                    f"fine-tuned again per fold). Published reference: 90% "
                    f"(Xception at 299 px, fine-tuned). Target: >= 94% in under 30 minutes.")
    body.append("")
    body.append("Settings: " + "; ".join(
        f"`{n}`: {json.dumps(RECIPES[n].get('cfg') or RECIPES[n].get('members'))}"
        + (f" + `catalens search` {json.dumps(RECIPES[n]['search'])}" if "search" in RECIPES[n] else "")
        for n in RECIPES if n in res))
    skipped = [n for n in RECIPES if n not in res]
    if skipped:
        body.append("")
        body.append("Not run in this pass: " + ", ".join(f"`{n}`" for n in skipped) +
                    " (optional recipes run with `--all`).")
    write_section("bench_accuracy_clothing", "Accuracy recipes on clothing-small", "\n".join(body))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", help="recipes to run (default: all but optional ones)")
    ap.add_argument("--all", action="store_true", help="also the optional recipes (fine-tune all)")
    ap.add_argument("--fresh", action="store_true", help="forget earlier results")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if not DATA.exists():
        print(f"skipped: {DATA} not found (set CATALENS_SHARED_DATA)")
        return 0
    if args.fresh and WORK.exists():
        shutil.rmtree(WORK)
    res = load_results()
    if not args.report_only:
        val, test = splits()
        names = args.only or [n for n in RECIPES if args.all or not RECIPES[n].get("optional")]
        for name in names:
            if name in res and "score" in res[name]:
                log(f"{name}: done earlier (test acc {res[name]['score']['test_accuracy']:.4f})")
                cfg = trained_config(name)
                if "members" not in RECIPES[name] and cfg.finetune.mode == "none":
                    spread(name, cfg, res, test)
                    save_results(res)
                continue
            log(f"{name}: start (load average {os.getloadavg()[0]:.1f})")
            run_recipe(name, res, val, test)
            report(res)
    report(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
