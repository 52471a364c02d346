"""Class imbalance on fashion-products articleType: what each remedy does to accuracy and macro-F1.

All runs fit the default linear head on the cached EfficientNet-Lite0 embeddings (train,
early stopping on val) and change one thing: class-weighted loss (balanced / sqrt), the
class-balanced sampler (balanced / sqrt), focal loss, or down-sampling of the largest
classes (``head.max_per_class``). Remedies are compared on val (the choice) and reported
on test. "tail" = articleTypes with fewer than 20 training images. Writes the
``bench_imbalance`` section of docs/benchmarks.md.

    python benchmarks/bench_imbalance.py [--no-write]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _report import publish, table  # noqa: E402
from bench_accuracy_fashion import default_features, fit_head, sel  # noqa: E402

RECIPES = [
    ("none (plain cross-entropy)", {}),
    ("class weights: sqrt", {"class_weighting": "sqrt"}),
    ("class weights: balanced", {"class_weighting": "balanced"}),
    ("sampler: sqrt", {"sampler": "sqrt"}),
    ("sampler: balanced", {"sampler": "balanced"}),
    ("focal loss, gamma 2", {"focal_gamma": 2.0}),
    ("down-sample to <= 200 / class", {"max_per_class": 200}),
    ("down-sample to <= 100 / class", {"max_per_class": 100}),
    ("sqrt weights + focal gamma 1", {"class_weighting": "sqrt", "focal_gamma": 1.0}),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    loaded = default_features()
    if loaded is None:
        return
    from catalens.config import HeadConfig
    from catalens.evaluate.metrics import compute_metrics
    from catalens.tasks import MISSING

    cfg, d = loaded
    art = next(t for t in d["tasks"] if t.name == "articleType")
    y_tr = d["Y"]["articleType"][d["tr"]]
    counts = np.bincount(y_tr[y_tr != MISSING], minlength=art.n_outputs)
    tail = np.flatnonzero(counts < 20)
    rows = []
    for name, change in RECIPES:
        head_cfg = HeadConfig(**{**cfg.head.model_dump(), **change})
        t0 = time.time()
        head = fit_head(d, head_cfg)
        s = time.time() - t0
        out = []
        for part in ("va", "te"):
            y = d["Y"]["articleType"][d[part]]
            p = head.predict_proba(d["X"][d[part]])["articleType"]
            m = compute_metrics([art], {"articleType": y}, {"articleType": p})["articleType"]
            in_tail = np.isin(y, tail)
            tail_acc = float((p.argmax(1)[in_tail] == y[in_tail]).mean()) if in_tail.any() else float("nan")
            out += [m["accuracy"], m["macro_f1"], tail_acc]
        rows.append([name, *[f"{v:.4f}" for v in out], head.best_epoch_, f"{s:.0f}"])
        print(rows[-1], flush=True)
    best_val = max(rows, key=lambda r: float(r[2]))
    headers = ["remedy", "val acc", "val macro-F1", "val tail acc", "test acc", "test macro-F1", "test tail acc",
               "best epoch", "fit s"]
    body = (f"articleType ({art.n_outputs} classes; training counts {counts.max()} down to {counts[counts > 0].min()}, "
            f"{len(tail)} classes with < 20 training images = 'tail'; {int(np.isin(d['Y']['articleType'][d['te']], tail).sum())} "
            f"test images are in the tail). Default linear head on cached embeddings; one change per row. "
            f"Best val macro-F1: **{best_val[0]}**.\n\n" + table(headers, rows))
    publish("bench_imbalance", "Class imbalance remedies (fashion-products articleType)", body, write=not args.no_write)


if __name__ == "__main__":
    main()
