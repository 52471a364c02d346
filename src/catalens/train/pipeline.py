"""``catalens train``: ingest → embed (cached) → fit heads → tune thresholds → model folder.

Under ``torchrun`` (``catalens train ... --finetune``, see :mod:`catalens.distributed`)
rank 0 does all of it; the other ranks receive its linear probe and take part in fine-tuning only.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from catalens.model.single import CatalensModel
from catalens.config import Config
from catalens.embed.factory import backbone_from_config
from catalens.heads import head_from_config
from catalens.ingest.catalogue import Catalogue
from catalens.ingest.open import open_catalogue
from catalens.tasks import TaskInfo, hierarchy_levels, labelled_rows
from catalens import distributed as ddp
from catalens.embed.features import catalogue_features
from catalens.train.classes import merged_selections, select_classes, write_selection
from catalens.train.ingest_report import DataProblemError, format_summary, write_ingest_report
from catalens.train.refit import check_refit, refit_rows
from catalens.train.splits import ensure_splits

_logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: CatalensModel
    folder: Path
    metrics: dict
    seconds: float


def training_tasks(cat: Catalogue) -> list[TaskInfo]:
    """Tasks with the class order seen in the training split (other labels become unknown)."""
    train = cat.frame[cat.frame["split"] == "train"]
    out = []
    for t in cat.tasks:
        if t.kind == "class":
            classes = sorted({str(v) for v in train[t.name].dropna()})
            out.append(TaskInfo(t.name, "class", classes, t.parent))
        else:
            out.append(TaskInfo(t.name, "tags", list(t.classes)))
    return out


def known_paths(cat: Catalogue, tasks: list[TaskInfo]) -> dict[str, list[list[str]]]:
    """For each hierarchy chain, the label paths seen in training (for consistency checks)."""
    train = cat.frame[cat.frame["split"] == "train"]
    out = {}
    for chain in hierarchy_levels(tasks):
        rows = train[chain].dropna().drop_duplicates()
        out[" > ".join(chain)] = sorted(rows.astype(str).values.tolist())
    return out


def _select(Y: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[mask] for k, v in Y.items()}


def train(data: str | Path, out: str | Path, cfg: Config, log=None, heldout=None) -> TrainResult:
    """Train a model on ``data`` and write it to the folder ``out``; returns the result.

    ``heldout`` (:class:`catalens.train.flags.HeldOut`): out-of-fold probabilities of the training
    photos from a cross-validation of this same recipe (``--preset``), which the auto-accept
    thresholds then use instead of fitting ``selective.folds`` heads again.

    Under torchrun every rank calls this; rank 0 writes the folder, the others return a result
    whose ``model`` is None once it has.
    """
    log = log or _logger.info
    with ddp.process_group():
        return _train(data, out, cfg, log if ddp.is_main() else (lambda *_: None), heldout)


def _train(data: str | Path, out: str | Path, cfg: Config, log=None, heldout=None) -> TrainResult:
    log = log or _logger.info
    from catalens.evaluate.metrics import compute_metrics
    from catalens.evaluate.thresholds import tune_thresholds

    t0 = time.time()
    out = Path(out)
    check_refit(cfg)
    cat = data if isinstance(data, Catalogue) else open_catalogue(data)
    cat, split_note = ensure_splits(cat, cfg.data.val_fraction, cfg.data.test_fraction, cfg.seed)
    if split_note:
        log(split_note)
    fit_cat = cat.subset(cat.frame["split"].isin(["train", "val"]).to_numpy())
    fit_cat, selection = select_classes(fit_cat, merged_selections(cat, cfg.data.classes))
    log(f"data: {len(cat)} images ({cat.source}), training on {int((fit_cat.frame['split'] == 'train').sum())} "
        f"train + {int((fit_cat.frame['split'] == 'val').sum())} val; tasks: "
        + ", ".join(f"{t.name} ({t.kind}, {t.n_outputs})" for t in cat.tasks))
    backbone = backbone_from_config(cfg.backbone)
    if cfg.finetune.mode != "none":  # before the embedding: a multi-backbone cannot be fine-tuned
        from catalens.train.finetune import check_finetunable

        check_finetunable(backbone)
    tasks = training_tasks(fit_cat)
    Y = fit_cat.encode(tasks)
    ingest_dir = out / "ingest"
    h = cfg.head
    usable = head = None
    if ddp.is_main():  # torchrun: embedding, ingest report and linear probe on rank 0; the others wait
        feats = catalogue_features(fit_cat, backbone, cfg)
        summary = write_ingest_report(ingest_dir, fit_cat, feats.problems, feats.notes, cfg.data.min_class_count,
                                      selection=selection)
        write_selection(ingest_dir, selection)
        log(format_summary(summary, ingest_dir))
        if cfg.data.strict and feats.problems:
            raise DataProblemError(f"--strict: {len(feats.problems)} images have problems; "
                                   f"see {ingest_dir / 'problems.csv'}")
        usable = labelled_rows(tasks, Y, feats.ok)
        is_train = (fit_cat.frame["split"] == "train").to_numpy() & usable
        is_val = (fit_cat.frame["split"] == "val").to_numpy() & usable
        if is_train.sum() == 0:
            raise ValueError("no usable training images (all failed or unlabelled); see "
                             + str(ingest_dir / "problems.csv"))
        head = head_from_config(h, tasks, cfg.seed)
        head.fit(feats.features[is_train], _select(Y, is_train), feats.features[is_val], _select(Y, is_val))
        log(f"heads: {h.type}, best epoch {head.best_epoch_} of {len(head.history_)}")
        probs_val = head.predict_proba(feats.features[is_val])
    usable, head = ddp.broadcast_object((usable, head))  # torchrun: rank 0's rows and probe everywhere
    is_train = (fit_cat.frame["split"] == "train").to_numpy() & usable
    is_val = (fit_cat.frame["split"] == "val").to_numpy() & usable
    Yv = _select(Y, is_val)
    finetuned = None
    if cfg.finetune.mode != "none":  # fine-tune from this linear probe (LP-FT); see train/finetune.py
        from catalens.train.finetune import finetune

        finetuned = finetune(fit_cat, tasks, Y, is_train, is_val, backbone, head, cfg, out / ".finetune", log=log)
        backbone, head, probs_val = finetuned.backbone, finetuned.head, finetuned.probs_val
    if not ddp.is_main():  # torchrun: this rank's part is done once rank 0 has written the folder
        ddp.barrier()
        return TrainResult(None, out, {}, time.time() - t0)
    text_part = None
    if cfg.text.enabled:  # title model fused with the head (catalens/text); thresholds then tuned on fused
        from catalens.text.fusion import fit_text_fusion

        titles = fit_cat.frame["text"].to_numpy(dtype=object)
        text_rows = (fit_cat.frame["split"] == "train").to_numpy() & labelled_rows(tasks, Y)
        text_part = fit_text_fusion(tasks, titles[text_rows], _select(Y, text_rows), titles[is_val], Yv, probs_val,
                                    cfg.text, log=log)
        if text_part is not None:
            probs_val = text_part.fuse(probs_val, titles[is_val])
    for t in tasks:
        if t.kind == "tags":
            t.thresholds = [float(x) for x in tune_thresholds(Yv[t.name], probs_val[t.name])] \
                if is_val.any() else [0.5] * t.n_outputs
    paths = known_paths(fit_cat, tasks)
    decoded = None
    if cfg.hierarchy_decoding and is_val.any():  # most probable seen path (the model's decoder)
        from catalens.model.decode import Decoder

        decoded = Decoder(tasks, paths, True).decoded_index(probs_val)
        before = compute_metrics(tasks, Yv, probs_val, known_paths=_flat_paths(paths)).get("hierarchy", {})
    val_metrics = compute_metrics(tasks, Yv, probs_val, known_paths=_flat_paths(paths),
                                  pred_index=decoded) if is_val.any() else {}
    if decoded is not None and "hierarchy" in val_metrics:
        for chain, m in val_metrics["hierarchy"].items():
            m["consistent_share_before_decoding"] = before.get(chain, {}).get("consistent_share")
            log(f"  val {chain}: consistent {_f(m['consistent_share_before_decoding'])} -> "
                f"{_f(m['consistent_share'])} with hierarchy decoding")
    from catalens.train.flags import decision_flags

    flags = decision_flags(fit_cat, tasks, paths, Y, feats.features, is_train, is_val, probs_val, cfg,
                           oof_allowed=finetuned is None and text_part is None, log=log, heldout=heldout)
    meta = {"hierarchy_paths": paths, "metrics": {"val": val_metrics}, "data": data_name(data), **flags,
            "split": split_note, "train_images": int(is_train.sum()), "val_images": int(is_val.sum()),
            "ingest": {k: summary[k] for k in ("images", "excluded", "problems", "class_selection") if k in summary},
            "seed": cfg.seed,
            "head_config": h.model_dump(), "hierarchy_decoding": bool(cfg.hierarchy_decoding),
            "text": cfg.text.model_dump() if text_part is not None else None}
    if cfg.data.refit_full:  # every decision above was made on val: now learn from train + val
        titles = fit_cat.frame["text"].to_numpy(dtype=object) if text_part is not None else None
        meta["refit_full"] = refit_rows(head, text_part, tasks, feats.features, Y, titles, is_train | is_val,
                                        labelled_rows(tasks, Y), cfg.text, log=log)
    if finetuned is not None:
        meta["finetune"] = finetuned.meta
    if cfg.finetune.tta:
        meta["tta"] = list(cfg.finetune.tta)
    model = CatalensModel(backbone, head, meta)
    model.text = text_part
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    if split_note:
        cat.frame[["id", "product_id", "split"]].to_csv(ingest_dir / "split.csv", index=False)
    model.save(out)
    ddp.barrier()  # torchrun: the other ranks wait for the folder
    seconds = time.time() - t0
    for name, m in val_metrics.items():
        if isinstance(m, dict) and m.get("kind") == "class":
            log(f"  val {name}: accuracy {_f(m['accuracy'])}, macro-F1 {_f(m['macro_f1'])}")
        elif isinstance(m, dict) and m.get("kind") == "tags":
            log(f"  val {name}: micro-F1 {_f(m['micro_f1'])}, mAP {_f(m['mean_average_precision'])}")
    log(f"model written to {out} in {seconds:.1f}s")
    return TrainResult(model, out, val_metrics, seconds)


def data_name(data) -> str:
    """What model.json records as the training data: the path, or what an in-memory catalogue was."""
    if isinstance(data, Catalogue):
        return f"<{data.source}: {len(data)} rows>"
    return str(data)


def _flat_paths(paths: dict[str, list[list[str]]]) -> list[list[str]]:
    return [p for v in paths.values() for p in v]


def _f(v) -> str:
    """A metric for a log line ('n/a' when undefined, e.g. no labelled rows)."""
    return "n/a" if v is None else f"{v:.4f}"
