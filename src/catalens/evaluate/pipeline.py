"""``catalens evaluate``: a model on labelled data → metrics.json + report.html."""
from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from catalens.artifact import CatalensModel
from catalens.config import Config
from catalens.embed.cache import EmbeddingCache
from catalens.embed.engine import stream_features
from catalens.ingest.catalogue import Catalogue
from catalens.ingest.sources import open_catalogue
from catalens.tasks import MISSING
from catalens.predict.predictor import model_probabilities
from catalens.train.features import engine_config


@dataclass
class EvalResult:
    metrics: dict
    report: Path
    n_images: int
    excluded: int


def evaluation_rows(cat: Catalogue) -> tuple[Catalogue, str]:
    """The rows to evaluate: the ``test`` split when there is one, else every row."""
    if cat.has_split("test"):
        return cat.split("test"), "test split"
    if cat.frame["split"].notna().any():
        raise ValueError("the data has splits but no 'test' split; evaluate a folder or table of "
                         "test images, or add test rows")
    return cat, "all rows (no split)"


def _model_outputs(model: CatalensModel, cat: Catalogue, cfg: Config, n_examples: int = 24):
    """Probabilities for every row, which rows decoded, and thumbnails of some rows."""
    cache = EmbeddingCache(cfg.cache_dir, model.backbone.fingerprint(), model.backbone.feature_dim)
    probs = {t.name: np.zeros((len(cat), t.n_outputs), np.float32) for t in model.tasks}
    ok = np.zeros(len(cat), dtype=bool)
    problems: list[dict] = []
    with torch.inference_mode():
        for block in stream_features(cat, model.backbone, cache, engine_config(cfg)):
            p = model_probabilities(model, block.features, cat, block.rows)  # + titles when the model has a title model
            for k, v in p.items():
                probs[k][block.rows] = v
            ok[block.rows] = block.ok
            problems += block.problems
    return probs, ok, problems


def _examples(model: CatalensModel, cat: Catalogue, y: dict, probs: dict, ok: np.ndarray, limit: int = 24) -> list[dict]:
    """Thumbnails of the most confident mistakes of the first class task."""
    from PIL import Image

    from catalens.ingest.images import decode

    task = next((t for t in model.tasks if t.kind == "class"), None)
    if task is None:
        return []
    yt, p = y[task.name], probs[task.name]
    wrong = np.where(ok & (yt != MISSING) & (p.argmax(1) != yt))[0]
    wrong = wrong[np.argsort(-p[wrong].max(1))][:limit]
    out = []
    for i in wrong:
        try:
            im = decode(cat.read_bytes(int(i)), draft_to=160)
        except Exception:
            continue
        im.thumbnail((160, 160), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=80)
        out.append({"image_b64": base64.b64encode(buf.getvalue()).decode(), "correct": False,
                    "caption": f"{cat.frame['id'].iat[i]}: true {task.classes[yt[i]]}, "
                               f"predicted {task.classes[p[i].argmax()]} ({p[i].max():.2f})"})
    return out


