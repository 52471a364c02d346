"""The embedding engine against a plain loop and against this machine's ceiling.

On ``shared/data/clothing-small`` (3,781 JPEGs, 400-900 px), in one process run:

(a) plain loop: Pillow full decode (no draft) + bicubic resize/crop + torch eager (default
    memory format, default threads), batch 32, one process;
(b) decode alone: our worker function (read, hash, draft decode, resize, crop) in images per
    CPU-second of one core; also the plain full decode and the pickle cost of shipping pixels;
(c) inference alone per runtime: img/s at batch 32 with 1 thread (per-core cost) and with all
    cores, on real pixels, plus the feature difference from eager;
(d) the ceiling: decode and inference share the C cores, so one image costs
    ``1/decode_per_core + 1/infer_per_core`` CPU-seconds and at best
    ``ceiling = C / (1/decode_per_core + 1/infer_per_core)`` images/s (the fastest runtime's
    1-thread rate; this assumes inference threads scale linearly. The "measured scaling"
    variant uses the all-core rate instead: ``C / (1/decode_per_core + C/infer_all_cores)``);
(e) the engine end to end (``embed_catalogue`` as ``catalens embed`` runs it, runtime ``auto``,
    a fresh temporary embedding cache, so no cache hits): img/s, ratio to (a) and to (d);
    plus a split table (decode workers x inference threads) on a subset;
(f) peak RSS while streaming N1 vs N2 rows (photo paths repeated, cache=None), each in a fresh
    subprocess, with RSS sampled every 10% of the stream.

Run: ``.venv/bin/python benchmarks/bench_engine.py [--limit N] [--rss-rows 10000,100000]``.
Other processes on a shared machine make every rate noisy; the load average is recorded.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import SHARED_DATA, publish, table  # noqa: E402

from catalens.embed import runtimes as rt  # noqa: E402
from catalens.embed.factory import create_backbone  # noqa: E402
from catalens.embed.cache import EmbeddingCache  # noqa: E402
from catalens.embed.decode import DecodeJob, decode_one, decode_rate  # noqa: E402
from catalens.embed.engine import EngineConfig, embed_catalogue, plan, stream_features  # noqa: E402
from catalens.ingest.catalogue import Catalogue, read_file_bytes  # noqa: E402
from catalens.ingest.images import load_rgb, resize_crop  # noqa: E402
from catalens.runtime import available_cpus  # noqa: E402

DATA = SHARED_DATA / "clothing-small"
MB = 2 ** 20


class Clock:
    """Wall time and CPU time of this process and its reaped children (decode workers)."""

    def __enter__(self):
        self.t, self.c = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.t, self._cpu() - self.c

    @staticmethod
    def _cpu() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}", file=sys.stderr, flush=True)


def catalogue(paths: list[str]) -> Catalogue:
    frame = pd.DataFrame({"id": [str(i) for i in range(len(paths))], "path": paths,
                          "product_id": [str(i) for i in range(len(paths))], "split": None, "text": None,
                          "row": range(len(paths))})
    return Catalogue(frame, [], DATA, "bench")


# ---------------------------------------------------------------- (a) plain loop

def plain_loop(paths: list[str], module, pre, batch: int = 32) -> Clock:
    """Full decode, resize, torch eager with its defaults (contiguous NCHW, all cores)."""
    torch.set_num_threads(available_cpus())
    with Clock() as clock, torch.inference_mode():
        for s in range(0, len(paths), batch):
            arrs = [resize_crop(Image.open(p).convert("RGB"), pre) for p in paths[s:s + batch]]
            x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float().contiguous()
            module(x)
    return clock


# ---------------------------------------------------------------- (b) decode

def decode_costs(paths: list[str], bb) -> dict:
    job = DecodeJob(reader=read_file_bytes, pre=bb.preprocess, hash_content=True)
    ours = decode_rate(paths, job)
    t = time.process_time()
    for p in paths:
        resize_crop(Image.open(p).convert("RGB"), bb.preprocess)
    full = len(paths) / (time.process_time() - t)
    block = [decode_one(i, p, job) for i, p in enumerate(paths[:128])]
    t = time.perf_counter()
    for _ in range(5):
        pickle.loads(pickle.dumps(block, protocol=pickle.HIGHEST_PROTOCOL))
    ipc_ms = (time.perf_counter() - t) / 5 / len(block) * 1e3
    sizes = [Image.open(p).size for p in paths[:300]]
    return {"ours": ours, "plain_full": full, "pickle_ms": ipc_ms,
            "short_side_median": float(np.median([min(s) for s in sizes]))}


# ---------------------------------------------------------------- (c) inference

def infer_rate(runner, px: np.ndarray, batch: int = 32, budget_s: float = 6.0) -> tuple[float, float]:
    """Sustained (img/s wall, img per CPU-second) of ``runner`` at ``batch``: distinct batches of
    real pixels in turn until ``budget_s``, totals over all of them (not the best batch: on a
    shared VM the best batch overstates what a long run gets)."""
    runner(px[:batch])
    n, k = 0, 0
    with Clock() as c:
        while n < 4 * batch or c_elapsed(c) < budget_s:
            s = (k * batch) % max(1, len(px) - batch + 1)
            runner(px[s:s + batch])
            n, k = n + batch, k + 1
    return n / c.wall, n / max(c.cpu, 1e-9)


def c_elapsed(clock: "Clock") -> float:
    return time.perf_counter() - clock.t


def inference_costs(bb, px: np.ndarray, runtimes: list[str], cores: int) -> dict:
    """Per runtime: {threads: (img/s wall, img per CPU-s)} for 1 thread and all cores, max abs diff vs eager."""
    out = {}
    ref = rt.make_runner("eager", bb.module, bb.preprocess.size)(px[:16])
    for name in runtimes:
        row = {}
        for threads in sorted({1, cores}):
            torch.set_num_threads(threads)
            runner = rt.make_runner(name, bb.module, bb.preprocess.size, threads=threads, fingerprint=bb.fingerprint())
            row[threads] = infer_rate(runner, px)
            if threads == cores:
                row["max_abs_diff"] = float(np.abs(runner(px[:16]) - ref).max())
            log(f"inference {name} threads={threads}: {row[threads][0]:.1f} img/s, {row[threads][1]:.1f} img/CPU-s")
        out[name] = row
    torch.set_num_threads(cores)
    return out


# ---------------------------------------------------------------- (f) RSS child

def _hwm_mib(pid: int | str = "self") -> float:
    """Peak resident set of a process (VmHWM; reset by exec, unlike ru_maxrss)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def rss_child(rows: int, backbone: str, weights: str | None, out: str) -> None:
    """Stream ``rows`` rows (photo paths repeated) with cache=None; write RSS figures as JSON.

    Main process: VmHWM. Workers: their VmHWM and the PSS of main + workers (shared pages
    counted once), sampled every 0.25 s by a background thread.
    """
    import threading

    paths = sorted(str(p) for p in DATA.rglob("*.jpg"))
    reps = -(-rows // len(paths))
    cat = catalogue((paths * reps)[:rows])
    bb = create_backbone(backbone, weights)
    proc = psutil.Process()
    peak = {"worker_hwm": 0.0, "pss_total": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.25):
            try:
                kids = proc.children(recursive=True)
                pss = proc.memory_full_info().pss
                for c in kids:
                    try:
                        pss += c.memory_full_info().pss
                        peak["worker_hwm"] = max(peak["worker_hwm"], _hwm_mib(c.pid))
                    except psutil.Error:
                        pass
                peak["pss_total"] = max(peak["pss_total"], pss / MB)
            except psutil.Error:
                pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    samples, done, nxt = [], 0, 0.1
    t = time.perf_counter()
    cfg = EngineConfig(runtime="eager" if weights == "random" else "auto", progress=False)
    with torch.inference_mode():
        for b in stream_features(cat, bb, None, cfg):
            done += len(b.rows)
            if done >= nxt * rows:
                samples.append((round(done / rows, 2), proc.memory_info().rss / MB))
                nxt += 0.1
    dt = time.perf_counter() - t
    stop.set()
    sampler.join()
    Path(out).write_text(json.dumps({"rows": rows, "seconds": dt, "samples": samples, "peak_main_mib": _hwm_mib(),
                                     "peak_worker_mib": peak["worker_hwm"], "peak_pss_total_mib": peak["pss_total"],
                                     "workers": plan(cfg).workers}))


def rss_run(rows: int, backbone: str, weights: str | None) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "rss.json"
        cmd = [sys.executable, __file__, "--rss-child", str(rows), "--rss-backbone", backbone, "--rss-out", str(out)]
        if weights:
            cmd += ["--rss-weights", weights]
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())


