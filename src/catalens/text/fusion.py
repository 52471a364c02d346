"""Image + title fusion: a weighted product of the image head's and the title model's outputs.

For a class task the fused distribution is ``softmax(a * log p_image + b * log p_title)``;
for a tag, ``sigmoid(a * logit p_image + b * logit p_title)``. The two weights per task are
chosen on the validation split by minimising the log-loss over a grid (``b = 0`` and ``a = 0`` are in
the grid, so a useless title model, or image head, is switched off).

**A row without a title** (``None``, NaN, blank) gets the image probabilities exactly: the
title model is not consulted for it, and no weight is applied.

**Conflicts** (:mod:`catalens.text.conflict`): the image-only and title-only answers of a row are
compared per class task; the threshold of a strong disagreement is chosen on validation.

Saved in the model folder as ``text/``: the title model (``vectorizer.json``,
``title_model.safetensors``, ``title_model.json``) and ``fusion.json`` (the weights, and
``conflict``: method and threshold; :data:`~catalens.text.conflict.DEFAULT_CONFLICT` when absent).
"""
from __future__ import annotations

import logging
import json
from pathlib import Path

import numpy as np

from catalens.tasks import MISSING, TaskInfo, sigmoid, softmax
from catalens.text.model import TitleModel
from catalens.text.vectorizer import clean_titles

_logger = logging.getLogger(__name__)

_EPS = 1e-7
IMAGE_GRID = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
TEXT_GRID = (0.0, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0)


