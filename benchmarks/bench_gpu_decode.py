"""The GPU decode path (catalens.embed.gpu_decode) against the CPU path, on real photos.

On ``--n`` clothing-small photos spread over the folders, EfficientNet-Lite0 224 px:

(1) pixels: ``decode_batch`` (device decode + torch resize/crop) vs ``load_rgb`` with Pillow, and
    vs simplejpeg: max / mean / 99th percentile of the absolute difference in grey levels;
(2) features (eager): lowest and mean cosine; and the top-1 agreement of Lite0's own frozen
    ImageNet classifier on the two paths' pixels;
(3) on a CUDA machine only: photos/s of ``decode_batch`` on the GPU (batches of ``--batch``) vs
    the CPU path in this process.

The device decoder is torchvision's ``decode_jpeg`` (nvJPEG on CUDA) where it loads; where it does
not (a CUDA build of torchvision next to a CPU torch, as on the 2-core VM), the Pillow stand-in
(:func:`catalens.embed.gpu_decode.pillow_decoder`, full-resolution decode) on the CPU, which checks
everything but the nvJPEG call itself. The table says which ran.

Run: ``.venv/bin/python benchmarks/bench_gpu_decode.py [--n 100]``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import SHARED_DATA, publish, table  # noqa: E402

from catalens.embed.backbones import FeatureExtractor, _lite_weights, _load_in_order  # noqa: E402
from catalens.embed.factory import create_backbone  # noqa: E402
from catalens.embed.gpu_decode import decode_batch, device_decoder, pillow_decoder  # noqa: E402
from catalens.ingest.images import load_rgb  # noqa: E402
from catalens.runtime import import_timm  # noqa: E402

DATA = SHARED_DATA / "clothing-small"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}", file=sys.stderr, flush=True)


def classifier(pre) -> FeatureExtractor:
    """Lite0 with its ImageNet classifier (frozen): pixels -> 1000 logits."""
    net = import_timm().create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    _load_in_order(net, torch.load(str(_lite_weights(0)), map_location="cpu", weights_only=True))
    return FeatureExtractor(net.eval(), pre).eval()


def run(module, px: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate([module(torch.from_numpy(px[s:s + 32]).permute(0, 3, 1, 2).float()).numpy()
                               for s in range(0, len(px), 32)])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if not DATA.exists():
        sys.exit(f"clothing-small not found at {DATA} (set CATALENS_SHARED_DATA)")
    files = sorted(DATA.rglob("*.jpg"))
    files = files[:: max(1, len(files) // args.n)][: args.n]
    datas = [p.read_bytes() for p in files]
    bb = create_backbone("efficientnet_lite0")
    pre = bb.preprocess
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    try:
        decoder, which = device_decoder(device), f"torchvision {torch.__version__} decode_jpeg on {device}"
    except RuntimeError as e:
        log(f"device decoder unavailable: {e}")
        decoder = pillow_decoder()
        which = "the Pillow stand-in on the CPU (torchvision's image extension does not load here)"
    loads = [os.getloadavg()[0]]
    out = decode_batch(datas, pre, device, decoder=decoder, jpeg="pillow")
    got = out.pixels.cpu().numpy()
    refs = {"pillow": np.stack([load_rgb(d, pre, jpeg="pillow") for d in datas]),
            "simplejpeg": np.stack([load_rgb(d, pre, jpeg="simplejpeg") for d in datas])}
    clf = classifier(pre)
    f_dev, l_dev = run(bb.module, got), run(clf, got)
    rows = []
    for name, ref in refs.items():
        diff = np.abs(got.astype(int) - ref.astype(int))
        f_ref, l_ref = run(bb.module, ref), run(clf, ref)
        cos = cosines(f_ref, f_dev)
        agree = float((l_ref.argmax(1) == l_dev.argmax(1)).mean())
        rows.append([f"device path vs CPU path ({name})", int(diff.max()), f"{diff.mean():.3f}",
                     int(np.percentile(diff, 99)), f"{cos.min():.4f}", f"{cos.mean():.5f}", f"{agree:.3f}"])
        log(" | ".join(map(str, rows[-1])))
    diff = np.abs(refs["pillow"].astype(int) - refs["simplejpeg"].astype(int))
    f_p, f_s = run(bb.module, refs["pillow"]), run(bb.module, refs["simplejpeg"])
    cos = cosines(f_p, f_s)
    agree = float((run(clf, refs["pillow"]).argmax(1) == run(clf, refs["simplejpeg"]).argmax(1)).mean())
    rows.append(["for scale: simplejpeg vs Pillow (both CPU)", int(diff.max()), f"{diff.mean():.3f}",
                 int(np.percentile(diff, 99)), f"{cos.min():.4f}", f"{cos.mean():.5f}", f"{agree:.3f}"])
    loads.append(os.getloadavg()[0])
    body = [f"{len(files)} clothing-small photos spread over the folders, EfficientNet-Lite0 224 px (resize 256, "
            f"centre crop); {int(out.on_device.sum())} of them decoded by the device path. Device decoder: "
            f"{which}. Load average 1 min {', '.join(f'{x:.1f}' for x in loads)}.", ""]
    body.append(table(["pixels", "max abs diff", "mean abs diff", "99th pct", "min feature cosine",
                       "mean feature cosine", "ImageNet top-1 agreement (frozen Lite0 classifier)"], rows))
    if cuda:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for s in range(0, len(datas), args.batch):
            decode_batch(datas[s:s + args.batch], pre, device, decoder=decoder)
        torch.cuda.synchronize()
        gpu_rate = len(datas) / (time.perf_counter() - t)
        t = time.perf_counter()
        for d in datas:
            load_rgb(d, pre)
        cpu_rate = len(datas) / (time.perf_counter() - t)
        body.append(f"\nDecode + resize + crop: GPU {gpu_rate:.0f} photos/s (batches of {args.batch}), CPU path "
                    f"{cpu_rate:.0f} photos/s on one core.")
    else:
        body.append("\nNo CUDA GPU here: the GPU's photos/s were not measured.")
    publish("bench_gpu_decode", "GPU decode path vs the CPU path (pixels, features)", "\n".join(body),
            write=not args.no_write, command=f"python benchmarks/bench_gpu_decode.py --n {args.n}")


if __name__ == "__main__":
    main()