# ---------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, help="images of clothing-small to use (default all)")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--runtimes", default=None, help="runtimes for (c); default: auto's candidates")
    ap.add_argument("--split-limit", type=int, default=640, help="images per configuration in the split table (0: skip)")
    ap.add_argument("--rss-rows", default="2000,20000",
                    help="two row counts for (f), e.g. 10000,100000 (default scaled down 5x for time); empty: skip")
    ap.add_argument("--rss-backbone", default="test_efficientnet",
                    help="backbone for (f); default a tiny random-weight timm net so 100k rows take minutes")
    ap.add_argument("--rss-weights", default="random")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of (a) and (e)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    ap.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--rss-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(args.rss_child, args.rss_backbone, args.rss_weights, args.rss_out)
        return
    if not DATA.exists():
        sys.exit(f"clothing-small not found at {DATA} (set CATALENS_SHARED_DATA)")

    t_start = time.perf_counter()
    cores = available_cpus()
    paths = sorted(str(p) for p in DATA.rglob("*.jpg"))
    if args.limit:
        paths = paths[:: max(1, len(paths) // args.limit)][: args.limit]
    n = len(paths)
    bb = create_backbone(args.backbone)
    plain_module = create_backbone(args.backbone).module.eval()  # a fresh copy: default memory format
    loads = [os.getloadavg()[0]]
    log(f"{n} images, {cores} cores, {rt.cpu_model()}, native bf16: {rt.has_native_bf16()}")

    # (b) decode alone (CPU time of one core), on a spread sample
    sample = paths[:: max(1, n // 600)]
    dec = decode_costs(sample, bb)
    log(f"decode: ours {dec['ours']:.0f} img/s/core, plain full decode {dec['plain_full']:.0f}, "
        f"pickle {dec['pickle_ms']:.2f} ms/img")
    # (c) inference alone, on real pixels
    px = np.stack([load_rgb(read_file_bytes(p), bb.preprocess) for p in sample[:192]])
    runtimes = args.runtimes.split(",") if args.runtimes else rt.auto_candidates()
    inf = inference_costs(bb, px, runtimes, cores)

    # (a) and (e) interleaved in rounds over interleaved thirds of the photos, so that the load
    # other processes put on a shared machine hits both alike
    cfg = EngineConfig(progress=False)
    eng, pl_ = [], []
    for k in range(args.rounds):
        part = paths[k::args.rounds]
        with tempfile.TemporaryDirectory() as d:
            cache = EmbeddingCache(d, bb.fingerprint(), bb.feature_dim)
            with Clock() as c:
                emb = embed_catalogue(catalogue(part), bb, cache, cfg)
        eng.append(c)
        from catalens.embed.engine import _RUNNER_CACHE
        chosen = next(iter(_RUNNER_CACHE.values()))[1]
        log(f"round {k + 1}/{args.rounds} engine: {len(part) / c.wall:.1f} img/s, {len(part) / c.cpu:.1f} img/CPU-s "
            f"({chosen.name}); {int((~emb.ok).sum())} failed")
        c = plain_loop(part, plain_module, bb.preprocess)
        pl_.append(c)
        log(f"round {k + 1}/{args.rounds} plain loop: {len(part) / c.wall:.1f} img/s, {len(part) / c.cpu:.1f} img/CPU-s")
        loads.append(os.getloadavg()[0])
    pl = plan(cfg, n)
    e_wall, e_cpu = n / sum(c.wall for c in eng), n / sum(c.cpu for c in eng)
    p_wall, p_cpu = n / sum(c.wall for c in pl_), n / sum(c.cpu for c in pl_)

    # (d) ceiling from single-core costs
    best_rt = max(inf, key=lambda k: inf[k][1][1])
    i1, d1 = inf[best_rt][1][1], dec["ours"]
    ic_wall = inf[best_rt][cores][0]
    ceiling = cores / (1 / d1 + 1 / i1)
    ceiling_scaled = cores / (1 / d1 + cores / ic_wall)
    ceiling_cpu = 1 / (1 / d1 + 1 / i1)  # images per CPU-second

    # split table
    splits = []
    if args.split_limit:
        sub = catalogue(paths[:: max(1, n // args.split_limit)][: args.split_limit])
        for mode, w, th in [("threads", cores, cores), ("processes", 1, cores), ("processes", 1, max(1, cores - 1)),
                            ("processes", 2, cores), ("threads", 0, cores)]:
            c_ = EngineConfig(workers=w, threads=th, decode=mode, runtime=chosen.name, progress=False)
            with Clock() as c, torch.inference_mode():
                for _ in stream_features(sub, bb, None, c_):
                    pass
            label = "main thread" if w == 0 else f"{w} {mode}"
            splits.append([label, th, f"{len(sub) / c.wall:.1f}", f"{len(sub) / c.cpu:.1f}"])
            log(f"split decode={label} threads={th}: {len(sub) / c.wall:.1f} img/s, {len(sub) / c.cpu:.1f} img/CPU-s")

    # (f) RSS
    rss = []
    if args.rss_rows:
        for rows in [int(x) for x in args.rss_rows.split(",")]:
            log(f"RSS run: {rows} rows with {args.rss_backbone} ...")
            r = rss_run(rows, args.rss_backbone, args.rss_weights)
            rss.append(r)
            log(f"RSS {rows}: peak main {r['peak_main_mib']:.0f} MiB, worker {r['peak_worker_mib']:.0f} MiB, "
                f"{rows / r['seconds']:.0f} img/s")

    total = time.perf_counter() - t_start
    body = [f"{n} photos of clothing-small (median short side {dec['short_side_median']:.0f} px), backbone "
            f"{bb.name}, {cores} cores ({rt.cpu_model()}, native bf16: {rt.has_native_bf16()}). "
            f"Load average 1 min during the run (other processes share the machine): "
            f"{', '.join(f'{x:.1f}' for x in loads)}; whole run {total / 60:.1f} min. "
            f"img/s is wall-clock; img/CPU-s counts the CPU time of the process and its decode workers, "
            f"which other processes' load does not change: on a busy machine it is the fair comparison. "
            f"(a) and (e) ran interleaved in {args.rounds} rounds over interleaved parts of the photos.", ""]
    body.append(table(["stage", "img/s", "img/CPU-s", "note"], [
        ["(a) plain loop: full decode + torch eager, batch 32, 1 process", f"{p_wall:.1f}", f"{p_cpu:.1f}", "baseline"],
        ["(b) decode, ours (read + hash + draft decode + resize + crop)", "", f"{d1:.0f}", "one core"],
        ["(b) decode, plain full decode + resize + crop", "", f"{dec['plain_full']:.0f}", "one core"],
        *[[f"(c) inference {k}, batch 32, {th} thread{'s' if th > 1 else ''}", f"{v[th][0]:.1f}", f"{v[th][1]:.1f}",
           f"max abs diff vs eager {v['max_abs_diff']:.1e}" if th == cores else ""]
          for k, v in inf.items() for th in sorted({1, cores})],
        [f"(d) ceiling = {cores} / (1/{d1:.0f} + 1/{i1:.1f}) [{best_rt}]", f"{ceiling:.1f}", f"{ceiling_cpu:.1f}",
         "single-core costs, linear scaling"],
        [f"(d) ceiling with measured scaling = {cores} / (1/{d1:.0f} + {cores}/{ic_wall:.1f})", f"{ceiling_scaled:.1f}", "", ""],
        [f"(e) engine end to end ({chosen.name}, decode: {pl.workers} {pl.decode}, {pl.threads} inference threads)",
         f"{e_wall:.1f}", f"{e_cpu:.1f}",
         f"wall: {e_wall / p_wall:.2f}x plain, {100 * e_wall / ceiling:.0f}% of ceiling "
         f"({100 * e_wall / ceiling_scaled:.0f}% of measured-scaling ceiling); CPU: {e_cpu / p_cpu:.2f}x plain, "
         f"{100 * e_cpu / ceiling_cpu:.0f}% of ceiling"],
    ]))
    body.append(f"\nShipping decoded pixels from a worker through the pool pipe (pickle round trip): "
                f"{dec['pickle_ms']:.2f} ms per image.")
    if splits:
        body.append(f"\nCore split on {len(sub)} photos ({chosen.name}). Decode threads run in this process, a "
                    f"block at a time, alternating with inference (each phase has every core); decode processes "
                    f"run ahead of inference, overlapping it; main thread = one thread, no overlap:\n")
        body.append(table(["decode", "inference threads", "img/s", "img/CPU-s"], splits))
    if rss:
        body.append(f"\nPeak RSS streaming N rows (clothing-small paths repeated, cache=None, backbone "
                    f"{args.rss_backbone} weights={args.rss_weights}: the engine's memory does not depend on the "
                    f"network, and a tiny one keeps {max(r['rows'] for r in rss):,} rows within minutes). "
                    f"Rows {' vs '.join(format(r['rows'], ',') for r in rss)}"
                    f"{'' if [r['rows'] for r in rss] == [10000, 100000] else ' (scaled down from 10,000 vs 100,000 to keep the run short; --rss-rows 10000,100000 for the full size)'}. "
                    f"Each in a fresh process:\n")
        rows = []
        for r in rss:
            s10, s100 = r["samples"][0], r["samples"][-1]
            rows.append([f"{r['rows']:,}", f"{r['rows'] / r['seconds']:.0f}", f"{r['peak_main_mib']:.0f}",
                         f"{100 * (r['peak_main_mib'] / rss[0]['peak_main_mib'] - 1):+.1f}%",
                         f"{r['peak_worker_mib']:.0f} x {r['workers']}", f"{r['peak_pss_total_mib']:.0f}",
                         f"{100 * (r['peak_pss_total_mib'] / rss[0]['peak_pss_total_mib'] - 1):+.1f}%",
                         f"{s10[1]:.0f} / {s100[1]:.0f}"])
        body.append(table(["rows", "img/s", "peak main RSS MiB", "vs first", "peak worker RSS MiB",
                           "peak PSS main+workers MiB", "vs first", "main RSS at 10% / 100% MiB"], rows))
    text = "\n".join(body)
    publish("bench_engine", "Embedding engine: plain loop, ceiling, engine, memory", text, write=not args.no_write)


if __name__ == "__main__":
    main()
