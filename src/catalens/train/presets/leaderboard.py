"""What a preset leaves in its model folder: ``leaderboard.csv`` (every recipe with its CV score,
seconds, predict speed and status) and the ``preset`` record of ``model.json``."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

from catalens.files import atomic_write_text
from catalens.train.presets.recipes import Scored, ensemble_units

#: the leaderboard's first columns (per-task ``cv_<task>`` columns follow)
COLUMNS = ["recipe", "cv_score", "fit_seconds", "predict_img_s", "weight", "status"]


def leaderboard_rows(results: Iterable[Scored], chosen: list[Scored], weights: list[float]) -> list[dict]:
    """One row per recipe tried, best CV score first (recipes without one last)."""
    w = {s.recipe.name: wt for s, wt in zip(chosen, weights)}
    rows = []
    for s in results:
        detail = getattr(s.recipe, "name_detail", None)
        rows.append({"recipe": s.recipe.name + (f" ({detail})" if detail else ""),
                     "cv_score": None if math.isnan(s.score) else round(float(s.score), 6),
                     **{f"cv_{k}": round(float(v), 6) for k, v in s.scores.items() if not math.isnan(v)},
                     "fit_seconds": s.seconds, "predict_img_s": s.img_s,
                     "weight": w.get(s.recipe.name, 0.0),
                     "status": ("chosen" if s.recipe.name in w else s.status)})
    rows.sort(key=lambda r: -(r["cv_score"] if r["cv_score"] is not None else -1))
    return rows


def ensemble_row(chosen: list[Scored], weights: list[float], blend: float, refit_seconds: float,
                 results: dict[str, Scored]) -> dict:
    """The leaderboard's first row for an ensemble of the chosen: members on the same backbone share
    one embedding (:mod:`catalens.model.ensemble`; a ``+`` recipe counts as its members, ``results``),
    so its speed counts each backbone once."""
    speeds = [u.img_s for u in ensemble_units(chosen, results)]
    return {"recipe": "ensemble of the chosen (" + ", ".join(f"{w:g} x {s.recipe.name}" for s, w in zip(chosen, weights))
            + ")", "cv_score": round(float(blend), 6), "fit_seconds": round(refit_seconds, 1),
            "predict_img_s": round(1.0 / sum(1.0 / v for v in speeds), 1) if all(speeds) else None,
            "weight": sum(weights), "status": "the model"}


def write_leaderboard(out: Path, rows: list[dict], log) -> None:
    """``out/leaderboard.csv`` (atomically), and the table in the log."""
    import pandas as pd

    df = pd.DataFrame(rows)
    df = df[COLUMNS + [c for c in df.columns if c not in COLUMNS]]
    atomic_write_text(out / "leaderboard.csv", df.to_csv(index=False))
    shown = [c for c in ("recipe", "cv_score", "fit_seconds", "predict_img_s", "status") if c in df]
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        log("leaderboard (CV over train+val):\n" + df[shown].to_string(index=False))


def annotate(folder: Path, preset: dict) -> None:
    """Add the preset's record to a single model's ``model.json`` (atomically)."""
    path = folder / "model.json"
    meta = json.loads(path.read_text())
    meta["preset"] = preset
    atomic_write_text(path, json.dumps(meta, indent=1, default=str))
