"""``catalens evaluate``: a model on labelled data → metrics.json + report.html."""
from __future__ import annotations

import base64
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from catalens.config import Config
from catalens.embed.cache import EmbeddingCache
from catalens.embed.features import engine_config
from catalens.evaluate.overview import sample_thumbnails
from catalens.ingest.catalogue import Catalogue
from catalens.ingest.open import open_catalogue
from catalens.model.load import load_model
from catalens.model.predictor import stream_probabilities
from catalens.tasks import MISSING

logger = logging.getLogger(__name__)


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


def _model_outputs(model, cat: Catalogue, cfg: Config):
    """Probabilities for every row (fused with titles when the model has a title model), which
    rows decoded, and the problems of those that did not."""
    cache = EmbeddingCache(cfg.cache_dir, model.backbone.fingerprint(), model.backbone.feature_dim,
                           jpeg=model.backbone.preprocess.decoder())  # the decoder model.json records
    probs = {t.name: np.zeros((len(cat), t.n_outputs), np.float32) for t in model.tasks}
    ok = np.zeros(len(cat), dtype=bool)
    problems: list[dict] = []
    for block in stream_probabilities(model, cat, cache, engine_config(cfg)):
        for k, v in block.probs.items():
            probs[k][block.rows] = v
        ok[block.rows] = block.ok
        problems += [{"row": r, "problem": p.split(":", 1)[0], "detail": p.split(": ", 1)[-1]}
                     for r, p in block.problems.items()]
    return probs, ok, problems


def _examples(model, cat: Catalogue, y: dict, probs: dict, ok: np.ndarray, limit: int = 24,
              label: dict | None = None) -> list[dict]:
    """Thumbnails of the most confident mistakes of the first class task (``label``: the
    decided class per row, as predict writes it)."""
    from PIL import Image

    from catalens.ingest.images import decode

    task = next((t for t in model.tasks if t.kind == "class"), None)
    if task is None:
        return []
    yt, p = y[task.name], probs[task.name]
    pred = (label or {}).get(task.name, p.argmax(1))
    conf = p[np.arange(len(p)), pred]
    wrong = np.where(ok & (yt != MISSING) & (pred != yt))[0]
    wrong = wrong[np.argsort(-conf[wrong], kind="stable")][:limit]
    out = []
    heat = _heatmaps(model, cat, wrong, task.name, pred)
    for i in wrong:
        try:
            im = decode(cat.read_bytes(int(i)), draft_to=160)
        except Exception:
            continue
        im.thumbnail((160, 160), Image.Resampling.BILINEAR)
        if int(i) in heat:  # the photo and, beside it, where the evidence for the wrong label lies
            h = Image.fromarray(heat[int(i)]).resize(im.size, Image.Resampling.BILINEAR)
            pair = Image.new("RGB", (im.width * 2 + 4, im.height), "white")
            pair.paste(im.convert("RGB"), (0, 0))
            pair.paste(h, (im.width + 4, 0))
            im = pair
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=80)
        out.append({"image_b64": base64.b64encode(buf.getvalue()).decode(), "correct": False,
                    "heatmap": int(i) in heat,
                    "caption": f"{cat.frame['id'].iat[i]}: true {task.classes[yt[i]]}, "
                               f"predicted {task.classes[pred[i]]} ({conf[i]:.2f})"})
    return out


def _heatmaps(model, cat: Catalogue, rows: np.ndarray, task: str, pred: np.ndarray) -> dict[int, np.ndarray]:
    """Grad-CAM overlays (``{row: uint8 image}``) of the decided label of ``rows``; empty for a
    model Grad-CAM cannot explain (a backbone without a CNN feature map)."""
    from catalens.ingest.images import ImageProblem, load_rgb
    from catalens.model.explain import ExplainError, grad_cam, overlay

    keep, pix = [], []
    for i in rows:
        try:
            pix.append(load_rgb(cat.read_bytes(int(i)), model.preprocess))
            keep.append(int(i))
        except (ImageProblem, OSError, AttributeError):
            continue
    if not keep:
        return {}
    try:
        heat, _ = grad_cam(model, np.stack(pix), task, np.asarray(pred)[keep])
    except ExplainError as e:
        logger.info(f"report: no heatmaps ({e})")
        return {}
    except RuntimeError as e:  # the heatmaps decorate the report; a torch failure must not lose it
        logger.warning(f"report: Grad-CAM heatmaps failed ({e}); the examples are shown without them")
        return {}
    return {r: overlay(p, h) for r, p, h in zip(keep, pix, heat)}


def _runtime_note(runtime: str) -> str:
    """The runtime that computed the features, and when it is lossy that the answers are its own."""
    from catalens.embed.runtimes import runtime_precision

    precision = runtime_precision(runtime)
    if precision == "fp32":
        return runtime
    if precision == "int8":
        return (f"{runtime} (int8 features: answers can differ from fp32's; catalens export --openvino-int8 "
                f"measures by how much)")
    return f"{runtime} ({precision} features)"


