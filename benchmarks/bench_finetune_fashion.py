"""Fine-tuning the whole backbone on fashion-products, image-only and fused with titles.

``catalens train examples/fashion-products.yaml --finetune all --text`` (settings below): the
frozen pipeline runs first (embedding, linear probe), then every weight of EfficientNet-Lite0
is trained on augmented photos (bf16 autocast where the CPU has it), then the title model and
the fusion weights are fitted on val. The model folder is scored on the test split twice:
image only (the fine-tuned network and heads) and fused with the titles. Tag thresholds are
tuned on val for each. Writes the ``bench_finetune_fashion`` section of docs/benchmarks.md.

    python benchmarks/bench_finetune_fashion.py [--mode all|blocks] [--epochs 6] [--backbone NAME[@PX]]
        [--crop-pct F] [--compile auto|on|off] [--no-write]
    python benchmarks/bench_finetune_fashion.py --ensemble    # the model folders of earlier runs, as one

On a machine with a CUDA GPU the same script fine-tunes there (and embeds with the ``cuda``
runtime); the section's header then names the GPU.
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
from _report import ROOT, SHARED_DATA, choose_weights, publish, table  # noqa: E402
from bench_accuracy_fashion import DATA, sel, tune  # noqa: E402

WORK = ROOT / "runs" / "bench_finetune_fashion"


def settings(epochs: int, mode: str = "all", blocks: int = 1, backbone: str | None = None,
             crop_pct: float | None = None, compile: str | None = None) -> dict:
    """``all``: every weight, online augmentation (the GPU recipe, ~13 min an epoch on 2 cores);
    ``blocks``: the last stage + conv head on 3 precomputed augmented views (the CPU recipe)."""
    ft = ({"mode": "all", "views": 0, "lr": 0.01, "backbone_lr_mult": 0.3} if mode == "all" else
          {"mode": "blocks", "blocks": blocks, "views": 3, "lr": 0.02, "backbone_lr_mult": 0.25})
    bb = {k: v for k, v in (("name", backbone), ("crop_pct", crop_pct)) if v is not None}
    if compile is not None:
        ft["compile"] = compile
    return {"tracking": False, "engine": {"progress": False}, "cache_dir": str(WORK / "cache"),
            **({"backbone": bb} if bb else {}),
            "text": {"enabled": True},
            "finetune": {**ft, "epochs": epochs, "warmup_epochs": 1.0, "label_smoothing": 0.1, "batch_size": 32}}


def probabilities(model, cat, cfg, texts: bool) -> dict[str, np.ndarray]:
    """Per task probabilities for every row of ``cat`` (image only, or fused with titles)."""
    import torch

    from catalens.embed.cache import EmbeddingCache
    from catalens.embed.engine import stream_features
    from catalens.embed.features import engine_config

    cache = EmbeddingCache(cfg.cache_dir, model.backbone.fingerprint(), model.backbone.feature_dim)
    out = {t.name: np.zeros((len(cat), t.n_outputs), np.float32) for t in model.tasks}
    titles = cat.frame["text"].to_numpy(dtype=object)
    with torch.inference_mode():
        for b in stream_features(cat, model.backbone, cache, engine_config(cfg)):
            p = model.predict_proba_features(b.features, texts=titles[b.rows] if texts else None)
            for k, v in p.items():
                out[k][b.rows] = v
    return out


HEADERS = ["model", "master acc", "sub acc", "article acc", "article macro-F1", "pattern micro-F1", "consistent paths"]


def score_rows(model, cat, cfg, what: str) -> list[list[str]]:
    """Test rows (image only, and fused with titles) of ``model``; thresholds tuned on val."""
    from catalens.evaluate.metrics import compute_metrics
    from catalens.train.pipeline import known_paths

    val, test = cat.split("val"), cat.split("test")
    tasks = model.tasks
    Yv, Yt = val.encode(tasks), test.encode(tasks)
    fit = cat.subset(cat.frame["split"].isin(["train", "val"]).to_numpy())
    flat = [p for v in known_paths(fit, tasks).values() for p in v]
    rows = []
    for label, texts in ((f"{what}, image only", False), (f"{what} + titles (fused)", True)):
        pv, pt = probabilities(model, val, cfg, texts), probabilities(model, test, cfg, texts)
        m = compute_metrics(tune(tasks, Yv, pv), Yt, pt, known_paths=flat)
        h = next(iter(m["hierarchy"].values()))
        rows.append([label, f"{m['masterCategory']['accuracy']:.4f}", f"{m['subCategory']['accuracy']:.4f}",
                     f"{m['articleType']['accuracy']:.4f}", f"{m['articleType']['macro_f1']:.4f}",
                     f"{m['pattern']['micro_f1']:.4f}", f"{h['consistent_share']:.4f}"])
        print(rows[-1], flush=True)
    return rows


def run_ensemble(write: bool) -> None:
    """``catalens ensemble`` of every fine-tuned model folder this benchmark left in WORK."""
    from catalens.model.single import CatalensModel
    from catalens.config import load_config
    from catalens.model.ensemble import build_ensemble
    from catalens.ingest.open import open_catalogue

    members = sorted(p for p in WORK.glob("model*") if (p / "model.json").exists())
    if len(members) < 2:
        print(f"--ensemble needs two fine-tuned model folders in {WORK}; found {[m.name for m in members]}")
        return
    cfg = load_config(None, [settings(1)])  # engine and embedding cache only: nothing is trained here
    cat = open_catalogue(DATA)
    val = cat.split("val")
    models = {m.name: CatalensModel.load(m) for m in members}
    y = val.encode(next(iter(models.values())).tasks)["articleType"]
    weights, _ = choose_weights({n: probabilities(m, val, cfg, False)["articleType"] for n, m in models.items()}, y)
    print(f"weights chosen on val articleType accuracy: {weights}", flush=True)
    t0 = time.time()
    out = WORK / "ensemble"
    build_ensemble([WORK / n for n in weights], out, [float(w) for w in weights.values()], log=lambda m: None)
    rows = score_rows(CatalensModel.load(out), cat, cfg, "ensemble")
    described = "; ".join(f"`{n}` ({models[n].meta.get('backbone', {}).get('weights_origin', '?')}) x{w}"
                          for n, w in weights.items())
    body = (f"`catalens ensemble` of the fine-tuned model folders of the sections above, weights (0-3 each) "
            f"chosen on val articleType accuracy, then log-loss: {described}. Scoring the ensemble on val + test "
            f"took {(time.time() - t0) / 60:.1f} min here; its members' training times are in their sections.\n\n"
            + table(HEADERS, rows))
    publish("bench_finetune_fashion_ensemble", "An ensemble of the fine-tuned fashion-products models", body,
            write=write, command="python benchmarks/bench_finetune_fashion.py --ensemble")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--blocks", type=int, default=1, help="--mode blocks: last N stages trained")
    ap.add_argument("--mode", choices=["all", "blocks"], default="all",
                    help="all: every weight (GPU recipe); blocks: last stage on precomputed views (CPU recipe)")
    ap.add_argument("--backbone", default=None, help="NAME or NAME@PX (default: the config's, efficientnet_lite0)")
    ap.add_argument("--crop-pct", type=float, default=None, help="centre-crop share (default: the backbone's)")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default=None,
                    help="torch.compile of the trained part (default: the config's, auto = on a GPU)")
    ap.add_argument("--search-minutes", type=float, default=None,
                    help="first search the fine-tuning's settings (catalens search --finetune, articleType on val) "
                         "for this long, then train with the best")
    ap.add_argument("--ensemble", action="store_true",
                    help="instead of training: ensemble the model folders earlier runs left in runs/bench_finetune_fashion")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if not (SHARED_DATA / "fashion-products").exists():
        print(f"fashion-products not found under {SHARED_DATA}; skipped")
        return
    if args.ensemble:
        return run_ensemble(not args.no_write)
    from catalens.model.single import CatalensModel
    from catalens.config import load_config
    from catalens.ingest.open import open_catalogue
    from catalens.train.pipeline import train

    spec = settings(args.epochs, args.mode, args.blocks, args.backbone, args.crop_pct, args.compile)
    cfg = load_config(None, [spec])
    tag = "" if args.backbone is None and args.crop_pct is None else \
        "-" + f"{cfg.backbone.name}-{cfg.backbone.image_size or 'd'}-c{cfg.backbone.crop_pct or 'd'}".replace("@", "-")
    out = WORK / (f"model{tag}-e{args.epochs}" if args.mode == "all" else f"model-blocks{args.blocks}-e{args.epochs}{tag}")
    t0, load0 = time.time(), os.getloadavg()[0]
    searched = ""
    if args.search_minutes:
        from catalens.train.search import search

        out = out.with_name(out.name + f"-searched{args.search_minutes:g}m")
        found = search(DATA, WORK / ("search-" + out.name), cfg, minutes=args.search_minutes, objective="articleType",
                       log=lambda m: print(f"  {m}", flush=True))
        cfg = load_config(found.config_path)
        f = cfg.finetune
        searched = (f" Settings from `catalens search --finetune {args.mode} --minutes {args.search_minutes:g} "
                    f"--objective articleType` ({found.trials} trials in {found.seconds / 60:.1f} min; val articleType "
                    f"{found.baseline_value:.4f} for the starting settings, {found.best_value:.4f} for the best): "
                    f"lr {f.lr:.3g}, backbone x{f.backbone_lr_mult:.3g}, weight decay {f.weight_decay:.2g}, "
                    f"label smoothing {f.label_smoothing:.2f}, {f.epochs} epochs; the wall time includes the search.")
    if not (out / "model.json").exists():
        train(DATA, out, cfg, log=lambda m: print(f"  {m}", flush=True))
    wall = time.time() - t0
    model = CatalensModel.load(out)
    cat = open_catalogue(DATA)
    val, test = cat.split("val"), cat.split("test")
    name = model.backbone.name.replace("efficientnet_lite", "Lite") + f"@{model.preprocess.size}"
    what = (f"fine-tuned {name}" if args.mode == "all" else f"{name}, last {args.blocks} stage(s) fine-tuned") \
        + (" (settings searched)" if args.search_minutes else "")
    rows = score_rows(model, cat, cfg, what)
    ft = model.meta.get("finetune") or {}
    flags = "".join(f" --{k.replace('_', '-')} {v}" for k, v in (("backbone", args.backbone), ("crop_pct", args.crop_pct),
                                                               ("compile", args.compile))
                    if v is not None)
    train_flags = flags.replace("--compile ", "--set finetune.compile=")
    body = (f"`catalens train examples/fashion-products.yaml --finetune {args.mode} --text{train_flags}` with "
            f"`{spec['finetune']}`; {len(test)} test images, everything chosen on val. "
            f"Wall time of the whole train (embedding, probe, fine-tuning, titles): {wall / 60:.1f} min "
            f"(load average before {load0:.1f}); fine-tuned on {ft.get('device')}, bf16 autocast: {ft.get('bf16')}, "
            f"epoch times {[h.get('seconds') for h in ft.get('history', [])]} s.{searched}\n\n"
            + table(HEADERS, rows)
            + "\n\nCompare with the frozen rows of *Accuracy recipes on fashion-products* above. Targets: "
              "articleType >= 0.93 image-only and >= 0.98 with titles, subCategory >= 0.99, masterCategory >= 0.998.")
    section = "bench_finetune_fashion" + ("" if args.mode == "all" else f"_blocks{args.blocks}") + tag.replace("-", "_") \
        + ("_searched" if args.search_minutes else "")
    title = (f"Fine-tuning all of {name} on fashion-products" if args.mode == "all" else
             f"Fine-tuning the last {args.blocks} stage(s) of {name} on fashion-products") \
        + (", settings searched" if args.search_minutes else "")
    command = "python benchmarks/bench_finetune_fashion.py" + (
        f" --epochs {args.epochs}" if args.mode == "all" else f" --mode blocks --blocks {args.blocks} --epochs {args.epochs}") \
        + flags + (f" --search-minutes {args.search_minutes:g}" if args.search_minutes else "")
    publish(section, title, body, write=not args.no_write, command=command)


if __name__ == "__main__":
    main()
