"""Predicting with a preset's blend: each backbone once, or once per member that uses it.

The image-only fashion-products preset (``bench_presets.py --only fashion-image``) chose Lite1, Lite0,
Lite2 and the three side by side: four members, three backbones. :mod:`catalens.model.ensemble` counts
a side-by-side member as its parts, so each backbone runs once per photo. Before, the three side by side
were one more backbone beside the singles, and every photo went through each net twice.

In one process, on the test photos of fashion-products, embedding cache empty each time, as
``catalens predict`` runs (``predict_catalogue``), with the engine's ``runtime: auto`` (what it picks
on this machine, e.g. OpenVINO) and with ``runtime: eager`` (torch as it is: what runs where no
exported runtime does) on the first ``--eager-photos``:

(a) the blend, each backbone once (what ``catalens.model.load`` gives now);
(b) the same folder with each member's backbone on its own (the side-by-side member not split into
    its parts: how the blend predicted before);
(c) the three side by side alone (the blend's member 3, a single model);

with the test accuracy of each (as ``catalens evaluate`` counts it) and the largest difference of a probability between
(a) and (b). Each is warmed on 8 photos first (its runtime exported and chosen, once per model).

    python benchmarks/bench_ensemble_share.py [--model runs/bench_presets/fashion-image/model]
        [--eager-photos 200] [--no-write]
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
from _report import ROOT, log, table, write_section  # noqa: E402

DATA = ROOT / "examples" / "fashion-products.yaml"
MODEL = ROOT / "runs" / "bench_presets" / "fashion-image" / "model"
TASKS = ("articleType", "subCategory")


def predict(model, cat, work: Path, runtime: str) -> tuple[float, dict, "object"]:
    """Seconds of ``predict_catalogue`` on ``cat`` from an empty cache with ``runtime``, test accuracy per task
    (as ``catalens evaluate`` counts it), the table."""
    import pandas as pd

    from catalens.config import load_config
    from catalens.predict.predictor import predict_catalogue

    cfg = load_config(overrides=[{"tracking": False, "cache_dir": str(work / "cache"),
                                  "engine": {"progress": False, "runtime": runtime}}])
    t = time.time()
    res = predict_catalogue(model, cat, work / "pred.parquet", cfg, log=lambda *_: None)
    took = time.time() - t
    frame = pd.read_parquet(res.path)
    classes = {t.name: list(t.classes) for t in model.tasks}
    # as catalens evaluate counts: photos that decoded, labelled with one of the model's classes
    counted = {k: frame["problem"].isna() & frame[f"true_{k}"].isin(classes[k]) for k in TASKS}
    acc = {k: float((frame[k] == frame[f"true_{k}"])[counted[k]].mean()) for k in TASKS}
    return took, acc, frame


def nets(module) -> int:
    """Networks a backbone module runs per photo (several side by side count as their members)."""
    from catalens.embed.multi import ConcatExtractor

    return sum(nets(m) for m in module.members) if isinstance(module, ConcatExtractor) else 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(MODEL), help="a preset's ensemble folder with a side-by-side member")
    ap.add_argument("--eager-photos", type=int, default=200, help="photos predicted with runtime eager")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    from catalens.ingest.open import open_catalogue
    from catalens.model import ensemble as E
    from catalens.model.load import load_model
    from catalens.model.single import CatalensModel

    folder = Path(args.model)
    if not (folder / "model.json").exists():
        sys.exit(f"no model folder at {folder}: run `python benchmarks/bench_presets.py --only fashion-image` first")
    cat = open_catalogue(DATA).split("test")
    shared = load_model(folder)
    real = E.backbone_parts
    E.backbone_parts = lambda b: [b]   # each member's backbone whole: as before the change
    try:
        apart = load_model(folder)
    finally:
        E.backbone_parts = real
    multi = next(i for i, m in enumerate(shared.members) if len(shared.backbone.member_parts[i]) > 1)
    alone = CatalensModel.load(folder / "members" / str(multi))
    models = (("(a) the blend, each backbone once", shared),
              ("(b) the blend, each member's backbone apart (before)", apart),
              ("(c) the three side by side alone", alone))
    rows, frames = [], {}
    for runtime, photos in (("auto", cat), ("eager", cat.subset(np.arange(min(args.eager_photos, len(cat)))))):
        for name, model in models:
            with tempfile.TemporaryDirectory() as tmp:
                log(f"{runtime} {name}: {model.backbone.name}")
                predict(model, photos.subset(np.arange(8)), Path(tmp) / "warm", runtime)   # runtime exported, chosen
                took, acc, frames[runtime, name] = predict(model, photos, Path(tmp), runtime)
            rows.append([runtime, name, nets(model.backbone.module), len(photos), f"{len(photos) / took:.1f}",
                         f"{took:.1f}", *(round(acc[k], 4) for k in TASKS)])
            log(f"  {rows[-1]}")
    (a, b), names = (frames["auto", n] for n, _ in models[:2]), [n for n, _ in models]
    cols = [c for c in a.columns if c.endswith("_prob") or c == "unknown_score"]
    diff = max((float(np.nanmax(np.abs(a[c].to_numpy(float) - b[c].to_numpy(float)))) for c in cols),
               default=float("nan"))
    same = all((a[k] == b[k]).all() for k in TASKS)
    speed = {(r[0], r[1]): float(r[4]) for r in rows}
    ratios = "; ".join(f"{rt}: (a) over (b) {speed[rt, names[0]] / speed[rt, names[1]]:.2f}x, (a) over (c) "
                       f"{speed[rt, names[0]] / speed[rt, names[2]]:.2f}x" for rt in ("auto", "eager"))
    body = table(["runtime", "predict (catalens predict, empty cache)", "nets run per photo", "photos", "img/s",
                  "seconds", *(f"test {k}" for k in TASKS)], rows)
    where = folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder
    body = (f"Test photos of fashion-products; the model: `{where}` ({len(shared.members)} members: "
            f"{', '.join(m.backbone.name for m in shared.members)}).\n\n{body}\n\n"
            f"(a) against (b), runtime auto: the same answers on every photo: {same}; largest difference of a written "
            f"probability {diff:.2g}. Speed ratios in this run: {ratios}.\n\n"
            "With `runtime: auto` (b) ran at (a)'s speed: its exported graph holds the nets twice, but the export "
            "stores identical weights once and OpenVINO / ONNX Runtime merge identical subgraphs. Eager torch, and "
            "any runtime that does not merge them, ran every net twice, and the preset's leaderboard counted it twice "
            "(18.6 img/s estimated for this blend at d28a6be; the three's speed since).")
    print(body)
    if not args.no_write:
        write_section("bench_ensemble_share", "A preset's blend: each backbone once", body,
                      "python benchmarks/bench_ensemble_share.py")


if __name__ == "__main__":
    main()