def _log(p: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def combine(kind: str, p_image: np.ndarray, p_text: np.ndarray, a: float, b: float) -> np.ndarray:
    """Fused probabilities of one task for rows that all have a title."""
    if kind == "class":
        return softmax(a * _log(p_image) + b * _log(p_text))
    return sigmoid(a * _logit(p_image) + b * _logit(p_text))


def _nll(kind: str, p: np.ndarray, y: np.ndarray) -> float:
    if kind == "class":
        keep = y != MISSING
        return float(-_log(p[keep][np.arange(keep.sum()), y[keep]]).mean()) if keep.any() else float("nan")
    known = ~np.isnan(y)
    if not known.any():
        return float("nan")
    pp, yy = np.clip(p[known], _EPS, 1 - _EPS), y[known]
    return float(-(yy * np.log(pp) + (1 - yy) * np.log1p(-pp)).mean())


def fit_weights(tasks: list[TaskInfo], p_image: dict[str, np.ndarray], p_text: dict[str, np.ndarray],
                Y: dict[str, np.ndarray], has_title: np.ndarray) -> dict[str, dict]:
    """Per task ``{"image": a, "text": b, "val_nll": ...}`` minimising the validation log-loss
    over rows that have a title (``a=1, b=0`` = image only when there is nothing to fit on)."""
    out = {}
    for t in tasks:
        pi, pt, y = p_image[t.name][has_title], p_text[t.name][has_title], Y[t.name][has_title]
        best = (float("inf"), 1.0, 0.0)
        if not len(y):              # no validation row with a title: image only
            out[t.name] = {"image": 1.0, "text": 0.0, "val_nll": None, "val_rows": 0}
            continue
        for a in IMAGE_GRID:
            for b in TEXT_GRID:
                nll = _nll(t.kind, combine(t.kind, pi, pt, a, b), y)
                if np.isfinite(nll) and nll < best[0] - 1e-9:
                    best = (nll, a, b)
        nll, a, b = best
        out[t.name] = {"image": float(a), "text": float(b), "val_nll": None if not np.isfinite(nll) else nll,
                       "val_rows": int(has_title.sum())}
    return out


class TextFusion:
    """The title part of a model: a :class:`TitleModel` and per-task fusion weights."""

    def __init__(self, title_model: TitleModel, weights: dict[str, dict], conflict: dict | None = None) -> None:
        from catalens.text.conflict import DEFAULT_CONFLICT

        self.title_model = title_model
        self.weights = weights
        self.conflict = dict(conflict or DEFAULT_CONFLICT)  # {"method", "threshold", ...}

    @property
    def tasks(self) -> list[TaskInfo]:
        return self.title_model.tasks

    def text_proba(self, texts) -> dict[str, np.ndarray]:
        return self.title_model.predict_proba(texts)

    def title_proba(self, texts) -> dict[str, np.ndarray]:
        """Title-only probabilities ``{task: (n, C)}`` of every row; NaN rows where there is no title."""
        texts = list(texts)
        _, has = clean_titles(texts)
        out = {t.name: np.full((len(texts), t.n_outputs), np.nan, np.float32) for t in self.tasks}
        if has.any():
            idx = np.flatnonzero(has)
            for k, v in self.title_model.predict_proba([texts[i] for i in idx]).items():
                out[k][idx] = v
        return out

    def fuse(self, image_probs: dict[str, np.ndarray], texts, title_probs: dict | None = None) -> dict[str, np.ndarray]:
        """Fused probabilities; rows without a title keep ``image_probs`` unchanged (same values).
        ``title_probs``: :meth:`title_proba` of ``texts`` when already computed."""
        p_text = self.title_proba(texts) if title_probs is None else title_probs
        out = {k: np.array(v, copy=True) for k, v in image_probs.items()}
        for t in self.tasks:
            if t.name not in out or t.name not in p_text:
                continue
            idx = np.flatnonzero(~np.isnan(p_text[t.name]).any(axis=1))
            if not len(idx):
                continue
            w = self.weights.get(t.name, {"image": 1.0, "text": 0.0})
            fused = combine(t.kind, out[t.name][idx], p_text[t.name][idx], w["image"], w["text"])
            out[t.name][idx] = fused.astype(out[t.name].dtype)
        return out

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.title_model.save(folder)
        (folder / "fusion.json").write_text(json.dumps({"kind": "late", "weights": self.weights,
                                                        "conflict": self.conflict}, indent=1))

    @classmethod
    def load(cls, folder: str | Path) -> "TextFusion":
        folder = Path(folder)
        meta = json.loads((folder / "fusion.json").read_text())
        return cls(TitleModel.load(folder), meta["weights"], meta.get("conflict"))


def title_model_from_config(tasks: list[TaskInfo], text_cfg) -> TitleModel:
    """A :class:`TitleModel` from the ``text`` section of the run configuration."""
    return TitleModel(tasks, method=text_cfg.model, C=text_cfg.C, ngram=tuple(text_cfg.ngram),
                      char_ngram=tuple(text_cfg.char_ngram) if text_cfg.char_ngram else None,
                      max_features=text_cfg.max_features, min_df=text_cfg.min_df, alpha=text_cfg.alpha,
                      max_iter=text_cfg.max_iter)


def fit_text_fusion(tasks: list[TaskInfo], texts_train, Y_train: dict[str, np.ndarray], texts_val,
                    Y_val: dict[str, np.ndarray], image_probs_val: dict[str, np.ndarray], text_cfg,
                    log=None, model: TitleModel | None = None) -> TextFusion | None:
    """Fit the title model on the training titles and the fusion weights on validation.

    ``model``: a title model already fitted on these training titles (it depends on them and their
    labels only, not on the image head), used as it is. Returns ``None`` (image only) when the
    training rows have no titles.
    """
    log = log or _logger.info
    _, has_train = clean_titles(texts_train)
    if not has_train.any():
        log("text: no training row has a title; the model stays image-only")
        return None
    model = model or title_model_from_config(tasks, text_cfg).fit(list(texts_train), Y_train)
    _, has_val = clean_titles(texts_val)
    p_text = model.predict_proba(list(texts_val)) if len(has_val) else {}
    weights = fit_weights(tasks, image_probs_val, p_text, Y_val, has_val) if has_val.any() else \
        {t.name: {"image": 1.0, "text": 1.0, "val_nll": None, "val_rows": 0} for t in tasks}
    log(f"text: {model.method} over {model.vectorizer.n_features} n-grams from {int(has_train.sum())} titles; "
        "fusion weights (image, title): " + ", ".join(f"{k} ({v['image']:g}, {v['text']:g})" for k, v in weights.items()))
    conflict = _conflict_on_val(tasks, image_probs_val, p_text, has_val, log)
    return TextFusion(model, weights, conflict)


def _conflict_on_val(tasks: list[TaskInfo], image_probs_val: dict, p_text: dict, has_val: np.ndarray,
                     log) -> dict | None:
    """The conflict threshold flagging at most 1% of the validation photos with a title (None:
    no such photo or no class task, the default applies)."""
    from catalens.text.conflict import describe

    names = [t.name for t in tasks if t.kind == "class"]
    if not names or not has_val.any():
        return None
    conflict = describe({n: image_probs_val[n][has_val] for n in names}, {n: p_text[n][has_val] for n in names},
                        names)
    log(f"text: conflict when image and title disagree with {conflict['method']} > {conflict['threshold']:.4f} "
        f"(flags {conflict['val_flagged']:.2%} of {conflict['source']})")
    return conflict
