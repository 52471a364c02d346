"""Decisions stored in the model at training: auto-accept thresholds and the unknown flag.

- ``accept``: per class task, the threshold of :func:`catalens.evaluate.selective.choose_threshold`
  (a Clopper-Pearson bound and a shift margin)
  on held-out photos: the val split, plus **out-of-fold** training photos when val has fewer than
  ``selective.oof_below`` labelled photos (k heads fit on the cached features of k-1 folds of
  the training rows, each predicting the fold it did not see; split by product: this module
  imports nothing from :mod:`catalens.train.kfold`, which imports the training pipeline). Out-of-fold
  photos are used only for a plain image head on frozen features: a fine-tuned backbone or a
  title model makes the fold heads differ from the model that answers, so those use val alone.
  A caller that has cross-validated the same recipe already (``--preset``) hands its out-of-fold
  probabilities in as :class:`HeldOut` instead, and no fold head is fitted again.
- ``unknown``: method and threshold of :mod:`catalens.model.unknown` on the val photos.

Both are decoded as every answer is (hierarchy decoding included), so the threshold applies to
the label that predict returns.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from catalens.config import Config
from catalens.tasks import MISSING, TaskInfo, in_class_order

_logger = logging.getLogger(__name__)


def product_folds(product_ids: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold (0..k-1) of every row: products shuffled with ``seed`` and dealt round-robin, so all
    photos of a product share a fold."""
    products, inverse = np.unique(product_ids, return_inverse=True)
    order = np.random.default_rng(seed).permutation(len(products))
    fold_of = np.empty(len(products), np.int64)
    fold_of[order] = np.arange(len(products)) % k
    return fold_of[inverse]


