"""``catalens train --preset best --time-limit 20m`` (and one short ``--preset medium``) on clothing-small and fashion-products (issue 16).

Each run is exactly the command a user types, then ``catalens evaluate`` on the test split
(reported only: the preset chooses everything on train + val by k-fold CV). Runs:

- ``clothing``:      clothing-small, ``--preset best --time-limit 20m``
- ``fashion-image``: examples/fashion-products.yaml, image only (``--set preset.titles=off``)
- ``fashion-text``:  the same with titles (``preset.titles: auto`` finds them)
- ``clothing-medium-3m``: clothing-small, ``--preset medium --time-limit 3m`` whatever ``--limit`` says (a
  short budget from an empty cache: what the first estimates decide before anything is measured)

Wall time is the whole ``catalens train`` command (the limit is to be kept within 1.15x);
after it, the chosen model is trained again without ``data.refit_full`` (from the cache, untimed)
to show what fitting the final weights on train + val gave;
the load average around each run is printed because the machine is shared. Each run starts
from an empty embedding cache (``runs/bench_presets/<run>/cache``), as a new user's would,
unless ``--warm-cache`` (the default cache, possibly filled by earlier runs). On a CPU without AVX-512 (AMD
Zen 3, about half the inference speed) the rows go to ``runs/bench_presets_avx2`` and section
``bench_presets_avx2``: the same budget buys fewer recipes there.

    python benchmarks/bench_presets.py [--only clothing fashion-image fashion-text] [--limit 20m]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import ROOT, SHARED_DATA, cpu_kind, table, write_section  # noqa: E402

SUFFIX, KIND_NOTE = cpu_kind()   # a time budget buys different recipes on another kind of CPU: its own rows
WORK = ROOT / "runs" / ("bench_presets" + SUFFIX)
RUNS = {
    "clothing": (str(SHARED_DATA / "clothing-small"), [], ["label"]),
    "fashion-image": (str(ROOT / "examples" / "fashion-products.yaml"), ["--set", "preset.titles=off"],
                      ["articleType", "subCategory"]),
    "fashion-text": (str(ROOT / "examples" / "fashion-products.yaml"), [], ["articleType", "subCategory"]),
    "clothing-medium-3m": (str(SHARED_DATA / "clothing-small"), [], ["label"]),
}
#: runs with their own preset and time limit (the others: --preset best --time-limit LIMIT)
OWN = {"clothing-medium-3m": ("medium", "3m")}


def _catalens(*args: str) -> float:
    t = time.time()
    subprocess.run([sys.executable, "-m", "catalens", *args], check=True)
    return time.time() - t


def run_one(name: str, limit: str, warm: bool) -> dict:
    import shutil

    data, extra, tasks = RUNS[name]
    preset, limit = OWN.get(name, ("best", limit))
    out, report, cache = WORK / name / "model", WORK / name / "report", WORK / name / "cache"
    if not warm:
        shutil.rmtree(cache, ignore_errors=True)
        extra = [*extra, "--cache-dir", str(cache)]
    load0, started = os.getloadavg()[0], time.time()
    wall = _catalens("train", data, "--out", str(out), "--preset", preset, "--time-limit", limit, "--no-progress",
                     "--set", "tracking=false", *extra)
    load1 = os.getloadavg()[0]
    _catalens("evaluate", str(out), data, "--report", str(report), "--no-progress",
              *([] if warm else ["--cache-dir", str(cache)]))
    metrics = json.loads((report / "metrics.json").read_text())
    desc = json.loads((out / "model.json").read_text())
    meta = desc.get("preset", {})
    return {"name": name, "wall_s": round(wall, 1), "load": f"{load0:.1f}/{load1:.1f}",
            "test": {t: metrics[t]["accuracy"] for t in tasks if t in metrics},
            "accepted": accepted(metrics, tasks),
            "test_without_refit": without_refit(out, data, WORK / name, tasks, [] if warm else ["--cache-dir", str(cache)]),
            "cv": meta.get("cv_score"), "chosen": meta.get("chosen"), "limit": limit, "preset": preset,
            "ran": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))}


def accepted(metrics: dict, tasks: list[str]) -> dict:
    """Per task the test photos' auto-accept share and precision (``catalens evaluate``'s ``selective``)."""
    return {t: metrics[t]["selective"] for t in tasks if "selective" in metrics.get(t, {})}


def without_refit(out: Path, data: str, work: Path, tasks: list[str], cache: list[str]) -> dict | None:
    """Test accuracy of the same chosen model without ``data.refit_full`` (each member trained again
    from its ``config.yaml`` with the refit off, from the cache; an ensemble rebuilt with its weights):
    what fitting on train + val gave. None when nothing was refitted."""
    import shutil

    desc = json.loads((out / "model.json").read_text())
    if not desc.get("refit_full"):
        return None
    folders = [out / m for m in desc["ensemble"]["members"]] if "ensemble" in desc else [out]
    plain = work / "without-refit"
    shutil.rmtree(plain, ignore_errors=True)
    members = []
    for i, folder in enumerate(folders):
        members.append(plain / f"member-{i}")
        _catalens("train", data, "--out", str(members[-1]), "--config", str(folder / "config.yaml"),
                  "--set", "data.refit_full=false", "--no-progress", "--set", "tracking=false")
    model = members[0]
    if len(members) > 1:
        model = plain / "model"
        weights = ",".join(f"{w:g}" for w in desc["ensemble"]["weights"])
        _catalens("ensemble", *map(str, members), "--weights", weights, "--data", data, "--out", str(model))
    _catalens("evaluate", str(model), data, "--report", str(plain / "report"), "--no-progress", *cache)
    metrics = json.loads((plain / "report" / "metrics.json").read_text())
    return {t: metrics[t]["accuracy"] for t in tasks if t in metrics}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="+", choices=list(RUNS), default=list(RUNS))
    ap.add_argument("--limit", default="20m")
    ap.add_argument("--warm-cache", action="store_true", help="use the default embedding cache")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    results_path = WORK / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name in args.only:
        results[name] = run_one(name, args.limit, args.warm_cache)
        results_path.write_text(json.dumps(results, indent=1))
    rows = []
    for name, r in results.items():
        report = WORK / name / "report" / "metrics.json"   # rows run before the column: that run's own report
        if "accepted" not in r and report.exists():
            r["accepted"] = accepted(json.loads(report.read_text()), RUNS[name][2])
        chosen = " + ".join(f"{c['weight']:g} x {c['recipe']}" for c in r["chosen"] or []) or "plain model"
        before = r.get("test_without_refit")
        auto = ", ".join(f"{t} {a['coverage']:.0%}" + (f" at {a['precision']:.4f}" if a["precision"] is not None else "")
                             for t, a in r.get("accepted", {}).items())
        rows.append([name, f"{r.get('preset', 'best')} {r.get('limit', '20m')}", ", ".join(f"{t} {v:.4f}" for t, v in r["test"].items()),
                     ", ".join(f"{t} {v:.4f}" for t, v in before.items()) if before else "the same: nothing refitted",
                     auto or "(not recorded)", r["cv"] if r["cv"] is not None else "", chosen, f"{r['wall_s'] / 60:.1f} min", r["load"],
                     r.get("ran", "")])
    body = table(["run", "--preset, --time-limit", "test accuracy", "test, without refit_full",
                  "test auto-accepted (precision)", "CV (train+val, blend)", "chosen recipes", "train wall", "load before/after",
                  "started"],
                 rows)
    body += ("\n\nTest accuracy is reported only; every choice was made by k-fold CV on train+val. The chosen "
             "frozen recipes end fitted on train + val (`preset.refit_full`); *without refit_full* is the same "
             "model trained again from its members' config.yaml with `data.refit_full=false` (after the timed run). "
             "*Auto-accepted*: the share of test photos whose answer passes the model's auto-accept threshold (target "
             "precision 0.98, chosen at training) and the precision of those. "
             "Empty embedding cache at the start of each run" + (" (no: --warm-cache)." if args.warm_cache else ".")
             + f" Runs named by `--only` are run again; the others' rows are kept from `{WORK.relative_to(ROOT)}/results.json`"
             " (column *started*).")
    write_section("bench_presets" + SUFFIX, "Presets: --preset best | medium --time-limit" + KIND_NOTE, body,
                  f"python benchmarks/bench_presets.py --only {' '.join(args.only)} --limit {args.limit}")


if __name__ == "__main__":
    main()
