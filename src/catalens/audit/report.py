"""The audit report folder: ``audit.json``, CSVs of groups, and ``audit.html`` (offline, thumbnails inline).

- ``audit.json``          summary + every group (ids, rows, splits, conflicts, similarities)
- ``groups.csv``          one line per (group, image): group, kind, id, row, split, path, hash,
                          similarity (near: best cosine to another member), the class labels
- ``leakage.csv``         one line per group spanning splits: group, kind, splits, ids
- ``conflicts.csv``       one line per (group, task) with disagreeing labels
- ``problems.csv``        rows whose bytes could not be read or decoded
- ``audit.html``          the groups that matter first (leakage, conflicts), then the others,
                          as rows of thumbnails (base64 JPEG, no network); at most
                          ``max_groups`` per section, the CSVs hold all of them
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import pandas as pd

from catalens.audit.core import AuditResult, Group
from catalens.files import atomic_write_text

THUMB = 112


def _atomic_csv(path: Path, df: pd.DataFrame) -> None:
    atomic_write_text(path, df.to_csv(index=False, lineterminator="\n"))


def _class_tasks(res: AuditResult) -> list[str]:
    return [t.name for t in res.cat.tasks if t.kind == "class" and t.name in res.cat.frame]


def groups_frame(res: AuditResult) -> pd.DataFrame:
    f = res.cat.frame
    tasks = _class_tasks(res)
    rows = []
    for g in res.groups:
        for r in g.rows:
            row = {"group": g.name, "kind": g.kind, "id": str(f["id"].iat[r]), "row": int(f["row"].iat[r]),
                   "split": f["split"].iat[r] if isinstance(f["split"].iat[r], str) else None,
                   "path": str(f["path"].iat[r]), "hash": res.keys[r],
                   "similarity": round(res.similarity[r], 5) if g.kind == "near" and r in res.similarity else None}
            row.update({t: f[t].iat[r] for t in tasks})
            rows.append(row)
    cols = ["group", "kind", "id", "row", "split", "path", "hash", "similarity"] + tasks
    return pd.DataFrame(rows, columns=cols)


def write_report(res: AuditResult, folder: str | Path, max_groups: int = 200) -> Path:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    cat = res.cat
    doc = {"summary": res.summary, "dataset": str(cat.meta.get("dataset_file") or cat.root),
           "groups": [g.to_dict(cat) for g in res.groups],
           "leakage": [g.name for g in res.leakage], "conflicts": [g.name for g in res.conflicts]}
    atomic_write_text(out / "audit.json", json.dumps(doc, indent=1))
    _atomic_csv(out / "groups.csv", groups_frame(res))
    ids = cat.frame["id"].astype(str)
    _atomic_csv(out / "leakage.csv", pd.DataFrame(
        [{"group": g.name, "kind": g.kind, "splits": "+".join(g.splits), "size": len(g.rows),
          "ids": " ".join(ids.iloc[g.rows])} for g in res.leakage],
        columns=["group", "kind", "splits", "size", "ids"]))
    _atomic_csv(out / "conflicts.csv", pd.DataFrame(
        [{"group": g.name, "kind": g.kind, "task": t, "labels": " | ".join(labels),
          "ids": " ".join(ids.iloc[g.rows])} for g in res.conflicts for t, labels in g.conflicts.items()],
        columns=["group", "kind", "task", "labels", "ids"]))
    _atomic_csv(out / "problems.csv", pd.DataFrame(
        [{"id": ids.iat[r], "row": int(cat.frame["row"].iat[r]), "path": cat.frame["path"].iat[r], "problem": p}
         for r, p in sorted(res.problems.items())], columns=["id", "row", "path", "problem"]))
    if res.label_issues is not None:
        _atomic_csv(out / "label_issues.csv", res.label_issues)
    atomic_write_text(out / "audit.html", render_html(res, max_groups))
    return out


# ----------------------------------------------------------------------------- HTML

def thumbnail(data: bytes, size: int = THUMB) -> str | None:
    """A ``data:`` URI of a small JPEG of ``data`` (None when it cannot be decoded)."""
    from catalens.ingest.images import ImageProblem, decode

    try:
        im = decode(data, draft_to=size)
    except ImageProblem:
        return None
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=75)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
table.s td,table.s th{padding:2px 10px;text-align:left;border-bottom:1px solid #ddd}
.g{border:1px solid #ccc;border-radius:6px;margin:10px 0;padding:8px}
.g.bad{border-color:#c33;background:#fff6f6}
.g h3{margin:0 0 6px 0;font-size:14px}
.im{display:inline-block;vertical-align:top;margin:4px;width:120px;font-size:11px;word-break:break-all}
.im img{width:112px;height:112px;object-fit:contain;background:#f4f4f4;display:block}
.tag{display:inline-block;padding:0 5px;border-radius:3px;background:#eee;margin-right:4px}
.tag.red{background:#f3c0c0}
"""


