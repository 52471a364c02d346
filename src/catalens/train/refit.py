"""``data.refit_full``: once the val split has decided everything, fit the weights again on train + val.

``catalens train`` holds the val split out to decide: the head's early-stopping epoch and
temperatures, the title fusion weights, the tag thresholds, the auto-accept and unknown
thresholds, and the val metrics in ``model.json``. With ``data.refit_full`` those decisions are
kept and the head (and the title model) is then fitted again on the train and val photos together,
as AutoGluon's ``refit_full`` does: about 15 % more photos to learn from (bench_presets measures
what it gives). The AdamW heads train for the first fit's best epoch count, ``logreg`` to
convergence. ``model.json`` says so under ``refit_full``; its val metrics remain those of the first
fit, the only honest ones (the refitted model has seen the val photos).

The backbone must be frozen: a fine-tuned backbone learnt from the train photos alone, and its
features of the val photos are not those it would have given after seeing them.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from catalens.config import Config
from catalens.tasks import TaskInfo, labelled_rows

_logger = logging.getLogger(__name__)

NOTE = ("the decisions (head epochs and temperatures, fusion weights, tag, accept and unknown thresholds) and "
        "metrics.val come from the model fitted on the train photos; its weights were then fitted again on "
        "train + val")


def check_refit(cfg: Config) -> None:
    """Refuse ``data.refit_full`` with fine-tuning (what arrived, why, the way out)."""
    if cfg.data.refit_full and cfg.finetune.mode != "none":
        raise ValueError(f"data.refit_full refits the head on frozen features; --finetune {cfg.finetune.mode} "
                         "trains the backbone on the train photos alone, so the val photos' features would "
                         "not match: drop data.refit_full, or --finetune")


def refit_rows(head, text, tasks: list[TaskInfo], features: np.ndarray, Y: dict[str, np.ndarray],
               titles: np.ndarray | None, usable: np.ndarray, labelled: np.ndarray, text_cfg,
               log=None) -> dict:
    """Fit ``head`` again on the ``usable`` rows of ``features`` / ``Y`` (decoded and labelled) and
    ``text``'s title model on the ``labelled`` rows' titles; returns ``model.json``'s ``refit_full``."""
    log = log or _logger.info
    sel = {k: v[usable] for k, v in Y.items()}
    head.refit(features[usable], sel)
    out = {"rows": int(usable.sum()), "head_epochs": head.refit_["epochs"], "note": NOTE}
    if text is not None and titles is not None:
        from catalens.text.fusion import title_model_from_config

        model = title_model_from_config(tasks, text_cfg).fit(list(titles[labelled]),
                                                             {k: v[labelled] for k, v in Y.items()})
        model.tasks = text.title_model.tasks  # the tag thresholds tuned on val
        text.title_model = model
        out["title_rows"] = int(labelled.sum())
    log(f"refit_full: head fitted again on {out['rows']} train + val photos"
        + (f", title model on {out['title_rows']} titles" if "title_rows" in out else ""))
    return out


def refit_folder(folder: str | Path, data, cfg: Config, log=None) -> Path:
    """Refit the model folder ``folder`` (written by ``catalens train`` from ``data`` with ``cfg``,
    without ``data.refit_full``) on its train + val photos; rewritten atomically."""
    from catalens.embed.features import catalogue_features
    from catalens.ingest.open import open_catalogue
    from catalens.model.single import CatalensModel
    from catalens.model.tta import without_tta
    from catalens.train.classes import merged_selections, select_classes
    from catalens.train.splits import ensure_splits

    log = log or _logger.info
    model = CatalensModel.load(folder)
    if model.meta.get("finetune"):
        raise ValueError(f"{folder}: a fine-tuned model cannot be refitted on train + val (its backbone learnt "
                         "from the train photos alone); keep it as it is")
    cat = data if hasattr(data, "frame") else open_catalogue(data)
    cat, _ = ensure_splits(cat, cfg.data.val_fraction, cfg.data.test_fraction, cfg.seed)
    fit_cat = cat.subset(cat.frame["split"].isin(["train", "val"]).to_numpy())
    fit_cat, _ = select_classes(fit_cat, merged_selections(cat, cfg.data.classes))
    feats = catalogue_features(fit_cat, without_tta(model.backbone), cfg)  # the features its head was fitted on
    Y = fit_cat.encode(model.tasks)
    labelled = labelled_rows(model.tasks, Y)
    titles = fit_cat.frame["text"].to_numpy(dtype=object) if "text" in fit_cat.frame else None
    model.meta["refit_full"] = refit_rows(model.head, model.text, model.tasks, feats.features, Y, titles,
                                          labelled & feats.ok, labelled, cfg.text, log)
    model.save(folder)
    config = Path(folder) / "config.yaml"
    if config.exists():  # `catalens train --config` of it trains this model again
        from catalens.files import atomic_write_text

        again = cfg.model_copy(deep=True)
        again.data.refit_full = True
        atomic_write_text(config, again.to_yaml())
    return Path(folder)