@dataclass
class HeldOut:
    """Held-out probabilities of photos computed elsewhere, e.g. the out-of-fold predictions of the
    preset's K-fold cross-validation of the same recipe: photo ``ids`` ``(n,)`` (the catalogue's
    ``id`` column), ``probs`` ``{task: (n, C)}`` in the class order ``classes`` ``{task: [...]}``
    (a row of NaN: never held out), and ``source``, how they were made (for model.json)."""

    ids: np.ndarray
    probs: dict[str, np.ndarray]
    classes: dict[str, list[str]]
    source: str

    def for_rows(self, ids: np.ndarray, tasks: list[TaskInfo]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """``(probs, found)``: the probabilities of the photos ``ids`` that have a held-out row, as
        ``{task: (found.sum(), C)}`` in ``tasks``' class order (a class they do not know gets 0; a class
        task's row is renormalised over the classes ``tasks`` know), and the mask ``found`` ``(len(ids),)``."""
        where = {str(i): j for j, i in enumerate(self.ids)}
        idx = np.array([where.get(str(i), -1) for i in ids], np.int64)
        found = idx >= 0
        for t in tasks:
            found[found] &= ~np.isnan(self.probs[t.name][idx[found]]).any(1)
        out = {}
        for t in tasks:
            p = in_class_order(self.probs[t.name][idx[found]], self.classes[t.name], list(t.classes))
            if t.kind == "class":
                p /= np.clip(p.sum(1, keepdims=True), 1e-12, None)
            out[t.name] = p
        return out, found


def out_of_fold(cat, tasks: list[TaskInfo], Y: dict, features: np.ndarray, is_train: np.ndarray,
                is_val: np.ndarray, cfg: Config) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Out-of-fold probabilities of the training rows: ``(probs, rows)`` with ``rows`` the
    indices (into ``cat``) they belong to."""
    from catalens.heads import head_from_config

    h, k = cfg.head, cfg.selective.folds
    fold = product_folds(cat.frame["product_id"].astype(str).to_numpy(), k, cfg.seed)
    rows = np.flatnonzero(is_train)
    out = {t.name: np.zeros((len(rows), t.n_outputs), np.float32) for t in tasks}
    sel = lambda m: {n: v[m] for n, v in Y.items()}  # noqa: E731
    for f in range(k):
        fit, held = is_train & (fold != f), is_train & (fold == f)
        if not held.any() or not fit.any():
            continue
        head = head_from_config(h, tasks, cfg.seed)
        head.fit(features[fit], sel(fit), features[is_val] if is_val.any() else None,
                 sel(is_val) if is_val.any() else None)
        p = head.predict_proba(features[held])
        where = np.searchsorted(rows, np.flatnonzero(held))
        for n in out:
            out[n][where] = p[n]
    return out, rows


def accept_description(tasks: list[TaskInfo], decoder, y: dict, probs: dict, cfg: Config, source: str,
                       log=None) -> dict | None:
    """model.json's ``accept`` entry from labelled held-out rows ``y`` / ``probs``."""
    from catalens.evaluate.selective import choose_threshold

    log = log or _logger.info
    sel = cfg.selective
    if not probs or not len(next(iter(probs.values()))):
        return None
    ans = decoder.decode(probs, top_k=1)
    thresholds, chosen = {}, {}
    for t in tasks:
        if t.kind != "class":
            continue
        keep = np.asarray(y[t.name]) != MISSING
        conf = ans.label_prob(t.name)[keep]
        right = ans.label[t.name][keep] == np.asarray(y[t.name])[keep]
        c = choose_threshold(conf, right, sel.target_precision, sel.bound_confidence, sel.shift_margin)
        thresholds[t.name], chosen[t.name] = c.threshold, c.to_dict()
        log(f"  accept {t.name}: " + (f"prob >= {c.threshold:.4f} accepts {c.coverage:.1%} of {c.n} held-out photos "
                                      f"at precision {c.precision:.4f} (95% lower bound {c.lower_bound:.4f})"
                                      if c.threshold is not None else
                                      f"no threshold reaches precision {sel.target_precision} with 95% confidence "
                                      f"on {c.n} held-out photos: nothing is auto-accepted"))
    if not thresholds:
        return None
    return {"target_precision": sel.target_precision, "bound_confidence": sel.bound_confidence,
            "shift_margin": sel.shift_margin, "source": source, "thresholds": thresholds, "chosen_on": chosen}


def unknown_description(tasks: list[TaskInfo], probs_val: dict, cfg: Config) -> dict | None:
    """model.json's ``unknown`` entry (None without validation photos or class tasks)."""
    from catalens.model.unknown import describe

    names = [t.name for t in tasks if t.kind == "class"]
    if not names or not probs_val or not len(probs_val[names[0]]):
        return None
    return describe(probs_val, names, cfg.selective.unknown_method, cfg.selective.unknown_keep)


def _plus_out_of_fold(probs: dict, y: dict, oof: dict, y_oof: dict, how: str) -> tuple[dict, dict, str]:
    """Held-out probabilities and labels with the out-of-fold training rows appended, and the words for
    ``accept.source``: `` + out-of-fold train (N photos, how)``."""
    n = len(next(iter(y_oof.values()))) if y_oof else 0
    return ({k: np.concatenate([probs[k], oof[k]]) for k in probs}, {k: np.concatenate([y[k], y_oof[k]]) for k in y},
            f" + out-of-fold train ({n} photos, {how})")


def decision_flags(cat, tasks: list[TaskInfo], paths: dict, Y: dict, features, is_train: np.ndarray,
                   is_val: np.ndarray, probs_val: dict, cfg: Config, oof_allowed: bool, log=None,
                   heldout: HeldOut | None = None) -> dict:
    """``{"accept": ..., "unknown": ...}`` for model.json (see the module docstring). ``heldout``:
    out-of-fold probabilities of the training photos made already, used instead of fitting
    ``selective.folds`` heads again."""
    from catalens.model.decode import Decoder

    log = log or _logger.info
    decoder = Decoder(tasks, paths, bool(cfg.hierarchy_decoding))
    y = {n: v[is_val] for n, v in Y.items()}
    probs, source = probs_val, "val"
    n_val = int(is_val.sum())
    if oof_allowed and features is not None and n_val < cfg.selective.oof_below and is_train.sum() >= cfg.selective.folds:
        if heldout is not None:
            rows = np.flatnonzero(is_train)
            oof, found = heldout.for_rows(cat.frame["id"].to_numpy()[rows], tasks)
            rows, how = rows[found], heldout.source
        else:
            oof, rows = out_of_fold(cat, tasks, Y, features, is_train, is_val, cfg)
            how = f"{cfg.selective.folds} folds"
        probs, y, more = _plus_out_of_fold(probs_val, y, oof, {n: v[rows] for n, v in Y.items()}, how)
        source = f"val ({n_val} photos){more}"
    log(f"auto-accept thresholds for precision {cfg.selective.target_precision} on {source}")
    return {"accept": accept_description(tasks, decoder, y, probs, cfg, source, log),
            "unknown": unknown_description(tasks, probs_val, cfg)}


def ensemble_flags(model, data, cfg: Config, split_csv=None, log=None, heldout: HeldOut | None = None) -> dict:
    """``{"accept": ..., "unknown": ...}`` of an ensemble (``catalens ensemble``): chosen like a
    single model's (:func:`accept_description`, :func:`unknown_description`) with the ensemble's
    own probabilities of the val photos of ``data`` (its ``split`` column, or ``split_csv``: a
    member's ``ingest/split.csv`` when catalens made the split). Both None, with a warning, when
    ``data`` has no val photo. The members were fit on the training rows, so those are held out only
    as ``heldout`` gives them (``--preset``: the blend's out-of-fold probabilities), for the accept
    thresholds when val has fewer than ``selective.oof_below`` photos, as a single model's."""
    import pandas as pd

    from catalens.ingest.open import open_catalogue
    from catalens.model.predictor import stream_probabilities

    log = log or _logger.info
    cat = data if hasattr(data, "frame") else open_catalogue(data)  # a path, or an in-memory Catalogue
    split = cat.frame["split"].astype(str) if "split" in cat.frame else pd.Series([""] * len(cat))
    if split_csv is not None and not (split == "val").any():
        saved = pd.read_csv(split_csv, dtype=str)
        split = cat.frame["id"].astype(str).map(dict(zip(saved["id"], saved["split"]))).fillna("").astype(str)
    is_val = (split == "val").to_numpy()
    if not is_val.any():
        _logger.warning(f"ensemble: '{data}' has no val photo: accept and unknown thresholds are left null "
                        f"(give the data the members were trained on with --data)")
        return {"accept": None, "unknown": None}
    val = cat.subset(is_val)
    parts = list(stream_probabilities(model, val))
    ok = np.concatenate([b.ok for b in parts])
    probs = {t.name: np.concatenate([b.probs[t.name] for b in parts])[ok] for t in model.tasks}
    y = {n: v[ok] for n, v in val.encode(model.tasks).items()}
    source = f"val ({int(ok.sum())} photos of {data}), the ensemble's probabilities"
    probs_val, y_accept = probs, y
    if heldout is not None and int(ok.sum()) < cfg.selective.oof_below:
        train = cat.subset((split == "train").to_numpy())
        oof, found = heldout.for_rows(train.frame["id"].to_numpy(), model.tasks)
        y_train = {n: v[found] for n, v in train.encode(model.tasks).items()}
        probs, y_accept, more = _plus_out_of_fold(probs, y, oof, y_train, heldout.source)
        source += more
    log(f"ensemble: auto-accept thresholds for precision {cfg.selective.target_precision} on {source}")
    return {"accept": accept_description(model.tasks, model.decoder, y_accept, probs, cfg, source, log),
            "unknown": unknown_description(model.tasks, probs_val, cfg)}