def _esc(v) -> str:
    return html.escape("" if v is None else str(v))


def _group_html(res: AuditResult, g: Group) -> str:
    f = res.cat.frame
    tasks = _class_tasks(res)
    flags = []
    if g.cross_split:
        flags.append(f'<span class="tag red">across splits: {_esc(" + ".join(g.splits))}</span>')
    for t, labels in g.conflicts.items():
        flags.append(f'<span class="tag red">{_esc(t)}: {_esc(" | ".join(labels))}</span>')
    if g.kind == "near" and g.min_similarity is not None:
        flags.append(f'<span class="tag">cosine {g.min_similarity:.3f}-{g.max_similarity:.3f}</span>')
    cells = []
    for r in g.rows:
        try:
            uri = thumbnail(res.cat.reader(str(f["path"].iat[r])))
        except OSError:
            uri = None
        img = f'<img src="{uri}" alt="">' if uri else '<div class="im-missing">(no image)</div>'
        labels = " / ".join(str(f[t].iat[r]) for t in tasks if isinstance(f[t].iat[r], str))
        split = f["split"].iat[r] if isinstance(f["split"].iat[r], str) else "-"
        cells.append(f'<div class="im">{img}<b>{_esc(f["id"].iat[r])}</b> [{_esc(split)}]<br>{_esc(labels)}</div>')
    cls = "g bad" if g.cross_split or g.conflicts else "g"
    return (f'<div class="{cls}"><h3>{_esc(g.name)} ({g.kind}, {len(g.rows)} images) {"".join(flags)}</h3>'
            + "".join(cells) + "</div>")


def _label_section(res: AuditResult, limit: int = 120) -> str:
    """Thumbnails of the likely wrong labels, most likely first (all of them in label_issues.csv)."""
    df = res.label_issues
    if df is None:
        return ""
    if not len(df):
        return "<h2>Likely wrong labels</h2><p>None found.</p>"
    cells = []
    for r in df.head(limit).itertuples(index=False):
        try:
            uri = thumbnail(res.cat.reader(str(r.path)))
        except OSError:
            uri = None
        img = f'<img src="{uri}" alt="">' if uri else '<div class="im-missing">(no image)</div>'
        cells.append(f'<div class="im">{img}<b>{_esc(r.id)}</b> [{_esc(r.split or "-")}]<br>{_esc(r.task)}: '
                     f'<span class="tag red">{_esc(r.given)}</span> → <span class="tag">{_esc(r.suggested)}</span>'
                     f'<br>score {r.score:.3f}</div>')
    more = f"<p>{len(df) - limit} more in label_issues.csv.</p>" if len(df) > limit else ""
    return (f"<h2>Likely wrong labels ({len(df)})</h2><p>Most likely wrong first: given label (red) → the "
            f"label out-of-fold predictions suggest; score = 1 - out-of-fold probability of the given label."
            f"</p><div class='g'>{''.join(cells)}</div>{more}")


def _section(res: AuditResult, title: str, groups: list[Group], max_groups: int) -> str:
    if not groups:
        return f"<h2>{_esc(title)}</h2><p>None.</p>"
    more = len(groups) - max_groups
    body = "".join(_group_html(res, g) for g in groups[:max_groups])
    tail = f"<p>{more} more groups in groups.csv.</p>" if more > 0 else ""
    return f"<h2>{_esc(title)} ({len(groups)})</h2>{body}{tail}"


def render_html(res: AuditResult, max_groups: int = 200) -> str:
    s = res.summary
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(json.dumps(v) if isinstance(v, dict) else v)}</td></tr>"
                   for k, v in s.items())
    flagged = {g.name for g in res.leakage} | {g.name for g in res.conflicts}
    rest_exact = [g for g in res.exact if g.name not in flagged]
    rest_near = [g for g in res.near if g.name not in flagged]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>catalens audit</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>Catalogue audit</h1><p>{_esc(res.cat.meta.get('dataset_file') or res.cat.root)}</p>",
             f"<table class='s'>{rows}</table>",
             _section(res, "Leakage: the same picture in several splits", res.leakage, max_groups),
             _section(res, "Conflicting labels", [g for g in res.conflicts if not g.cross_split], max_groups),
             _label_section(res),
             _section(res, "Exact duplicates", rest_exact, max_groups),
             _section(res, "Near duplicates", rest_near, max_groups),
             "</body></html>"]
    return "\n".join(parts)
