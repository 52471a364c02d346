"""``catalens predict`` end to end: decode + backbone + heads + parquet, against a plain loop,
the machine's ceiling and the embedding engine; and its memory on 10,000 vs 100,000 rows.

In one process run, on clothing-small (3,781 real JPEGs) with the benchmark model
(``~/.cache/catalens/bench/clothing-model``: frozen EfficientNet-Lite0 + linear head):

(a) plain predict loop: Pillow full decode + torch eager backbone + the model's heads, rows
    collected in a list and written with pandas at the end (what a first script does);
(b) decode cost per core and sustained ONNX Runtime inference per core (as bench_engine),
    giving the ceiling ``C / (1/decode + 1/infer)``;
(c) ``predict_catalogue`` (what ``catalens predict`` runs: streaming, parts written
    atomically, merged into one parquet file), embedding cache off so every photo is decoded;
(d) ``embed_catalogue`` on the same photos (the engine without heads and parquet);
(e) peak RSS of ``predict_catalogue`` over N1 vs N2 rows (photo paths repeated) in fresh
    processes, with a model on a tiny random-weight backbone so 100,000 rows take minutes:
    prediction memory must not grow with the catalogue.

    python benchmarks/bench_predict.py [--rss-rows 10000,100000] [--no-write]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _report import SHARED_DATA, publish, table  # noqa: E402
from bench_engine import Clock, _hwm_mib, catalogue, decode_costs, infer_rate  # noqa: E402
from bench_serve import CACHE_MODEL, ensure_model  # noqa: E402

DATA = SHARED_DATA / "clothing-small"
QUIET = dict(log=lambda *_: None)


def plain_predict(paths: list[str], model, out: Path) -> Clock:
    """Full decode, torch eager, the heads, a list of dicts, pandas → parquet at the end."""
    import pandas as pd
    import torch
    from PIL import Image

    from catalens.ingest.images import resize_crop

    task = next(t for t in model.tasks if t.kind == "class")
    module = model.backbone.module.eval()
    rows = []
    with Clock() as clock, torch.inference_mode():
        for s in range(0, len(paths), 32):
            chunk = paths[s:s + 32]
            arrs = [resize_crop(Image.open(p).convert("RGB"), model.preprocess) for p in chunk]
            x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float().contiguous()
            probs = model.predict_proba_features(module(x).numpy())[task.name]
            for p, pr in zip(chunk, probs):
                rows.append({"path": p, task.name: task.classes[int(pr.argmax())], f"{task.name}_prob": float(pr.max())})
        pd.DataFrame(rows).to_parquet(out)
    return clock


def tiny_model(folder: Path) -> Path:
    """A model folder on a tiny random-weight timm backbone (memory run only)."""
    if (folder / "model.json").exists():
        return folder
    from catalens.config import load_config
    from catalens.train.pipeline import train

    cfg = load_config(None, [{"backbone": {"name": "test_efficientnet", "weights": "random"}, "tracking": False,
                              "engine": {"progress": False}, "head": {"epochs": 5},
                              "cache_dir": str(folder.parent / "tiny-cache")}])
    train(DATA, folder, cfg, **QUIET)
    return folder


def rss_child(rows: int, model_dir: str, out: str) -> None:
    """Predict ``rows`` rows (photo paths repeated) with cache off; write RSS figures as JSON."""
    import psutil

    from catalens.model.single import CatalensModel
    from catalens.config import load_config
    from catalens.predict.predictor import predict_catalogue
    from catalens.embed.features import engine_config

    paths = sorted(str(p) for p in DATA.rglob("*.jpg"))
    cat = catalogue((paths * -(-rows // len(paths)))[:rows])
    model = CatalensModel.load(model_dir)
    cfg = load_config(None, [{"engine": {"progress": False, "runtime": "onnx"}, "tracking": False}])
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        res = predict_catalogue(model, cat, Path(d) / "pred.parquet", cfg, engine=engine_config(cfg), use_cache=False,
                                **QUIET)
        dt = time.perf_counter() - t
        import pyarrow.parquet as pq

        n = pq.ParquetFile(res.path).metadata.num_rows
    Path(out).write_text(json.dumps({"rows": rows, "written": n, "seconds": dt, "peak_mib": _hwm_mib(),
                                     "end_mib": psutil.Process().memory_info().rss / 2**20}))


def rss_run(rows: int, model_dir: Path) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "rss.json"
        from catalens.runtime import tune_malloc_env

        subprocess.run([sys.executable, __file__, "--rss-child", str(rows), "--model", str(model_dir),
                        "--rss-out", str(out)], check=True, env=tune_malloc_env())   # as `catalens predict` runs
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rss-rows", default="10000,100000", help="two row counts for (e); empty: skip")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--rss-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        return rss_child(args.rss_child, args.model, args.rss_out)
    if not DATA.exists():
        sys.exit(f"benchmark photos not found at {DATA}")
    import pyarrow.parquet as pq

    from catalens.model.single import CatalensModel
    from catalens.config import load_config
    from catalens.embed import runtimes as rt
    from catalens.embed.engine import embed_catalogue
    from catalens.ingest.catalogue import read_file_bytes
    from catalens.ingest.images import load_rgb
    from catalens.predict.predictor import predict_catalogue
    from catalens.runtime import available_cpus
    from catalens.embed.features import engine_config

    cores = available_cpus()
    model = CatalensModel.load(ensure_model(CACHE_MODEL, DATA))
    paths = sorted(str(p) for p in DATA.rglob("*.jpg"))
    cat = catalogue(paths)
    cfg = load_config(None, [{"engine": {"progress": False}, "tracking": False}])
    sample = paths[:: max(1, len(paths) // 600)]
    dec = decode_costs(sample, model.backbone)["ours"]
    px = np.stack([load_rgb(read_file_bytes(p), model.preprocess) for p in sample[:192]])
    infer1 = infer_rate(rt.make_runner("onnx", model.backbone.module, px.shape[1], threads=1), px)[1]
    ceiling = cores / (1 / dec + 1 / infer1)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        plain = plain_predict(paths[::4], model, d / "plain.parquet")
        plain_rate = len(paths[::4]) / plain.wall
        with Clock() as pc:
            res = predict_catalogue(model, cat, d / "pred.parquet", cfg, engine=engine_config(cfg), use_cache=False,
                                    **QUIET)
        written = pq.ParquetFile(res.path).metadata.num_rows
        with Clock() as ec:
            embed_catalogue(cat, model.backbone, None, engine_config(cfg))
    n = len(paths)
    rows = [["(a) plain predict loop (full decode + torch eager + heads, pandas at the end)", f"{plain_rate:.1f}",
             "1.00x", f"{100 * plain_rate / ceiling:.0f}%"],
            [f"(c) predict_catalogue ({n} photos → {written} parquet rows, cache off)", f"{n / pc.wall:.1f}",
             f"{n / pc.wall / plain_rate:.2f}x", f"{100 * n / pc.wall / ceiling:.0f}%"],
            ["(d) embed_catalogue, same photos (no heads, no parquet)", f"{n / ec.wall:.1f}",
             f"{n / ec.wall / plain_rate:.2f}x", f"{100 * n / ec.wall / ceiling:.0f}%"]]
    body = (f"{n} clothing-small photos, model `clothing-model` (EfficientNet-Lite0 + linear head), {cores} cores, "
            f"default engine settings (runtime auto). Ceiling `{cores} / (1/{dec:.0f} + 1/{infer1:.1f})` = "
            f"{ceiling:.1f} img/s from the decode cost per core and ONNX Runtime's sustained rate per core, "
            f"measured here. Load average at the end: {os.getloadavg()[0]:.1f}.\n\n")
    body += table(["path", "img/s", "vs plain", "of ceiling"], rows)
    if args.rss_rows:
        n1, n2 = (int(x) for x in args.rss_rows.split(","))
        with tempfile.TemporaryDirectory() as d:
            tiny = tiny_model(Path(d) / "tiny-model")
            r1, r2 = rss_run(n1, tiny), rss_run(n2, tiny)
        body += (f"\n\nPeak RSS of `predict_catalogue` (fresh process each, with the malloc settings the CLI "
                 f"starts with, runtime onnx as `auto` picks here, cache off, parts of 8,192 rows merged into one "
                 f"file; tiny random-weight backbone `test_efficientnet` so the decode and parquet work "
                 f"dominate):\n\n")
        body += table(["rows", "rows written", "img/s", "peak RSS MiB", "vs first"],
                      [[f"{r['rows']:,}", f"{r['written']:,}", f"{r['rows'] / r['seconds']:.0f}", f"{r['peak_mib']:.0f}",
                        f"{100 * (r['peak_mib'] / r1['peak_mib'] - 1):+.1f}%"] for r in (r1, r2)])
    publish("bench_predict", "Predict end to end: plain loop, ceiling, memory", body, write=not args.no_write)


if __name__ == "__main__":
    main()
