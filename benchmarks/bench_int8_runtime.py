"""The openvino-int8 runtime on the presets' models: what `catalens export --openvino-int8` buys and costs.

For each model that ``bench_presets`` wrote (``runs/bench_presets/<run>/model``: the clothing-small and
fashion-products image-only ensembles), a copy is calibrated with
:func:`catalens.export.quantize.calibrate_openvino_int8` (what ``catalens export MODEL --openvino-int8``
runs: NNCF post-training quantisation of the network the engine runs, on 300 photos of the train split),
which also scores fp32 OpenVINO and int8 on every test photo (accuracy of each class task, top-1
agreement). Then ``catalens.load(MODEL, runtime=R).predict(test photos)`` is timed for ``openvino`` and
``openvino-int8`` (decode included, no embedding cache, best of two interleaved rounds after a warm-up).
Nothing is chosen here; the test split only measures.

    python benchmarks/bench_int8_runtime.py [--only clothing fashion-image]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import ROOT, log, table, write_section  # noqa: E402

WORK = ROOT / "runs" / "bench_int8_runtime"
os.environ["CATALENS_CACHE"] = str(WORK / "cache")   # a fresh runtime cache: ONNX exports, int8 models
MODELS = {"clothing": ROOT / "runs" / "bench_presets" / "clothing" / "model",
          "fashion-image": ROOT / "runs" / "bench_presets" / "fashion-image" / "model"}
RUNTIMES = ("openvino", "openvino-int8")


def test_photos(model_dir: Path):
    """The test split of the data the model was trained on (a Catalogue: predict takes it as it is)."""
    from catalens.ingest.open import open_catalogue

    return open_catalogue(json.loads((model_dir / "model.json").read_text())["data"]).split("test")


def speeds(model_dir: Path, photos, rounds: int = 2) -> dict[str, float]:
    """Images per second of ``catalens.load(model, runtime=R).predict(photos)`` per runtime."""
    import catalens

    preds = {r: catalens.load(model_dir, runtime=r, progress=False) for r in RUNTIMES}
    for p in preds.values():
        p.predict(photos.subset(np.arange(16)), use_cache=False)   # start the runtime
    best = {r: 0.0 for r in RUNTIMES}
    for _ in range(rounds):
        for r, p in preds.items():
            t = time.perf_counter()
            p.predict(photos, use_cache=False)
            best[r] = max(best[r], len(photos) / (time.perf_counter() - t))
    return best


def measure(name: str) -> dict:
    from catalens.export.quantize import calibrate_openvino_int8

    src = MODELS[name]
    if not (src / "model.json").exists():
        raise SystemExit(f"{src} not found: run `python benchmarks/bench_presets.py --only {name}` first")
    dst = WORK / name / "model"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    t = time.time()
    report = calibrate_openvino_int8(dst, n_calibration=300, eval_limit=None, log=log)
    calib_s = time.time() - t
    photos = test_photos(dst)
    members = json.loads((dst / "model.json").read_text()).get("ensemble", {}).get("member_backbones", [])
    return {"report": report, "calibration_s": calib_s, "speeds": speeds(dst, photos), "photos": len(photos),
            "members": members}


def report(res: dict) -> str:
    rows = []
    for name, r in res.items():
        tasks = {k: v for k, v in r["report"]["tasks"].items() if "accuracy_fp32" in v}
        acc = lambda key: ", ".join(f"{k} {v[key]:.4f}" for k, v in tasks.items())  # noqa: E731
        agree = ", ".join(f"{k} {v['top1_agreement']:.3f}" for k, v in tasks.items())
        s = r["speeds"]
        rows.append([name, "openvino (fp32)", acc("accuracy_fp32"), "", f"{s['openvino']:.1f}", "1.00x"])
        rows.append([name, "openvino-int8", acc("accuracy_int8"), agree, f"{s['openvino-int8']:.1f}",
                     f"{s['openvino-int8'] / s['openvino']:.2f}x"])
    notes = "; ".join(f"{name}: {len(r['members'])} members ({', '.join(r['members'])}), {r['photos']} test photos, "
                      f"calibration and the accuracy check {r['calibration_s']:.0f} s" for name, r in res.items())
    return (table(["model", "runtime", "test accuracy", "top-1 agreement with fp32", "predict img/s", "speed"], rows)
            + "\n\nThe models of the last `bench_presets` runs (*Presets*), copied; `catalens export MODEL "
            "--openvino-int8` calibrated each on 300 train photos (NNCF post-training quantisation of the whole "
            "network the engine runs: every distinct backbone of the ensemble in one graph). Accuracy and agreement: "
            "every test photo through OpenVINO fp32 and int8 (the export's own check, stored in `onnx.json` under "
            "`openvino_int8`). Speed: `catalens.load(MODEL, runtime=R).predict(test photos, use_cache=False)`, "
            f"JPEG decode included, best of two interleaved rounds. {notes}.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=list(MODELS), default=list(MODELS))
    args = ap.parse_args()
    res = {name: measure(name) for name in args.only}
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "results.json").write_text(json.dumps(res, indent=1, default=str))
    command = "python benchmarks/bench_int8_runtime.py" + (
        f" --only {' '.join(args.only)}" if args.only != list(MODELS) else "")
    write_section("bench_int8_runtime", "The openvino-int8 runtime on the presets' models", report(res), command)


if __name__ == "__main__":
    main()
