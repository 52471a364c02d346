"""Lossy paths checked on real photos: bf16 autocast and int8 ONNX against fp32.

On the clothing-small ``test`` split (372 real JPEGs) with a frozen EfficientNet-Lite0 model
(``~/.cache/catalens/bench/clothing-model``, trained once by ``catalens train``):

- features of every runtime the engine can run (``eager`` fp32 = reference, ``onnx`` fp32,
  ``bf16`` autocast): max abs difference, lowest cosine similarity with fp32;
- the model's heads on those features: top-1 agreement with fp32 and test accuracy;
- throughput at batch 32 on all cores and the runtime ``auto`` picks here (with the
  cosine it checked before allowing bf16);
- the exported int8 ONNX graph (``catalens export --int8``, static QDQ calibrated on training
  photos) end to end: top-1 agreement, accuracy, throughput, against the fp32 graph.

    python benchmarks/bench_precision.py [--no-write]
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

import numpy as np  # noqa: E402
from _report import SHARED_DATA, publish, table  # noqa: E402
from bench_serve import CACHE_MODEL, ensure_model  # noqa: E402

DATA = SHARED_DATA / "clothing-small"


def rate(fn, x: np.ndarray, budget_s: float = 4.0) -> float:
    """Best img/s of ``fn`` on batch ``x`` over a few runs (after one warm-up)."""
    fn(x)
    best, spent = 0.0, 0.0
    while spent < budget_s:
        t = time.perf_counter()
        fn(x)
        dt = time.perf_counter() - t
        best, spent = max(best, len(x) / dt), spent + dt
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if not DATA.exists():
        sys.exit(f"benchmark photos not found at {DATA}")
    import torch

    from catalens.model.single import CatalensModel
    from catalens.embed import runtimes as rt
    from catalens.ingest.images import load_rgb
    from catalens.runtime import available_cpus

    cores = available_cpus()
    model = CatalensModel.load(ensure_model(CACHE_MODEL, DATA))
    task = next(t for t in model.tasks if t.kind == "class")
    files = sorted(p for p in (DATA / "test").rglob("*.jpg"))
    truth = np.array([task.classes.index(p.parent.name) for p in files])
    px = np.stack([load_rgb(p.read_bytes(), model.preprocess) for p in files])  # (n, S, S, 3) uint8
    size = px.shape[1]
    torch.set_num_threads(cores)

    def head(feats: np.ndarray) -> np.ndarray:
        return model.predict_proba_features(feats)[task.name]

    def features(runner) -> np.ndarray:
        return np.concatenate([runner(px[s:s + 32]) for s in range(0, len(px), 32)])

    rows, ref = [], None
    with tempfile.TemporaryDirectory() as d:
        for name in ["eager", "onnx", "bf16"]:
            runner = rt.make_runner(name, model.backbone.module, size, threads=cores, cache_dir=d)
            f = features(runner)
            ref = f if ref is None else ref
            cos = (f * ref).sum(1) / (np.linalg.norm(f, axis=1) * np.linalg.norm(ref, axis=1))
            p, p_ref = head(f).argmax(1), head(ref).argmax(1)
            rows.append([name, f"{np.abs(f - ref).max():.2e}", f"{cos.min():.5f}", f"{(p == p_ref).mean():.4f}",
                         f"{(p == truth).mean():.4f}", f"{rate(runner, px[:32]):.1f}"])
            print(rows[-1], flush=True)
        _, entry = rt.choose_runtime(model.backbone.module, size, threads=cores, cache_dir=d,
                                     fingerprint="bench-precision", remeasure=True)
    body = (f"{len(files)} clothing-small test photos, EfficientNet-Lite0 frozen + linear head, "
            f"{cores} threads, batch 32. Reference: torch eager fp32. CPU native bf16: "
            f"{rt.has_native_bf16()}.\n\n")
    body += table(["runtime", "max abs feature diff", "min cosine", "top-1 agreement", "test accuracy",
                   "img/s (batch 32)"], rows)
    body += (f"\n\n`auto` here picks **{entry['runtime']}** (measured img/s {entry['img_per_s']}; "
             f"bf16 allowed only when its features on two synthetic probe images keep cosine >= "
             f"{rt.LOSSY_MIN_COSINE['bf16']} with fp32, a guard against broken paths; the real-photo check is "
             f"the table above: "
             f"measured {entry.get('min_cosine_vs_fp32')}).")
    body += "\n\n" + int8_section(Path(CACHE_MODEL), px, truth, task.name)
    publish("bench_precision", "Lossy paths on real photos: bf16 and int8 vs fp32", body, write=not args.no_write)


def int8_section(folder: Path, px: np.ndarray, truth: np.ndarray, task: str) -> str:
    """fp32 vs int8 exported graphs (``catalens export --int8``) on the test photos' pixels."""
    from catalens.export.onnx import OnnxModel, ensure_onnx
    from catalens.export.quantize import cpu_has_vnni, quantize_int8, throughput

    fp32 = ensure_onnx(folder, log=lambda *_: None)
    int8 = folder / "model.int8.onnx"
    if not int8.exists():
        quantize_int8(folder, log=lambda *_: None)
    out, ref = [], None
    for name, path in (("fp32 graph", fp32), ("int8 graph (static QDQ)", int8)):
        m = OnnxModel(path)
        pred = m.run_hwc(px)[task].argmax(1)
        ref = pred if ref is None else ref
        out.append([name, f"{(pred == ref).mean():.4f}", f"{(pred == truth).mean():.4f}",
                    f"{throughput(m, px):.1f}", f"{path.stat().st_size / 2**20:.1f}"])
        print(out[-1], flush=True)
    return (f"Exported graphs end to end (pixels → probabilities), ONNX Runtime, all cores; CPU int8 dot "
            f"products (VNNI/AMX): {cpu_has_vnni()}.\n\n"
            + table(["exported graph", "top-1 agreement with fp32", "test accuracy", "img/s (batch 32)", "size MiB"],
                    out))


if __name__ == "__main__":
    main()
