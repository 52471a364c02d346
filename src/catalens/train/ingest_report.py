"""What ingest found: image problems, conversions, class counts; printed and written to disk."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd

from catalens.ingest.catalogue import Catalogue
from catalens.ingest.images import PROBLEM_FIXES


class DataProblemError(ValueError):
    """Raised in strict mode when any image has a problem."""


def problems_frame(cat: Catalogue, problems: list[dict]) -> pd.DataFrame:
    """One line per bad image: row (as in the user's table), id, path, problem, detail, fix."""
    rows = []
    for p in problems:
        r = cat.frame.iloc[p["row"]]
        rows.append({"row": int(r["row"]), "id": r["id"], "path": r["path"], "problem": p["problem"],
                     "detail": p["detail"], "fix": PROBLEM_FIXES.get(p["problem"], "")})
    rows += cat.meta.get("source_problems", [])  # found by the source: corrupt documents, empty folders
    return pd.DataFrame(rows, columns=["row", "id", "path", "problem", "detail", "fix"])


def small_classes(cat: Catalogue, min_count: int) -> dict[str, dict[str, int]]:
    """Per class task, classes with fewer than ``min_count`` training images."""
    counts = cat.class_counts("train" if cat.has_split("train") else None)
    return {t.name: {c: n for c, n in counts[t.name].items() if n < min_count}
            for t in cat.tasks if t.kind == "class" and any(n < min_count for n in counts[t.name].values())}


def write_ingest_report(folder: Path, cat: Catalogue, problems: list[dict], notes: list[dict],
                        min_count: int, selection=None) -> dict:
    """Write ingest/problems.csv, notes.csv, class_counts.json; return the summary.

    ``selection`` (a :class:`catalens.train.classes.SelectionReport`) adds what the class
    selection removed: per task the classes and photos, and the photos left without labels."""
    folder.mkdir(parents=True, exist_ok=True)
    pf = problems_frame(cat, problems)
    pf.to_csv(folder / "problems.csv", index=False)
    if notes:
        nf = pd.DataFrame([{"row": int(cat.frame.iloc[n["row"]]["row"]), "path": cat.frame.iloc[n["row"]]["path"],
                            "note": n["note"]} for n in notes])
        nf.to_csv(folder / "conversions.csv", index=False)
    counts = {s: cat.class_counts(s) for s in ("train", "val", "test") if cat.has_split(s)}
    summary = {"images": len(cat), "excluded": len(problems), "problems": dict(Counter(pf["problem"])),
               "converted": dict(Counter(n["note"].split(" (")[0] for n in notes)),
               "small_classes": small_classes(cat, min_count), "class_counts": counts,
               "unknown_labels": cat.meta.get("unknown_labels", {})}
    if selection is not None and selection.tasks:
        summary["class_selection"] = selection.to_dict()
        summary["excluded_by_class_selection"] = selection.removed_rows
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def format_summary(summary: dict, folder: Path) -> str:
    """Human summary of ingest: what was excluded and why, imbalance, small classes."""
    lines = [f"ingest: {summary['images']} images, {summary['excluded']} excluded"
             + (f" ({summary['excluded_by_class_selection']} more removed by class selection)"
                if summary.get("excluded_by_class_selection") else "")]
    for code, n in sorted(summary["problems"].items()):
        lines.append(f"  {n:6d} {code}: {PROBLEM_FIXES.get(code, '')}")
    for what, n in sorted(summary["converted"].items()):
        lines.append(f"  {n:6d} {what} (kept)")
    if summary["problems"]:
        lines.append(f"  full list: {folder / 'problems.csv'}")
    train = summary["class_counts"].get("train", {})
    for task, counts in train.items():
        if counts and all(isinstance(v, int) for v in counts.values()):
            vals = [v for v in counts.values() if v > 0]
            if vals:
                lines.append(f"  {task}: {len(counts)} classes, train images per class {min(vals)}..{max(vals)} "
                             f"(imbalance {max(vals) / min(vals):.1f}x)")
    for task, r in (summary.get("class_selection") or {}).get("tasks", {}).items():
        gone = r["excluded_classes"]
        shown = ", ".join(f"{c} ({n})" for c, n in list(gone.items())[:6]) + (" ..." if len(gone) > 6 else "")
        lines.append(f"  class selection {task}: {r['classes_kept']} of {r['classes_before']} classes kept "
                     f"({r['rule']}); {r['rows_relabelled']} photos lost this label" + (f": {shown}" if gone else ""))
    if summary.get("class_selection"):
        lines.append(f"  list of photos affected by class selection: {folder / 'class_selection.csv'}")
    for task, small in summary["small_classes"].items():
        shown = ", ".join(f"{c} ({n})" for c, n in list(small.items())[:8])
        lines.append(f"  {task}: {len(small)} classes too small to learn well: {shown}"
                     + (" ..." if len(small) > 8 else ""))
    return "\n".join(lines)
