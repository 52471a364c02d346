"""The embedding engine on a CUDA GPU, against the CPU runtimes of the same machine.

On fashion-products (5,968 real product JPEGs), for each backbone:

(a) engine throughput: ``embed_catalogue`` (decode + backbone, no embedding cache) with
    runtime ``cuda`` (what ``auto`` picks where a GPU is present), ``cuda-bf16``, and the
    CPU's own ``auto`` choice on every core (on ``--cpu-limit`` photos: the CPU is slow);
(b) GPU inference alone, on pixels decoded beforehand, at batch 32 and 256: the ceiling that
    decoding on the host's cores has to feed;
(c) fidelity: per-photo cosine of the GPU features with CPU eager fp32 features (min, mean)
    on 256 photos;
(d) engine settings on the GPU (first backbone): decode workers, rows per decode block and
    batch size, with a runner that returns zeros (the decode + transfer ceiling) and with the
    real one; the seconds spent inside the runner show which side bounds the run.

Every runner is warmed up (cuDNN and CUDA's lazy kernel loading cost seconds on the first
batches of each shape) before it is timed.

Without a GPU it prints why and writes nothing: the project never needs one.

    python benchmarks/bench_cuda.py [--backbones efficientnet_lite0,efficientnet_lite2] [--no-write]
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
from _report import SHARED_DATA, publish, table  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "examples" / "fashion-products.yaml"


def warm_up(runner, size: int, batches=(32, 16)) -> None:
    """First calls of each batch shape: cuDNN set-up, lazy kernel loading (seconds on a GPU)."""
    rng = np.random.default_rng(0)
    for b in batches:
        for _ in range(2):
            runner(rng.integers(0, 256, (b, size, size, 3), np.uint8))


def engine_rate(cat, backbone, runtime: str, **settings) -> tuple[float, str]:
    """Photos per second of ``embed_catalogue`` over ``cat`` with ``runtime``; the runner's name."""
    from catalens.embed.engine import EngineConfig, embed_catalogue, engine_runner, plan

    cfg = EngineConfig(runtime=runtime, progress=False, **settings)
    runner = engine_runner(backbone, cfg, plan(cfg).threads)  # built (and chosen) before timing, then reused
    warm_up(runner, backbone.preprocess.size, sorted({cfg.batch_size, len(cat) % cfg.batch_size or cfg.batch_size}))
    t = time.perf_counter()
    out = embed_catalogue(cat, backbone, None, cfg)
    dt = time.perf_counter() - t
    assert out.ok.all(), f"{(~out.ok).sum()} photos failed"
    return len(cat) / dt, runner.name


class TimedRunner:
    """The engine's runner for the next runs replaced by ``fn`` (zeros or the real runner), timed."""

    def __init__(self, fn, dim: int | None = None) -> None:
        self.fn, self.dim, self.seconds = fn, dim, 0.0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        t = time.perf_counter()
        out = self.fn(batch) if self.fn is not None else np.zeros((len(batch), self.dim), np.float32)
        self.seconds += time.perf_counter() - t
        return out

    def __enter__(self):
        import catalens.embed.engine as eng

        self._saved = eng.engine_runner
        eng.engine_runner = lambda *a, **k: self
        return self

    def __exit__(self, *exc) -> None:
        import catalens.embed.engine as eng

        eng.engine_runner = self._saved


def settings_table(cat, backbone) -> list[list]:
    """(d): decode + transfer ceiling and the real engine under several engine settings."""
    from catalens.embed.engine import EngineConfig, embed_catalogue, plan
    from catalens.embed.runtimes import make_runner

    real = make_runner("cuda", backbone.module, backbone.preprocess.size)
    warm_up(real, backbone.preprocess.size, (16, 32, 64, 128))
    default = plan(EngineConfig(runtime="cuda"))
    rows = []
    for kind, kw in [("zeros", {}), ("zeros", {"block_rows": 32}), ("zeros", {"decode": "threads"}),
                     ("cuda", {}), ("cuda", {"block_rows": 32}), ("cuda", {"workers": 8}),
                     ("cuda", {"batch_size": 128}), ("cuda", {"batch_size": 128, "block_rows": 256})]:
        with TimedRunner(real if kind == "cuda" else None, backbone.feature_dim) as r:
            cfg = EngineConfig(runtime="cuda", progress=False, **kw)
            t = time.perf_counter()
            embed_catalogue(cat, backbone, None, cfg)
            dt = time.perf_counter() - t
        p = plan(cfg)
        rows.append([kind, p.decode, p.workers, cfg.block_rows, cfg.batch_size, f"{len(cat) / dt:.0f}",
                     f"{r.seconds:.2f} of {dt:.2f}"])
        print(rows[-1], flush=True)
    rows[0][0] += f" (default plan: {default.workers} {default.decode})"
    return rows