def evaluate_model(model_dir: str | Path, data: str | Path, report_dir: str | Path, cfg: Config,
                   log=None) -> EvalResult:
    """Evaluate the model folder on ``data`` and write the report folder."""
    from catalens.evaluate.metrics import compute_metrics
    from catalens.evaluate.report import write_report

    log = log or logger.info
    t0 = time.time()
    model = load_model(model_dir)
    full = open_catalogue(data)
    cat, which = evaluation_rows(full)
    log(f"evaluating {model_dir} on {len(cat)} images of {data} ({which})")
    y_all = cat.encode(model.tasks)
    _require_known_labels(cat, model, y_all, data)  # before the embedding pass: fail fast
    probs, ok, problems = _model_outputs(model, cat, cfg)
    y = {k: (np.where(ok, v, MISSING) if v.ndim == 1 else np.where(ok[:, None], v, np.nan)) for k, v in y_all.items()}
    paths = [p for v in model.meta.get("hierarchy_paths", {}).values() for p in v]
    decoder = model.decoder
    decoded = decoder.decoded_index(probs) or None  # the labels predict gives (hierarchy decoding)
    if decoded is not None:
        before = compute_metrics(model.tasks, y, probs, known_paths=paths).get("hierarchy", {})
    metrics = compute_metrics(model.tasks, y, probs, known_paths=paths or None, pred_index=decoded)
    from catalens.evaluate.selective import add_selective

    add_selective(metrics, model.tasks, model.meta.get("accept"), y, probs, decoded)
    unknown = model.meta.get("unknown")
    if unknown:  # share of the evaluated photos the model would flag as none of its classes
        from catalens.model.unknown import unknown_score

        scores = unknown_score({k: v[ok] for k, v in probs.items()}, unknown["tasks"], unknown["method"])
        metrics["unknown"] = {"method": unknown["method"], "threshold": unknown["threshold"],
                              "flagged_share": float((scores > unknown["threshold"]).mean()) if scores.size else None}
    for chain, m in (metrics.get("hierarchy") or {}).items() if decoded is not None else ():
        m["consistent_share_before_decoding"] = before.get(chain, {}).get("consistent_share")
    if cat.frame["product_id"].duplicated().any():  # several photos per product: also per product
        from catalens.evaluate.products import product_metrics

        metrics["product_level"] = product_metrics(
            model.tasks, cat.frame["product_id"].to_numpy(), y, probs, ok, known_paths=paths or None,
            hierarchy_paths=model.meta["hierarchy_paths"] if decoded is not None else None,
            accept=model.meta.get("accept"))
    context = {"model": str(model_dir), "data": str(data), "rows": which, "images": len(cat),
               "excluded": int((~ok).sum()), "problems": problems[:100],
               "unknown_labels": cat.meta.get("unknown_labels", {}),
               "backbone": model.meta["backbone"]["name"], "runtime": _runtime_note(cfg.engine.runtime),
               "seconds": round(time.time() - t0, 1)}
    refit = model.meta.get("refit_full")
    if refit:  # data.refit_full: photos of its train and val splits are in-sample
        context["refit_full"] = (f"fitted again on train + val ({refit['rows']} photos)" if "rows" in refit else
                                 f"members {refit.get('members')} fitted again on train + val")
    if model.meta.get("preset"):  # catalens train --preset: its leaderboard (CV over train+val) in the report
        context["preset leaderboard"] = [{k: v for k, v in row.items() if k in ("recipe", "cv_score", "fit_seconds",
                                                                              "predict_img_s", "weight", "status")}
                                         for row in model.meta["preset"].get("leaderboard", [])]
        dec = model.meta["preset"].get("hierarchy_decoding")
        if dec:  # whether it decodes label paths, and the out-of-fold scores that decided it
            from catalens.train.presets import decoding_summary

            context["preset hierarchy decoding"] = decoding_summary(dec)
    history = _overview(metrics, model, full, model_dir)
    report = write_report(report_dir, metrics, model.tasks, y, probs,
                          title=f"catalens report: {Path(model_dir).name} on {Path(data).name}",
                          context=context, examples=_examples(model, cat, y, probs, ok, label=decoded),
                          pred_index=decoded, samples=sample_thumbnails(cat, model.tasks, seed=cfg.seed),
                          history=history)
    for name, m in metrics.items():
        if isinstance(m, dict) and m.get("kind") == "class":
            log(f"  {name}: accuracy {_f(m['accuracy'])}, top-5 {_f(m['top5_accuracy'])}, "
                f"macro-F1 {_f(m['macro_f1'])}, weighted-F1 {_f(m['weighted_f1'])} (n={m['n']})")
            sel = m.get("selective") or {}
            if sel.get("target_precision") is not None:
                log(f"  {name}: auto-accepted {_f(sel['coverage'])} of photos at precision {_f(sel['precision'])} "
                    f"(target {sel['target_precision']}, threshold {sel['threshold']})")
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


def _overview(metrics: dict, model, full: Catalogue, model_dir) -> dict | None:
    """Add ``class_sizes``, ``task_correlation`` (both on every split of the data given) and
    ``learning_curves`` (from the folder's history.json) to ``metrics``; return the history."""
    from catalens.evaluate.overview import class_sizes, task_correlation
    from catalens.model.format import read_history

    metrics["class_sizes"] = class_sizes(full, model.tasks)
    metrics["task_correlation"] = task_correlation(full, model.tasks)
    history = read_history(model_dir)
    if history is None:
        metrics["learning_curves"] = None
        return None
    metrics["learning_curves"] = {"file": "learning_curves.png", "stage": history.stage,
                                  "epochs": len(history.epochs), "best_epoch": history.best_epoch}
    return history.model_dump()


def _labelled(y: dict) -> np.ndarray:
    """Rows with at least one label the model knows (any task)."""
    have = [(v != MISSING) if v.ndim == 1 else ~np.isnan(v).all(axis=1) for v in y.values()]
    return np.logical_or.reduce(have) if have else np.zeros(0, dtype=bool)


def _require_known_labels(cat: Catalogue, model, y: dict, data) -> None:
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
