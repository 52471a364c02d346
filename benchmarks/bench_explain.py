"""Grad-CAM on real photos: does the heat point at what the model looks at, and what does it cost?

A deletion test (Petsiuk et al. 2018, "RISE"; the faithfulness check of saliency maps): for each
validation photo the model's probability of its own answer is measured on the photo, then with the
20% of the model's input pixels a map ranks highest painted over in the ImageNet mean grey. A faithful
map loses the answer more than the alternatives a user has without Grad-CAM:

- **centre prior**: a Gaussian centred on the photo (sigma a quarter of its side); product photos are
  centred, so this is the strongest map that needs no model;
- **least heat**: the 20% of pixels Grad-CAM ranks lowest (the floor).

Models: the plain ``catalens train`` model of clothing-small (Lite0, trained here once) and the presets'
chosen models of the last ``bench_presets`` runs, whatever they are (clothing-small: Lite0@256 + Lite1@272
+ Lite2@300 side by side; fashion-products image only: the blend of the three single backbones at their
own sizes), each on its own data's validation photos, explaining its finest class task (fashion:
articleType). Grad-CAM's seconds per photo are those of
:func:`catalens.model.explain.grad_cam` on the model's input (one photo at a time, as the server explains).

    python benchmarks/bench_explain.py [--photos 60] [--no-write]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import ROOT, SHARED_DATA, log, publish, table  # noqa: E402

WORK = ROOT / "runs" / "bench_explain"
SHARE = 0.2
GREY = (124, 116, 104)   # the ImageNet mean in 0..255
PRESETS = [ROOT / "runs" / name for name in ("bench_presets", "bench_presets_avx2")]


def models() -> list[tuple[str, Path, str]]:
    """``(label, model folder, data)``: the plain model (trained now when missing) and the presets' models."""
    from catalens import train

    plain = WORK / "plain-lite0"
    if not (plain / "model.json").exists():
        train(str(SHARED_DATA / "clothing-small"), str(plain))
    out = [("clothing-small, plain `catalens train` (Lite0)", plain, str(SHARED_DATA / "clothing-small"))]
    for run, data in (("clothing", str(SHARED_DATA / "clothing-small")),
                      ("fashion-image", str(ROOT / "examples" / "fashion-products.yaml"))):
        folder = next((p / run / "model" for p in PRESETS if (p / run / "model" / "model.json").exists()), None)
        if folder is not None:
            out.append((f"{run}, `--preset best` ({_describe(folder)})", folder, data))
    return out


def _describe(folder: Path) -> str:
    import json

    meta = json.loads((folder / "model.json").read_text())
    ens = meta.get("ensemble")
    if ens:
        return "blend of " + " + ".join(ens["member_backbones"]).replace("efficientnet_", "")
    return meta["backbone"]["name"].replace("efficientnet_", "")


def probabilities(model, pixels, task: str):
    import numpy as np
    import torch

    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float()
    with torch.inference_mode():
        return model.predict_proba_features(model.backbone.module(x).numpy())[task]


def painted(pixels, rank, share: float = SHARE):
    """``pixels`` ``(n, S, S, 3)`` with the ``share`` of each photo's pixels ``rank`` ranks highest painted grey."""
    import numpy as np

    out = pixels.copy()
    flat = rank.reshape(len(rank), -1)
    k = int(round(share * flat.shape[1]))
    top = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    for i in range(len(out)):
        img = out[i].reshape(-1, 3)
        img[top[i]] = GREY
    return out


def centre_prior(size: int):
    import numpy as np

    yy, xx = np.mgrid[0:size, 0:size] - (size - 1) / 2
    return np.exp(-(xx ** 2 + yy ** 2) / (2 * (size / 4) ** 2))


def measure(model_dir: Path, data: str, n: int) -> dict:
    import numpy as np

    from catalens.ingest.images import load_rgb
    from catalens.ingest.open import open_catalogue
    from catalens.model.explain import grad_cam
    from catalens.model.load import load_model

    model = load_model(model_dir)
    task = [t.name for t in model.tasks if t.kind == "class"][-1]   # the finest level (fashion: articleType)
    val = open_catalogue(data).split("val")
    rows = np.linspace(0, len(val) - 1, n).round().astype(int)
    pixels = np.stack([load_rgb(val.read_bytes(int(r)), model.preprocess) for r in rows])
    p0 = probabilities(model, pixels, task)
    answer = p0.argmax(1)
    grad_cam(model, pixels[:1], task)   # warm-up
    heats, t = [], time.perf_counter()
    for i in range(n):
        heats.append(grad_cam(model, pixels[i:i + 1], task, answer[i:i + 1])[0][0])
    seconds = (time.perf_counter() - t) / n
    heat = np.stack(heats)
    size = pixels.shape[1]
    maps = {"Grad-CAM": heat, "centre prior": np.broadcast_to(centre_prior(size), heat.shape),
            "least heat": -heat}
    base = p0[np.arange(n), answer]
    out = {"photos": n, "task": task, "p_answer": float(base.mean()), "seconds": seconds, "size": size}
    for name, rank in maps.items():
        p = probabilities(model, painted(pixels, rank), task)
        out[name] = {"drop": float((base - p[np.arange(n), answer]).mean()),
                     "changed": float((p.argmax(1) != answer).mean())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=60)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, folder, data in models():
        r = measure(folder, data, args.photos)
        log(f"{label}: {r}")
        rows.append([label, f"{r['task']} ({r['photos']})", f"{r['p_answer']:.3f}",
                     *(f"{r[k]['drop']:.3f} / {r[k]['changed']:.0%}" for k in ("Grad-CAM", "centre prior", "least heat")),
                     f"{r['seconds']:.2f}"])
    body = (table(["model", "task (validation photos)", "p(answer)", "Grad-CAM's top 20% painted: drop / answer "
                   "changed", "centre prior's top 20%", "Grad-CAM's lowest 20%", "Grad-CAM s / photo"], rows)
            + f"\n\nThe deletion test: the model's mean probability of its own answer on the photos, and how much "
            f"of it is lost (and the share of answers that change) when the {SHARE:.0%} of the model's input "
            "pixels a map ranks highest are painted the ImageNet mean grey. A faithful map loses more than the "
            "centre prior (a Gaussian, sigma a quarter of the side: what a user has without Grad-CAM, since "
            "product photos are centred) and far more than its own lowest pixels. Photos spread evenly over "
            "each data set's validation split. Seconds: one photo at a time at the model's input size, "
            "backward pass included, as `catalens predict --explain` and the server's `explain=true` run it.")
    publish("bench_explain", "Grad-CAM on real photos: deletion test and cost", body, not args.no_write,
            f"python benchmarks/bench_explain.py --photos {args.photos}")


if __name__ == "__main__":
    main()
