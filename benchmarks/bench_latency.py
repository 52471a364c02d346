"""One photo, one answer: the wall time of ``catalens predict MODEL photo.jpg`` in a fresh process.

What a catalogue team does every day with a new photo, timed as the user sees it (process start,
imports, model load, decode, inference, the printed table), on the benchmark model
(``~/.cache/catalens/bench/clothing-model``: frozen EfficientNet-Lite0 + linear head, trained on
clothing-small once). Rows:

(a) ``catalens predict MODEL photo.jpg``: the printed table, answered through the model's ONNX
    graph (torch is not imported; the graph is exported into the runtime cache on the very first
    call, timed separately as "first call ever");
(b) the same with ``--runtime eager``: the torch path (timm + the model folder's weights);
(c) ``catalens predict ... --out one.parquet``: the streaming writer (torch engine);
(d) what a competent practitioner's one-off script pays: ``python -c "import torch, timm"`` and
    nothing else (a floor for any torch-based answer);
(e) ``python -c "import onnxruntime, PIL, numpy"``: the floor of the torch-free path.

Each row: the median of ``--repeat`` fresh processes (after one warm-up that fills the OS page
cache), and their min / max. The target (issue "one inference core"): (a) <= 3 s on this machine.

    python benchmarks/bench_latency.py [--repeat 5] [--no-write]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import SHARED_DATA, publish, table  # noqa: E402
from bench_serve import CACHE_MODEL, ensure_model  # noqa: E402

DATA = SHARED_DATA / "clothing-small"
PY = sys.executable


def timed(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    took = time.perf_counter() - t
    if r.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr[-2000:]}")
    return took


def measure(cmd: list[str], env: dict, repeat: int) -> tuple[float, float, float]:
    timed(cmd, env)  # warm-up: page cache, first-run exports
    runs = [timed(cmd, env) for _ in range(repeat)]
    return statistics.median(runs), min(runs), max(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    model = ensure_model(CACHE_MODEL, DATA)
    photo = sorted((DATA / "test").rglob("*.jpg"))[0]
    work = Path(tempfile.mkdtemp(prefix="catalens-latency-"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", CATALENS_CACHE=str(work / "cache"))
    try:
        from catalens.export.onnx import default_onnx_path, read_description
        from catalens.export.graph import model_hash

        own = default_onnx_path(model)
        current = own.exists() and read_description(own).get("source_model_sha256") == model_hash(model)
        first_what = ("first call with an empty runtime cache (MODEL/model.onnx is current: nothing to export; "
                      "the graph is compiled for this CPU once)" if current else
                      "first call ever (exports the graph into the runtime cache once)")
        cli = [PY, "-m", "catalens", "predict", str(model), str(photo)]
        first = timed(cli, env)
        rows = []
        for what, cmd in (
                ("(a) `catalens predict MODEL photo.jpg` (ONNX graph, no torch)", cli),
                ("(b) the same, `--runtime eager` (torch + timm)", cli + ["--runtime", "eager"]),
                ("(c) `--out one.parquet` (streaming writer, torch engine)",
                 cli + ["--out", str(work / "one.parquet"), "--no-progress"]),
                ("(d) floor of a torch answer: `python -c 'import torch, timm'`",
                 [PY, "-c", "import torch, timm"]),
                ("(e) floor of the graph path: `python -c 'import onnxruntime, PIL, numpy, pandas'`",
                 [PY, "-c", "import onnxruntime, PIL, numpy, pandas"])):
            med, lo, hi = measure(cmd, env, args.repeat)
            rows.append([what, f"{med:.2f}", f"{lo:.2f} - {hi:.2f}"])
            print(rows[-1], flush=True)
        rows.append([first_what, f"{first:.2f}", "-"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()[0]
    body = (f"One clothing-small test photo, benchmark model (frozen EfficientNet-Lite0 + linear head); "
            f"median of {args.repeat} fresh processes after a warm-up (1-min load average at the end: "
            f"{load:.1f} on {os.cpu_count()} CPUs). Target: (a) <= 3 s.\n\n"
            + table(["what", "wall s (median)", "min - max"], rows))
    publish("bench_latency", "One-photo latency: `catalens predict MODEL photo.jpg`", body, write=not args.no_write,
            command=f"python benchmarks/bench_latency.py --repeat {args.repeat}")


if __name__ == "__main__":
    main()
