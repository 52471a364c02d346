"""The readable table ``catalens predict`` prints when there is no ``--out``."""
from __future__ import annotations

import math

import pandas as pd

#: widest file column printed (longer paths keep their end, where the name is)
FILE_WIDTH = 48


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def _cell(row, task, top_k: int) -> str:
    if task.kind == "class":
        label, prob = row[task.name], row[f"{task.name}_prob"]
        if label is None or (isinstance(label, float) and math.isnan(label)):
            return "-"
        out = f"{label} {prob:.2f}"
        others = [(l, p) for l, p in zip(row[f"{task.name}_top_labels"], row[f"{task.name}_top_probs"]) if l != label]
        if top_k > 1 and others:
            out += " (" + ", ".join(f"{l} {p:.2f}" for l, p in others[:top_k - 1]) + ")"
        return out
    tags = row[f"{task.name}_tags"]
    if tags is None or (isinstance(tags, float) and math.isnan(tags)):
        return "-"
    return ", ".join(tags) if len(tags) else "(none)"


def format_predictions(df: pd.DataFrame, tasks, top_k: int = 1) -> str:
    """One line per photo: the file, each class task's label and probability (``top_k - 1``
    runners-up in brackets), the tags present, and the problem of a photo that failed."""
    headers = ["file"] + [t.name for t in tasks]
    lines = []
    for _, row in df.iterrows():
        name = row["path"] if isinstance(row["path"], str) and not row["path"].startswith("mem:") else row["id"]
        cells = [_short(str(name), FILE_WIDTH)]
        if isinstance(row["problem"], str):
            cells += [f"problem: {row['problem']}"] + [""] * (len(tasks) - 1)
        else:
            cells += [_cell(row, t, top_k) for t in tasks]
        true = [f"{c[5:]}={row[c]}" for c in df.columns if c.startswith("true_") and isinstance(row[c], str)]
        if true:
            cells[-1] += "   [true: " + ", ".join(true) + "]"
        lines.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in lines)) if lines else len(h) for i, h in enumerate(headers)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in lines]
    return "\n".join(out) + "\n"
