"""Accuracy recipes on fashion-products (test split): image-only, hierarchy decoding, titles, fusion.

Every recipe runs on the cached EfficientNet-Lite0 embeddings (the first run embeds the
5,968 photos once, ~2-13 min on 2 shared cores). Heads are fitted on train with early
stopping / calibration / fusion weights / tag thresholds on val; the test split is only
scored. Writes the ``bench_accuracy_fashion`` section of docs/benchmarks.md.

    python benchmarks/bench_accuracy_fashion.py [--head-config best_config.yaml] [--no-write]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _report import ROOT, SHARED_DATA, publish, table  # noqa: E402

DATA = ROOT / "examples" / "fashion-products.yaml"
#: three offline backbones side by side (as in bench_accuracy_clothing)
MULTI = "efficientnet_lite0@256+efficientnet_lite1@272+efficientnet_lite2@300"


def load(cfg):
    from catalens.embed.factory import backbone_from_config
    from catalens.ingest.open import open_catalogue
    from catalens.embed.features import catalogue_features
    from catalens.tasks import labelled_rows
    from catalens.train.pipeline import known_paths, training_tasks

    cat = open_catalogue(DATA)
    t0 = time.time()
    feats = catalogue_features(cat, backbone_from_config(cfg.backbone), cfg)
    embed_s = time.time() - t0
    fit_cat = cat.subset(cat.frame["split"].isin(["train", "val"]).to_numpy())
    tasks = training_tasks(fit_cat)
    Y = cat.encode(tasks)
    split = cat.frame["split"].to_numpy()
    usable = labelled_rows(tasks, Y, feats.ok)
    return dict(cat=cat, X=feats.features, Y=Y, tasks=tasks, titles=cat.frame["text"].to_numpy(dtype=object),
                paths=known_paths(fit_cat, tasks), tr=(split == "train") & usable, va=(split == "val") & usable,
                te=(split == "test") & usable, embed_s=embed_s)


def sel(Y, m):
    return {k: v[m] for k, v in Y.items()}


def tune(tasks, Yv, pv):
    from catalens.evaluate.thresholds import tune_thresholds

    tasks = copy.deepcopy(tasks)
    for t in tasks:
        if t.kind == "tags":
            t.thresholds = [float(x) for x in tune_thresholds(Yv[t.name], pv[t.name])]
    return tasks


def score(d, tasks, probs, decode=False):
    from catalens.evaluate.metrics import compute_metrics
    from catalens.heads.hierarchy import decode_hierarchy

    flat = [p for v in d["paths"].values() for p in v]
    pi = decode_hierarchy(tasks, probs, d["paths"]) if decode else None
    return compute_metrics(tasks, sel(d["Y"], d["te"]), probs, known_paths=flat, pred_index=pi)


def fit_head(d, head_cfg, seed=0):
    from catalens.heads import create_head

    h = head_cfg
    head = create_head(h.type, d["tasks"], hidden=h.hidden, dropout=h.dropout, epochs=h.epochs,
                       batch_size=h.batch_size, lr=h.lr, weight_decay=h.weight_decay, patience=h.patience,
                       loss_weights=h.loss_weights, class_weighting=h.class_weighting,
                       label_smoothing=h.label_smoothing, focal_gamma=h.focal_gamma, scaling=h.scaling, seed=seed,
                       sampler=h.sampler, max_per_class=h.max_per_class)
    return head.fit(d["X"][d["tr"]], sel(d["Y"], d["tr"]), d["X"][d["va"]], sel(d["Y"], d["va"]))


def default_features():
    """``(cfg, data)``: the default configuration and :func:`load` of fashion-products with it
    (frozen Lite0 features from the cache), or ``None`` when the photos are absent."""
    if not (SHARED_DATA / "fashion-products").exists():
        print(f"fashion-products not found under {SHARED_DATA}; skipped")
        return None
    from catalens.config import Config

    cfg = Config()
    cfg.engine.progress = False
    return cfg, load(cfg)


def fusion_cost(fusion, titles: list, probs: dict, reps: int = 200) -> dict[int, float]:
    """Milliseconds per ``fuse`` call for calls of 1 and 16 titles (after one warm-up call)."""
    out = {}
    for n in (1, 16):
        p = {k: v[:n] for k, v in probs.items()}
        fusion.fuse(p, titles[:n])
        t0 = time.perf_counter()
        for i in range(reps):
            j = (i * n) % max(1, len(titles) - n)
            fusion.fuse(p, titles[j:j + n])
        out[n] = (time.perf_counter() - t0) / reps * 1000
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--head-config", help="a run configuration (e.g. best_config.yaml of catalens search)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--no-multi", action="store_true", help="skip the three-backbone rows (embedding ~6 min)")
    args = ap.parse_args()
    loaded = default_features()
    if loaded is None:
        return
    from catalens.config import load_config
    from catalens.text.fusion import TextFusion, fit_weights
    from catalens.text.model import TitleModel
    from catalens.text.vectorizer import clean_titles

    cfg, d = loaded
    tasks = d["tasks"]
    Yv = sel(d["Y"], d["va"])
    rows, results = [], {}

    def add(name, probs_val, probs_test, seconds, decode=False, note=""):
        t = tune(tasks, Yv, probs_val)
        m = score(d, t, probs_test, decode)
        results[name] = m
        h = next(iter(m["hierarchy"].values()))
        rows.append([name, m["masterCategory"]["accuracy"], m["subCategory"]["accuracy"],
                     m["articleType"]["accuracy"], m["articleType"]["macro_f1"], m["pattern"]["micro_f1"],
                     h["consistent_share"], f"{seconds:.0f}", note])
        print(rows[-1], flush=True)

    # image only ---------------------------------------------------------------
    t0 = time.time()
    lin = fit_head(d, cfg.head)
    lin_s = time.time() - t0
    pv_lin, pt_lin = lin.predict_proba(d["X"][d["va"]]), lin.predict_proba(d["X"][d["te"]])
    add("image: frozen linear head (default)", pv_lin, pt_lin, lin_s)
    add("image: + hierarchy decoding", pv_lin, pt_lin, lin_s, decode=True)
    img_best = ("image: frozen linear head (default)", pv_lin, pt_lin)
    if not args.no_multi:  # three backbones side by side (catalens.embed.multi), whole photo kept
        from catalens.evaluate.metrics import compute_metrics

        mcfg = cfg.model_copy(deep=True)
        mcfg.backbone.name, mcfg.backbone.crop_pct = MULTI, 1.0
        dm = load(mcfg)
        t0 = time.time()
        multi = fit_head(dm, cfg.head)
        s = time.time() - t0
        pv_m, pt_m = multi.predict_proba(dm["X"][dm["va"]]), multi.predict_proba(dm["X"][dm["te"]])
        note = f"{MULTI}, crop 1.0; embedded in {dm['embed_s'] / 60:.1f} min"
        add("image: three backbones side by side (frozen)", pv_m, pt_m, s, note=note)
        add("image: three backbones + hierarchy decoding", pv_m, pt_m, s, decode=True)
        if compute_metrics(tasks, Yv, pv_m)["articleType"]["accuracy"] > \
                compute_metrics(tasks, Yv, img_best[1])["articleType"]["accuracy"]:  # chosen on val
            img_best = ("image: three backbones (frozen)", pv_m, pt_m)
    if args.head_config:
        tuned_cfg = load_config(args.head_config)
        t0 = time.time()
        tuned = fit_head(d, tuned_cfg.head, seed=tuned_cfg.seed)
        s = time.time() - t0
        pv_t, pt_t = tuned.predict_proba(d["X"][d["va"]]), tuned.predict_proba(d["X"][d["te"]])
        h = tuned_cfg.head
        note = (f"{h.type}, hidden {h.hidden}, lr {h.lr:.2g}, wd {h.weight_decay:.2g}, dropout {h.dropout:.2f}, "
                f"smoothing {h.label_smoothing:.2f}, weighting {h.class_weighting}")
        add("image: searched head (catalens search)", pv_t, pt_t, s, note=note)
        add("image: searched head + hierarchy decoding", pv_t, pt_t, s, decode=True)
        # the searched head is used for fusion only if it is better on val
        from catalens.evaluate.metrics import compute_metrics

        acc_v = compute_metrics(tasks, Yv, pv_t)["articleType"]["accuracy"]
        acc_l = compute_metrics(tasks, Yv, pv_lin)["articleType"]["accuracy"]
        if acc_v > acc_l:
            img_best = ("image: searched head (catalens search)", pv_t, pt_t)

    # titles only --------------------------------------------------------------
    Ttr, Tva, Tte = d["titles"][d["tr"]], d["titles"][d["va"]], d["titles"][d["te"]]
    models = {}
    for method, label in (("nb", "titles: word counts + Naive Bayes"),
                          ("logreg", "titles: TF-IDF word+char + logistic regression")):
        t0 = time.time()
        tm = TitleModel(tasks, method=method, C=cfg.text.C, max_iter=cfg.text.max_iter).fit(Ttr, sel(d["Y"], d["tr"]))
        s = time.time() - t0
        models[method] = tm
        pv, pt = tm.predict_proba(Tva), tm.predict_proba(Tte)
        add(label, pv, pt, s, note=f"{tm.vectorizer.n_features} n-grams")
        # fused ------------------------------------------------------------------
        _, has = clean_titles(Tva)
        w = fit_weights(tasks, img_best[1], pv, Yv, has)
        fu = TextFusion(tm, w)
        wnote = "weights (image, title) articleType " + f"({w['articleType']['image']:g}, {w['articleType']['text']:g})"
        add(f"fused: {img_best[0].split(': ')[1]} x {method}", fu.fuse(img_best[1], Tva), fu.fuse(img_best[2], Tte),
            s, note=wnote)
        if method == "logreg":
            fuse_ms = fusion_cost(fu, list(Tte), img_best[2])
            add("fused: + hierarchy decoding", fu.fuse(img_best[1], Tva), fu.fuse(img_best[2], Tte), s, decode=True)
            rng = np.random.default_rng(0)
            drop = rng.random(len(Tte)) < 0.5
            Tte_half = np.where(drop, None, Tte)
            add("fused, half of the test titles removed", fu.fuse(img_best[1], Tva), fu.fuse(img_best[2], Tte_half),
                s, note="rows without a title fall back to the image head")

    base = rows[0]
    shown = [[r[0], *[f"{v:.4f}" for v in r[1:7]], *r[7:]] for r in rows]
    headers = ["recipe", "master acc", "sub acc", "article acc", "article macro-F1", "pattern micro-F1",
               "consistent paths", "fit s", "notes"]
    gain = [[r[0], f"{r[1] - base[1]:+.4f}", f"{r[2] - base[2]:+.4f}", f"{r[3] - base[3]:+.4f}",
             f"{r[5] - base[5]:+.4f}"] for r in rows[1:]]
    tr, va, te = int(d["tr"].sum()), int(d["va"].sum()), int(d["te"].sum())
    body = (f"fashion-products, {tr} train / {va} val / {te} test images (test only scored; everything "
            f"tuned on val). Image features: frozen EfficientNet-Lite0 from the embedding cache "
            f"(loaded in {d['embed_s']:.1f}s), and for the 'three backbones' rows Lite0, Lite1 and Lite2 side "
            f"by side (`--backbone {MULTI} --crop-pct 1`). Fused rows use the image head that is better on val. Pattern tags come from title words, so titles nearly "
            f"determine them. 'consistent paths' = share of test images whose master > sub > article "
            f"prediction is a path seen in training. Fit times on 2 shared, busy cores.\n\n"
            + table(headers, shown)
            + "\n\nGain over the frozen linear head (test, absolute):\n\n"
            + table(["recipe", "master", "sub", "article", "pattern micro-F1"], gain)
            + f"\n\nCost of fusing titles at prediction time (TF-IDF word+char model, this process, one core): "
              f"{fuse_ms[1]:.2f} ms for one title, {fuse_ms[16] / 16:.3f} ms per title in calls of 16 "
              f"(what `catalens serve` adds to a request with titles)."
            + "\n\nTargets: articleType >= 0.93 image-only and >= 0.98 with titles, subCategory >= 0.99, "
              "masterCategory >= 0.998.")
    publish("bench_accuracy_fashion", "Accuracy recipes on fashion-products (test split)", body, write=not args.no_write)


if __name__ == "__main__":
    main()