def evaluate_model(model_dir: str | Path, data: str | Path, report_dir: str | Path, cfg: Config,
                   log=print) -> EvalResult:
    """Evaluate the model folder on ``data`` and write the report folder."""
    from catalens.evaluate.metrics import compute_metrics
    from catalens.evaluate.report import write_report

    t0 = time.time()
    model = CatalensModel.load(model_dir)
    cat, which = evaluation_rows(open_catalogue(data))
    log(f"evaluating {model_dir} on {len(cat)} images of {data} ({which})")
    y_all = cat.encode(model.tasks)
    _require_known_labels(cat, model, y_all, data)  # before the embedding pass: fail fast
    probs, ok, problems = _model_outputs(model, cat, cfg)
    y = {k: (np.where(ok, v, MISSING) if v.ndim == 1 else np.where(ok[:, None], v, np.nan)) for k, v in y_all.items()}
    paths = [p for v in model.meta.get("hierarchy_paths", {}).values() for p in v]
    decoded = None
    if model.meta.get("hierarchy_decoding") and paths:  # the model predicts the best known path
        from catalens.heads.hierarchy import decode_hierarchy

        decoded = decode_hierarchy(model.tasks, probs, model.meta["hierarchy_paths"])
        before = compute_metrics(model.tasks, y, probs, known_paths=paths).get("hierarchy", {})
    metrics = compute_metrics(model.tasks, y, probs, known_paths=paths or None, pred_index=decoded)
    for chain, m in (metrics.get("hierarchy") or {}).items() if decoded is not None else ():
        m["consistent_share_before_decoding"] = before.get(chain, {}).get("consistent_share")
    if cat.frame["product_id"].duplicated().any():  # several photos per product: also per product
        from catalens.predict.aggregate import product_metrics

        metrics["product_level"] = product_metrics(
            model.tasks, cat.frame["product_id"].to_numpy(), y, probs, ok, known_paths=paths or None,
            hierarchy_paths=model.meta["hierarchy_paths"] if decoded is not None else None)
    context = {"model": str(model_dir), "data": str(data), "rows": which, "images": len(cat),
               "excluded": int((~ok).sum()), "problems": problems[:100],
               "unknown_labels": cat.meta.get("unknown_labels", {}),
               "backbone": model.meta["backbone"]["name"], "seconds": round(time.time() - t0, 1)}
    report = write_report(report_dir, metrics, model.tasks, y, probs,
                          title=f"catalens report: {Path(model_dir).name} on {Path(data).name}",
                          context=context, examples=_examples(model, cat, y, probs, ok))
    for name, m in metrics.items():
        if isinstance(m, dict) and m.get("kind") == "class":
            log(f"  {name}: accuracy {_f(m['accuracy'])}, top-5 {_f(m['top5_accuracy'])}, "
                f"macro-F1 {_f(m['macro_f1'])}, weighted-F1 {_f(m['weighted_f1'])} (n={m['n']})")
        elif isinstance(m, dict) and m.get("kind") == "tags":
            log(f"  {name}: micro-F1 {_f(m['micro_f1'])}, macro-F1 {_f(m['macro_f1'])}, "
                f"mAP {_f(m['mean_average_precision'])} (n={m['n']})")
    for name, m in (metrics.get("product_level") or {}).items():
        if isinstance(m, dict) and m.get("kind") == "class":
            log(f"  per product {name}: accuracy {_f(m['accuracy'])}, macro-F1 {_f(m['macro_f1'])} "
                f"({metrics['product_level']['products']} products)")
    if problems:
        log(f"  {len(problems)} images could not be read and are excluded (listed in metrics.json context)")
    log(f"report: {report}")
    return EvalResult(metrics, Path(report), len(cat), int((~ok).sum()))


def _labelled(y: dict) -> np.ndarray:
    """Rows with at least one label the model knows (any task)."""
    have = [(v != MISSING) if v.ndim == 1 else ~np.isnan(v).all(axis=1) for v in y.values()]
    return np.logical_or.reduce(have) if have else np.zeros(0, dtype=bool)


def _require_known_labels(cat: Catalogue, model: CatalensModel, y: dict, data) -> None:
    """Refuse to score data none of whose labels the model knows (metrics over n=0 mean nothing)."""
    if len(cat) and _labelled(y).any():
        return
    lines = []
    for t in model.tasks:
        if t.kind == "class" and t.name in cat.frame:
            seen = sorted({v for v in cat.frame[t.name] if isinstance(v, str)})
            lines.append(f"task '{t.name}': the data's labels {seen[:8]}{' ...' if len(seen) > 8 else ''} "
                         f"are not among the model's {len(t.classes)} classes {t.classes[:8]}"
                         f"{' ...' if len(t.classes) > 8 else ''}")
        elif t.kind == "class" or not any(c.startswith(f"{t.name}/") for c in cat.frame.columns):
            lines.append(f"task '{t.name}': the data has no such task (its tasks: {cat.task_names})")
        else:
            lines.append(f"task '{t.name}': every tag is empty")
    raise ValueError(f"none of the {len(cat)} images of '{data}' has a label the model knows, so there is "
                     f"nothing to score:\n  " + "\n  ".join(lines) +
                     "\nEvaluate on data labelled with the model's classes (listed in MODEL/model.json), "
                     "or use 'catalens predict' for unlabelled data.")


def _f(v) -> str:
    """A metric for a log line ('n/a' when undefined, e.g. no labelled rows)."""
    return "n/a" if v is None else f"{v:.4f}"