def gpu_infer_rate(backbone, pixels: np.ndarray, runtime: str, batch: int) -> float:
    """Photos per second of the ``runtime`` runner alone on decoded ``pixels`` (after a warm-up)."""
    import torch

    from catalens.embed.runtimes import make_runner

    r = make_runner(runtime, backbone.module, backbone.preprocess.size)
    reps = max(1, 1024 // len(pixels)) if len(pixels) < 1024 else 1
    data = np.concatenate([pixels] * reps)
    r(data[:batch])
    torch.cuda.synchronize()
    t = time.perf_counter()
    for s in range(0, len(data), batch):
        r(data[s:s + batch])
    torch.cuda.synchronize()
    return len(data) / (time.perf_counter() - t)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbones", default="efficientnet_lite0,efficientnet_lite2")
    ap.add_argument("--limit", type=int, default=None, help="photos for the GPU rows of (a) (default all)")
    ap.add_argument("--cpu-limit", type=int, default=768, help="photos for the CPU row of (a)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("bench_cuda: torch sees no CUDA GPU here; skipped (the CPU runtimes are in bench_engine)")
        return
    if not (SHARED_DATA / "fashion-products").exists():
        print(f"fashion-products not found under {SHARED_DATA}; skipped")
        return
    from catalens.embed.factory import create_backbone
    from catalens.embed.runtimes import choose_runtime, make_runner
    from catalens.ingest.images import load_rgb
    from catalens.ingest.open import open_catalogue

    cat = open_catalogue(DATA)
    if args.limit:
        cat = cat.subset(np.arange(len(cat)) < args.limit)
    cpu_cat = cat.subset(np.arange(len(cat)) < args.cpu_limit)
    rows, fid = [], []
    for name in args.backbones.split(","):
        bb = create_backbone(name)
        paths = list(cat.frame["path"][:256])
        px = np.stack([load_rgb(Path(p).read_bytes(), bb.preprocess) for p in paths])
        for runtime in ("cuda", "cuda-bf16"):
            rate, ran = engine_rate(cat, bb, runtime)
            rows.append([name, f"engine, runtime {runtime}", len(cat), f"{rate:.0f}"])
            for batch in (32, 256):
                rows.append([name, f"inference only, {ran}, batch {batch}", 1024,
                             f"{gpu_infer_rate(bb, px, runtime, batch):.0f}"])
            print(rows[-3:], flush=True)
        cpu_choice, _ = choose_runtime(bb.module, bb.preprocess.size)  # what auto picks on a CPU-only machine
        rate, ran = engine_rate(cpu_cat, bb, cpu_choice.name)
        rows.append([name, f"engine, CPU auto ({ran}, {os.cpu_count()} cores)", len(cpu_cat), f"{rate:.0f}"])
        print(rows[-1], flush=True)
        ref = make_runner("eager", bb.module, bb.preprocess.size)(px)
        for runtime in ("cuda", "cuda-bf16"):
            c = cosines(ref, make_runner(runtime, bb.module, bb.preprocess.size)(px))
            fid.append([name, runtime, f"{c.min():.5f}", f"{c.mean():.5f}"])
    st = settings_table(cat, create_backbone(args.backbones.split(",")[0]))
    body = ("Photos per second; the engine rows decode every JPEG on the host's cores "
            "(fashion-products photos are 224 px, so decoding is cheap) and run the backbone on the GPU "
            "(`cuda`, the runtime `auto` picks where a GPU is present) or on the CPU.\n\n"
            + table(["backbone", "what", "photos", "photos/s"], rows)
            + "\n\nFidelity of the GPU features against CPU eager fp32 on 256 photos (cosine per photo):\n\n"
            + table(["backbone", "runtime", "min cosine", "mean cosine"], fid)
            + f"\n\nEngine settings on the GPU ({args.backbones.split(',')[0]}, {len(cat)} photos; `zeros`: a runner "
              "that returns zeros, i.e. the decode + transfer ceiling):\n\n"
            + table(["runner", "decode", "workers", "block rows", "batch", "photos/s", "s in the runner"], st))
    publish("bench_cuda", "The embedding engine on a GPU", body, write=not args.no_write)


if __name__ == "__main__":
    main()
