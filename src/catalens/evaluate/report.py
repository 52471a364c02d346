"""The report folder: metrics.json, per-class CSVs, PNG figures and one self-contained report.html.

``report.html`` has everything inline (CSS, a few lines of JavaScript to sort tables,
figures as ``data:image/png;base64`` URIs), so it opens offline and can be mailed as one
file. Every user-provided string (class names, task names, captions, context values) is
escaped with :func:`html.escape`. Every file is written atomically (temporary file, then
``os.replace``), so a reader never sees half a report.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import re
import time
from pathlib import Path

import numpy as np

from catalens.evaluate import plots
from catalens.files import atomic_write_bytes
from catalens.tasks import TaskInfo

WORST_SHARE = 0.1  # the worst tenth of classes (by F1) are highlighted ...
WORST_MAX = 10  # ... at most this many


# ---------------------------------------------------------------- JSON and CSV

def to_jsonable(obj):
    """``obj`` with numpy scalars/arrays, paths, tuples and sets made JSON types; NaN/inf → None."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [to_jsonable(v) for v in sorted(obj, key=str)]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def write_json(path: str | Path, obj) -> Path:
    """Pretty JSON (strict: no NaN), written atomically."""
    text = json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False, allow_nan=False)
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def safe_name(name: str) -> str:
    """``name`` usable in a file name or HTML id (letters, digits, ``_ . -``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("._") or "task"


def per_class_rows(task: TaskInfo, m: dict) -> list[dict]:
    """One dict per class (or tag) of a task's metrics, in the task's class order."""
    table = m["per_class"] if m["kind"] == "class" else m["per_tag"]
    rows = []
    for i, name in enumerate(task.classes):
        r = {"class": name, **table[name]}
        if m["kind"] == "class":
            r["top_confusion"], r["top_confusion_count"] = _top_confusion(m["confusion"], task.classes, i)
        else:
            r["threshold"] = m["thresholds"][name]
        rows.append(r)
    return rows


def _top_confusion(cm: list[list[int]], classes: list[str], i: int) -> tuple[str | None, int]:
    """The class most often predicted for true class ``i`` other than itself, and how often."""
    row = np.array(cm[i], dtype=np.int64)
    row[i] = 0
    j = int(row.argmax()) if row.size else 0
    return (classes[j], int(row[j])) if row.size and row[j] > 0 else (None, 0)


def write_per_class_csv(path: str | Path, rows: list[dict]) -> Path:
    """The per-class table as CSV (empty cells for undefined values)."""
    buf = io.StringIO()
    fields = list(rows[0]) if rows else ["class"]
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


# ---------------------------------------------------------------- figures

def task_figures(report_dir: Path, task: TaskInfo, m: dict, y, probs, pred_index=None) -> dict[str, Path]:
    """The PNGs of one task: {"confusion"/"pr", "calibration", "counts", "coverage"} → path
    (``pred_index``: the decided class per row when it is not the argmax)."""
    slug = safe_name(task.name)
    out = {}
    if task.kind == "class":
        out["confusion"] = plots.confusion_matrix_png(m["confusion"], task.classes, f"{task.name}: confusion (row share)",
                                                      report_dir / f"confusion_{slug}.png")
        counts = np.asarray(m["confusion"]).sum(axis=1)
        out["counts"] = plots.class_counts_png(task.classes, counts, f"{task.name}: labelled rows per class",
                                               report_dir / f"counts_{slug}.png")
        out["roc"] = plots.roc_curves_png(y, probs, task.classes, report_dir / f"roc_{slug}.png",
                                          f"{task.name}: ROC one-vs-rest")
        out["coverage"] = plots.coverage_png(y, probs, report_dir / f"coverage_{slug}.png", pred_index,
                                             m.get("selective"), f"{task.name}: precision–coverage")
    else:
        out["pr"] = plots.pr_curves_png(y, probs, task.classes, report_dir / f"pr_{slug}.png",
                                        thresholds=task.threshold_array())
        counts = np.nansum(np.asarray(y, dtype=np.float64), axis=0)
        out["counts"] = plots.class_counts_png(task.classes, counts, f"{task.name}: positive rows per tag",
                                               report_dir / f"counts_{slug}.png")
    out["calibration"] = plots.calibration_png(y, probs, report_dir / f"calibration_{slug}.png", kind=task.kind,
                                               title=f"{task.name}: reliability diagram")
    return out


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


# ---------------------------------------------------------------- HTML pieces

def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _num(v, pct: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return f"{100 * v:.1f}%" if pct else f"{v:.3f}"


def _heat(v) -> str:
    """Background colour of a 0..1 score cell: red (0) through yellow to green (1)."""
    if v is None:
        return ""
    return f' style="background:hsl({int(120 * max(0.0, min(1.0, v)))},65%,85%)"'


def _card(label: str, big: str, lines: list[str]) -> str:
    sub = "".join(f"<div>{line}</div>" for line in lines)
    return f'<div class="card"><div class="label">{label}</div><div class="big">{big}</div>{sub}</div>'


def headline_cards(metrics: dict, tasks: list[TaskInfo]) -> str:
    """One card per task with its headline numbers, plus one per hierarchy chain."""
    cards = []
    for t in tasks:
        m = metrics.get(t.name)
        if not m:
            continue
        if m["kind"] == "class":
            cards.append(_card(f"{_e(t.name)} · accuracy", _num(m["accuracy"], True), [
                f"top-5 {_num(m['top5_accuracy'], True)} · top-3 {_num(m['top3_accuracy'], True)}",
                f"macro-F1 {_num(m['macro_f1'])} · weighted-F1 {_num(m['weighted_f1'])}",
                f"{_num(m['n'])} labelled images · {len(t.classes)} classes"]))
        else:
            cards.append(_card(f"{_e(t.name)} · micro-F1", _num(m["micro_f1"]), [
                f"macro-F1 {_num(m['macro_f1'])} · mAP {_num(m['mean_average_precision'])}",
                f"{_num(m['n'])} labelled images · {len(t.classes)} tags"]))
    for chain, h in (metrics.get("hierarchy") or {}).items():
        cards.append(_card(f"{_e(chain)} · consistent paths", _num(h["consistent_share"], True), [
            f"all levels right {_num(h.get('path_accuracy'), True)}", f"{_num(h['n'])} images"]))
    return '<div class="cards">' + "".join(cards) + "</div>"


def _worst(rows: list[dict]) -> set[str]:
    """Names of the worst classes by F1 among those with support (a tenth, at least 1, at most 10)."""
    scored = sorted((r["f1"], str(r["class"])) for r in rows if r["support"] > 0 and r["f1"] is not None)
    k = min(WORST_MAX, max(1, math.ceil(WORST_SHARE * len(scored)))) if scored else 0
    return {name for _, name in scored[:k]}


def per_class_table(task: TaskInfo, rows: list[dict]) -> str:
    """Per-class (per-tag) table, worst F1 first, the worst ones highlighted; headers sort on click."""
    worst = _worst(rows)
    ordered = sorted(rows, key=lambda r: (r["support"] == 0 and not r.get("precision"),
                                          r["f1"] if r["f1"] is not None else 2.0, str(r["class"])))
    is_tags = task.kind == "tags"
    cols = ["class" if not is_tags else "tag", "support", "precision", "recall", "F1"]
    cols += ["AP", "threshold", "TN FP / FN TP"] if is_tags else ["most often predicted instead"]
    head = "".join(f'<th onclick="sortTable(this)">{c}</th>' for c in cols)
    body = []
    for r in ordered:
        cells = [f'<td data-v="{_e(r["class"])}">{_e(r["class"])}</td>',
                 f'<td class="n" data-v="{r["support"]}">{_num(r["support"])}</td>']
        for key in ("precision", "recall", "f1") + (("average_precision",) if is_tags else ()):
            v = r.get(key)
            cells.append(f'<td class="n" data-v="{"" if v is None else v}"{_heat(v)}>{_num(v)}</td>')
        if is_tags:
            cells.append(f'<td class="n" data-v="{r["threshold"]}">{r["threshold"]:.3f}</td>')
            cm = r.get("confusion") or [[0, 0], [0, 0]]
            cells.append(f'<td class="n" data-v="{cm[1][1]}">{cm[0][0]} {cm[0][1]} / {cm[1][0]} {cm[1][1]}</td>')
        else:
            other = r["top_confusion"]
            text = f"{_e(other)} ({r['top_confusion_count']})" if other is not None else "–"
            cells.append(f'<td data-v="{r["top_confusion_count"]}">{text}</td>')
        cls = ' class="worst"' if str(r["class"]) in worst else ""
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    note = (f'<p class="note">Sorted by F1, worst first; the {len(worst)} worst '
            f'{"tags" if is_tags else "classes"} are highlighted. Click a header to sort.</p>') if worst else ""
    return (f'{note}<div class="tablewrap"><table class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _figure(path: Path, caption: str) -> str:
    return f'<figure><img src="{_data_uri(path)}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>'


def task_section(task: TaskInfo, m: dict, rows: list[dict], figs: dict[str, Path]) -> str:
    """Everything about one task: its numbers, table and figures."""
    if m["kind"] == "class":
        facts = [("labelled images", _num(m["n"])), ("accuracy", _num(m["accuracy"], True)),
                 ("top-3", _num(m["top3_accuracy"], True)), ("top-5", _num(m["top5_accuracy"], True)),
                 ("macro-F1", _num(m["macro_f1"])), ("weighted-F1", _num(m["weighted_f1"])),
                 ("log loss", _num(m["log_loss"])), ("ECE", _num(m["ece"])),
                 ("top-2", _num((m.get("top_k_accuracy") or {}).get("2"), True)),
                 ("ROC-AUC (one-vs-rest, macro)", _num(m.get("roc_auc_ovr_macro"))), ("MCC", _num(m.get("mcc"))),
                 ("Cohen's κ", _num(m.get("cohen_kappa")))]
        sel = m.get("selective") or {}
        if sel.get("target_precision") is not None:
            facts += [(f"auto-accepted (target {sel['target_precision']:g})", _num(sel["coverage"], True)),
                      ("precision accepted", _num(sel["precision"], True))]
        captions = {"confusion": "Confusion matrix: rows are true classes, columns predictions (share of each row).",
                    "calibration": "Reliability: accuracy per confidence bin; bars on the diagonal = well calibrated.",
                    "roc": "ROC curve of each class against the rest (the most frequent classes).",
                    "coverage": "Precision of the photos accepted from the most confident down, against the share "
                                "accepted; the dot is the model's auto-accept threshold (<task>_accept).",
                    "counts": "Labelled test images per class."}
    else:
        facts = [("labelled images", _num(m["n"])), ("micro-F1", _num(m["micro_f1"])),
                 ("macro-F1", _num(m["macro_f1"])), ("mAP", _num(m["mean_average_precision"]))]
        captions = {"pr": "Precision-recall curve per tag; dots mark the tuned decision thresholds.",
                    "calibration": "Reliability: share of tags present per predicted-probability bin.",
                    "counts": "Positive labels per tag."}
    fact_html = "".join(f"<div><span>{k}</span><b>{v}</b></div>" for k, v in facts)
    fig_html = "".join(_figure(figs[k], c) for k, c in captions.items() if k in figs)
    kind = f"{len(task.classes)} {'classes, one per image' if task.kind == 'class' else 'tags, several per image'}"
    parent = f" · parent level: {_e(task.parent)}" if task.parent else ""
    return (f'<section id="task-{safe_name(task.name)}"><h2>{_e(task.name)} '
            f'<small>{kind}{parent}</small></h2><div class="facts">{fact_html}</div>'
            f'<div class="split"><div>{per_class_table(task, rows)}</div><div class="figs">{fig_html}</div></div></section>')


def hierarchy_section(metrics: dict) -> str:
    """Table of hierarchy chains and how consistent the predicted paths are."""
    h = metrics.get("hierarchy")
    if not h:
        return ""
    rows = "".join(f"<tr><td>{_e(' > '.join(v['levels']))}</td><td class=n>{_num(v['n'])}</td>"
                   f"<td class=n{_heat(v['consistent_share'])}>{_num(v['consistent_share'], True)}</td>"
                   f"<td class=n{_heat(v.get('path_accuracy'))}>{_num(v.get('path_accuracy'), True)}</td>"
                   f"<td class=n>{_num(v.get('known_paths'))}</td></tr>" for v in h.values())
    return ('<section id="hierarchy"><h2>Hierarchy consistency</h2><p class="note">Share of images whose predicted '
            'labels across the levels form a path seen in training, and share right at every level.</p>'
            '<table><thead><tr><th>levels</th><th>images</th><th>consistent paths</th><th>all levels right</th>'
            f'<th>known paths</th></tr></thead><tbody>{rows}</tbody></table></section>')


def examples_section(examples: list[dict] | None) -> str:
    """Thumbnail grid of example images (green border = correct, red = wrong)."""
    if not examples:
        return ""
    items = []
    for ex in examples:
        b64 = re.sub(r"[^A-Za-z0-9+/=]", "", str(ex.get("image_b64", "")))  # only base64 characters
        cls = ("ok" if ex.get("correct") else "bad") + (" wide" if ex.get("heatmap") else "")
        items.append(f'<figure class="ex {cls}"><img src="data:image/jpeg;base64,{b64}" alt="">'
                     f'<figcaption>{_e(ex.get("caption", ""))}</figcaption></figure>')
    note = (" · beside each photo, Grad-CAM: where the evidence for the predicted label lies"
            if any(ex.get("heatmap") for ex in examples) else "")
    return (f'<section id="examples"><h2>Examples <small>{len(examples)} images; red = wrong, green = right{note}'
            f'</small></h2><div class="grid">{"".join(items)}</div></section>')


def _context_value(v) -> str:
    if isinstance(v, (dict, list)) and v:
        text = json.dumps(to_jsonable(v), indent=1, ensure_ascii=False)
        return f"<details><summary>{len(v)} {'entries' if isinstance(v, dict) else 'items'}</summary><pre>{_e(text)}</pre></details>"
    if isinstance(v, (dict, list)):
        return "–"
    return _e(_num(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)


def context_section(context: dict | None) -> str:
    """The run's context (model, data, counts, problems) as a key/value table."""
    if not context:
        return ""
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_context_value(v)}</td></tr>" for k, v in context.items())
    return f'<section id="context"><h2>Context</h2><table class="kv"><tbody>{rows}</tbody></table></section>'


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f4f6f9;color:#1d2330}
header{background:#1f3a5f;color:#fff;padding:20px 32px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;opacity:.8}nav{padding:8px 32px;background:#fff;border-bottom:1px solid #dde3ea}
nav a{margin-right:16px;color:#1f3a5f;text-decoration:none}main{padding:16px 32px}
.cards{display:flex;flex-wrap:wrap;gap:14px;margin:8px 0 20px}
.card{background:#fff;border-radius:10px;padding:14px 18px;min-width:230px;box-shadow:0 1px 3px rgba(0,0,0,.12)}
.card .label{color:#5a6475;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.card .big{font-size:32px;font-weight:650;color:#1f3a5f}.card div{font-size:13px;color:#3a4354}
section{background:#fff;border-radius:10px;padding:16px 20px;margin-bottom:20px;box-shadow:0 1px 3px rgba(0,0,0,.1)}
h2{margin:0 0 10px;font-size:18px}h3{margin:14px 0 6px;font-size:15px}h2 small{font-weight:400;color:#6a7385;font-size:13px;margin-left:8px}
.facts{display:flex;flex-wrap:wrap;gap:18px;margin-bottom:12px}.facts span{color:#6a7385;margin-right:6px}
.split{display:flex;flex-wrap:wrap;gap:20px}.split>div{flex:1 1 440px;min-width:0}
.tablewrap{max-height:720px;overflow:auto;border:1px solid #e3e8ee;border-radius:6px}
table{border-collapse:collapse;width:100%}th,td{padding:4px 8px;border-bottom:1px solid #edf0f4;text-align:left}
thead th{position:sticky;top:0;background:#eef2f7;cursor:pointer;user-select:none;white-space:nowrap}
td.n{text-align:right;font-variant-numeric:tabular-nums}tr.worst td:first-child{border-left:4px solid #c0392b;font-weight:600}
tr.worst{background:#fdecea}.note{color:#5a6475;font-size:12px;margin:4px 0 8px}
figure{margin:0 0 16px}figure img{max-width:100%;height:auto;border:1px solid #e3e8ee;border-radius:6px}
figcaption{font-size:12px;color:#5a6475}.grid{display:flex;flex-wrap:wrap;gap:10px}
.ex{width:170px;margin:0}.ex img{width:160px;height:160px;object-fit:contain;background:#fafafa;border:3px solid}
.ex.wide{width:334px}.ex.wide img{width:324px}.ex.ok img{border-color:#2e8b57}.ex.bad img{border-color:#c0392b}
table.kv th{width:180px;color:#5a6475;cursor:default;position:static;background:none}pre{white-space:pre-wrap;font-size:12px}
footer{color:#8a93a3;font-size:12px;padding:0 32px 24px}
"""

SORT_JS = """
function sortTable(th){const t=th.closest('table'),i=[...th.parentNode.children].indexOf(th),
b=t.tBodies[0],asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
const v=r=>{const s=r.children[i].dataset.v;const f=parseFloat(s);return s===''?null:(isNaN(f)?s:f)};
[...b.rows].sort((x,y)=>{const a=v(x),c=v(y);if(a===null)return 1;if(c===null)return -1;
return (a<c?-1:a>c?1:0)*(asc?1:-1)}).forEach(r=>b.appendChild(r))}
"""


# ---------------------------------------------------------------- training, data, task correlation

def training_section(report_dir: Path, history: dict | None) -> str:
    """Learning curves of the training history (history.json of the model folder)."""
    if not history or not history.get("epochs"):
        return ""
    epochs = history["epochs"]
    path = plots.learning_curves_png(epochs, report_dir / "learning_curves.png",
                                     f"learning curves ({history['stage']})", history.get("best_epoch"))
    last = epochs[-1]
    facts = [("stage", _e(history["stage"])), ("epochs", _num(len(epochs))),
             ("best epoch", _num(history.get("best_epoch"))), ("last train loss", _num(last.get("train_loss"))),
             ("last val loss", _num(last.get("val_loss"))), ("last lr", f"{last['lr']:.3g}" if last.get("lr") else "–")]
    fact_html = "".join(f"<div><span>{k}</span><b>{v}</b></div>" for k, v in facts)
    caption = ("Loss and accuracy per epoch (dashed: train, running mean over the epoch's batches; solid: "
               "validation split), and the learning rate of each epoch's last step. The weights kept are "
               "those of the best epoch (lowest val loss) for heads, the last epoch for fine-tuning.")
    return (f'<section id="training"><h2>Training <small>history.json of the model folder</small></h2>'
            f'<div class="facts">{fact_html}</div>{_figure(path, caption)}</section>')


def _largest(sizes: list[int], limit: int = plots.MAX_CONFUSION_CLASSES) -> list[int]:
    """Indices of the ``limit`` largest entries, in their original order."""
    return sorted(np.argsort(-np.asarray(sizes), kind="mergesort")[:limit].tolist())


def data_section(report_dir: Path, metrics: dict, samples: dict | None) -> str:
    """Per class task: rows per class and split (class_sizes) and a grid of sample photos."""
    sizes = metrics.get("class_sizes") or {}
    parts = []
    for task, entry in sizes.items():
        slug = safe_name(task)
        figs = [_figure(plots.class_sizes_png(entry["counts"], f"{task}: labelled rows per class and split",
                                              report_dir / f"class_sizes_{slug}.png"),
                        "Labelled rows of each class in each split of the data given to evaluate "
                        "(metrics.json class_sizes; unlabelled rows: "
                        + ", ".join(f"{k} {v}" for k, v in entry["unlabelled"].items()) + ").")]
        grid = (samples or {}).get(task)
        if grid:
            figs.append(_figure(plots.sample_grid_png(grid, f"{task}: sample photos per class",
                                                      report_dir / f"samples_{slug}.png"),
                                "A few photos of each class (random, seeded) from the evaluated rows; "
                                "with more than 40 classes, the 40 largest."))
        parts.append(f'<h3>{_e(task)}</h3><div class="figs">{"".join(figs)}</div>')
    if not parts:
        return ""
    return f'<section id="data"><h2>Data <small>class sizes and sample photos</small></h2>{"".join(parts)}</section>'


def _pair_figure(report_dir: Path, name: str, pair: dict) -> Path:
    slug = f"correlation_{safe_name(pair['tasks'][0])}__{safe_name(pair['tasks'][1])}.png"
    if pair["kind"] == "class x class":
        table = np.asarray(pair["contingency"], dtype=np.float64).reshape(len(pair["rows"]), len(pair["columns"]))
        r, c = _largest(table.sum(axis=1).tolist()), _largest(table.sum(axis=0).tolist())
        sub = table[np.ix_(r, c)]
        share = np.divide(sub, table[r].sum(axis=1, keepdims=True), out=np.full_like(sub, np.nan),
                          where=table[r].sum(axis=1, keepdims=True) > 0)
        v = pair["cramers_v"]
        return plots.heatmap_png(share, [pair["rows"][i] for i in r], [pair["columns"][j] for j in c],
                                 f"{name}: share of each {pair['tasks'][0]} row per {pair['tasks'][1]} "
                                 f"(Cramér's V {'–' if v is None else f'{v:.2f}'})", report_dir / slug,
                                 f"share of the {pair['tasks'][0]} class")
    support = [sum(row) for row in pair["support"]]
    r = _largest(support)
    return plots.heatmap_png([pair["rate"][i] for i in r], [pair["classes"][i] for i in r], pair["tags"],
                             f"{name}: share of each class's rows with the tag", report_dir / slug,
                             "share with the tag")


def correlation_section(report_dir: Path, metrics: dict) -> str:
    """Pairs of tasks: Cramér's V per pair (per tag for tags) and a heat map per pair."""
    corr = metrics.get("task_correlation") or {}
    pairs = corr.get("pairs") or {}
    if not pairs:
        return ""
    rows, figs = [], []
    for name, pair in pairs.items():
        if pair["kind"] == "class x class":
            strength = _num(pair["cramers_v"])
        else:
            strength = ", ".join(f"{_e(t)} {_num(v)}" for t, v in pair["cramers_v"].items())
        rows.append(f"<tr><td>{_e(name)}</td><td>{_e(pair['kind'])}</td><td class=n>{_num(pair['n'])}</td>"
                    f"<td>{strength}</td></tr>")
        what = (f"each {pair['tasks'][0]} class (row) split over the {pair['tasks'][1]} classes "
                "(row shares of the contingency table)" if pair["kind"] == "class x class" else
                f"share of each {pair['tasks'][0]} class's rows that carry each tag (grey: no labelled row)")
        figs.append(_figure(_pair_figure(report_dir, name, pair), f"{name}: {what}; at most the 40 largest classes."))
    splits = ", ".join(corr.get("splits") or [])
    return ('<section id="correlation"><h2>Correlation between tasks <small>on the labels of '
            f'{_num(corr.get("rows"))} rows, splits: {_e(splits)}</small></h2><p class="note">Cramér\'s V: 0 = the '
            'labels of one task say nothing about the other, 1 = one determines the other. Computed on the '
            'labels, not the predictions; metrics.json task_correlation holds the tables.</p>'
            '<table><thead><tr><th>tasks</th><th>kind</th><th>rows</th><th>Cramér\'s V</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table><div class="figs">{"".join(figs)}</div></section>')


def render_html(title: str, metrics: dict, tasks: list[TaskInfo], sections: list[str], context: dict | None,
                examples: list[dict] | None, extra: dict[str, str] | None = None) -> str:
    """The whole page as one string."""
    ctx = context or {}
    sub = " · ".join(f"{k}: {_e(ctx[k])}" for k in ("model", "data", "rows") if k in ctx)
    links = [(f"task-{safe_name(t.name)}", t.name) for t in tasks if t.name in metrics]
    extra = extra or {}
    links += [(a, a) for a in ("training", "data", "correlation") if extra.get(a)]
    links += [(a, b) for a, b, ok in (("hierarchy", "hierarchy", "hierarchy" in metrics),
                                      ("examples", "examples", bool(examples)), ("context", "context", bool(context))) if ok]
    nav = "".join(f'<a href="#{a}">{_e(b)}</a>' for a, b in links)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width,initial-scale=1"><title>{_e(title)}</title><style>{CSS}</style></head>'
            f'<body><header><h1>{_e(title)}</h1><p>{sub}</p></header><nav>{nav}</nav><main>'
            f'{headline_cards(metrics, tasks)}{"".join(sections)}{hierarchy_section(metrics)}'
            f'{extra.get("training", "")}{extra.get("data", "")}{extra.get("correlation", "")}'
            f'{examples_section(examples)}{context_section(context)}</main>'
            f'<footer>catalens evaluation report · {stamp} · metrics.json and per_class_*.csv beside this file</footer>'
            f'<script>{SORT_JS}</script></body></html>')


# ---------------------------------------------------------------- entry point

def write_report(report_dir: str | Path, metrics: dict, tasks: list[TaskInfo], y: dict, probs: dict, title: str,
                 context: dict | None = None, examples: list[dict] | None = None,
                 pred_index: dict | None = None, samples: dict | None = None, history: dict | None = None) -> Path:
    """Write the report folder and return the path of ``report.html``.

    Files: ``metrics.json`` (``metrics`` plus ``"context"`` when given), per task
    ``per_class_<task>.csv``, ``calibration_<task>.png``, ``counts_<task>.png``, and
    ``confusion_<task>.png`` (class tasks) or ``pr_<task>.png`` (tags tasks); then
    ``report.html`` with all of it inline. ``examples``: ``{"image_b64", "caption", "correct"}``;
    ``pred_index``: ``{task: decided class per row}`` where it is not the argmax (hierarchy decoding).
    Also, when given: ``learning_curves.png`` from ``history`` (history.json as a dict),
    ``class_sizes_<task>.png`` from ``metrics["class_sizes"]``, ``samples_<task>.png`` from
    ``samples`` (``{task: {class: [PIL images]}}``) and ``correlation_<a>__<b>.png`` per pair of
    ``metrics["task_correlation"]``.
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    write_json(report_dir / "metrics.json", {**metrics, "context": context} if context is not None else metrics)
    sections = []
    for t in tasks:
        m = metrics.get(t.name)
        if not m:
            continue
        rows = per_class_rows(t, m)
        write_per_class_csv(report_dir / f"per_class_{safe_name(t.name)}.csv", rows)
        figs = task_figures(report_dir, t, m, y[t.name], probs[t.name], (pred_index or {}).get(t.name))
        sections.append(task_section(t, m, rows, figs))
    extra = {"training": training_section(report_dir, history), "data": data_section(report_dir, metrics, samples),
             "correlation": correlation_section(report_dir, metrics)}
    page = render_html(title, metrics, tasks, sections, context, examples, extra)
    return atomic_write_bytes(report_dir / "report.html", page.encode("utf-8"))
