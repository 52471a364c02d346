"""``catalens train DATA --out MODEL --folds K``: K-fold cross-validation on cached embeddings.

The pool is the train + val rows (the test split is never touched). Products, not images,
are dealt into K folds, stratified on the leaf class task (each class's products are
shuffled with the seed and dealt round-robin from a random start, so even a class with a
handful of products is spread across folds). For fold k the model is fitted on the other
folds, minus an inner validation part (``kfold.inner_val_fraction`` of their products, also
stratified) used for early stopping, temperature scaling, title fusion weights and tag
thresholds, exactly as ``train`` uses the val split; then fold k is predicted.

Written to ``MODEL/kfold/``: ``metrics.json`` (per fold, mean ± std over folds of every
scalar metric, and the metrics of all out-of-fold predictions pooled) and
``oof_predictions.parquet`` (every pool row exactly once, with its ``fold``, in the column
layout of ``catalens predict``).
"""
from __future__ import annotations

import logging
import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from catalens.config import Config
from catalens.ingest.catalogue import Catalogue
from catalens.tasks import TaskInfo, labelled_rows
from catalens.train.splits import _stratify_column

_logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Train + val rows of a catalogue with cached features and encoded labels."""

    cat: Catalogue
    tasks: list[TaskInfo]
    Y: dict[str, np.ndarray]
    features: np.ndarray
    usable: np.ndarray        # decoded and labelled in some task
    titles: np.ndarray        # object array: title or None

    def select(self, mask: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[mask] for k, v in self.Y.items()}

    @property
    def split(self) -> np.ndarray:
        return self.cat.frame["split"].to_numpy()


def pool_tasks(cat: Catalogue) -> list[TaskInfo]:
    """Tasks with the class order of every label in ``cat`` (the whole pool)."""
    out = []
    for t in cat.tasks:
        if t.kind == "class":
            out.append(TaskInfo(t.name, "class", sorted({str(v) for v in cat.frame[t.name].dropna()}), t.parent))
        else:
            out.append(TaskInfo(t.name, "tags", list(t.classes)))
    return out


def prepare(data: str | Path, cfg: Config, log=None, classes_from: str = "train") -> Prepared:
    """Open ``data``, make splits when missing, embed train + val through the cache.

    ``classes_from='train'``: class order as ``catalens train`` (labels seen in the train
    split); ``'pool'``: every label in train + val (cross-validation).
    """
    log = log or _logger.info
    from catalens.embed.factory import backbone_from_config
    from catalens.ingest.open import open_catalogue
    from catalens.embed.features import catalogue_features
    from catalens.train.pipeline import training_tasks
    from catalens.train.splits import ensure_splits

    cat = data if hasattr(data, "frame") else open_catalogue(data)  # a path, or an in-memory Catalogue
    cat, note = ensure_splits(cat, cfg.data.val_fraction, cfg.data.test_fraction, cfg.seed)
    if note:
        log(note)
    pool = cat.subset(cat.frame["split"].isin(["train", "val"]).to_numpy())
    from catalens.train.classes import merged_selections, select_classes

    pool, selection = select_classes(pool, merged_selections(cat, cfg.data.classes))  # as catalens train does
    if selection.tasks:
        log(f"class selection: {selection.removed_rows} photos left without labels are not used")
    backbone = backbone_from_config(cfg.backbone)
    feats = catalogue_features(pool, backbone, cfg)
    tasks = pool_tasks(pool) if classes_from == "pool" else training_tasks(pool)
    Y = pool.encode(tasks)
    titles = pool.frame["text"].to_numpy(dtype=object) if "text" in pool.frame else np.full(len(pool), None, object)
    return Prepared(pool, tasks, Y, feats.features, labelled_rows(tasks, Y, feats.ok), titles)


# ---------------------------------------------------------------- folds by product
def _product_labels(cat: Catalogue, rows: np.ndarray | None = None) -> pd.Series:
    frame = cat.frame if rows is None else cat.frame[rows]
    col = _stratify_column(cat)
    if col is None:
        return pd.Series("all", index=pd.Index(frame["product_id"].astype(str).unique()))
    return frame.groupby(frame["product_id"].astype(str))[col].first().fillna("<missing>").astype(str)


def product_folds(cat: Catalogue, k: int, seed: int) -> np.ndarray:
    """Fold number (0..k-1) of every row; all rows of a product share one fold."""
    if k < 2:
        raise ValueError(f"--folds needs at least 2 folds; got {k}")
    labels = _product_labels(cat)
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    for _, products in sorted(labels.groupby(labels).groups.items(), key=lambda kv: kv[0]):
        prods = np.array(sorted(products))
        rng.shuffle(prods)
        start = int(rng.integers(k))
        for i, p in enumerate(prods):
            fold_of[p] = (start + i) % k
    return cat.frame["product_id"].astype(str).map(fold_of).to_numpy(dtype=np.int64)


def carve_products(cat: Catalogue, rows: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask (over all rows) of about ``fraction`` of the products among ``rows``,
    stratified on the leaf class (classes with fewer than 3 products give none)."""
    labels = _product_labels(cat, rows)
    rng = np.random.default_rng(seed)
    chosen: set[str] = set()
    for _, products in sorted(labels.groupby(labels).groups.items(), key=lambda kv: kv[0]):
        prods = np.array(sorted(products))
        rng.shuffle(prods)
        n = int(round(fraction * len(prods))) if len(prods) >= 3 else 0
        chosen.update(prods[:n].tolist())
    return rows & cat.frame["product_id"].astype(str).isin(chosen).to_numpy()


# ---------------------------------------------------------------- one fit
@dataclass
class Fitted:
    head: object
    text: object
    tasks: list[TaskInfo]          # with tag thresholds tuned on the validation rows
    paths: dict[str, list[list[str]]]


def known_paths_of(cat: Catalogue, tasks: list[TaskInfo], rows: np.ndarray) -> dict[str, list[list[str]]]:
    from catalens.tasks import hierarchy_levels

    frame = cat.frame[rows]
    out = {}
    for chain in hierarchy_levels(tasks):
        out[" > ".join(chain)] = sorted(frame[chain].dropna().drop_duplicates().astype(str).values.tolist())
    return out


class TitleModels:
    """Title models fitted per fold, shared by several cross-validations over the same folds (the
    recipes of one preset run): a title model depends on its training rows' titles and labels and
    on the ``text`` settings, never on the image features or head, so each fold's is fitted once.
    ``seconds`` / ``fits``: the time the fits took (what the first CV spends on titles)."""

    def __init__(self) -> None:
        self.models: dict[str, object] = {}
        self.seconds, self.fits = 0.0, 0

    @staticmethod
    def key(prep: Prepared, rows: np.ndarray, cfg: Config) -> str:
        """What a title model is fitted from: the rows' ids, titles and labels, the tasks and ``cfg.text``."""
        import hashlib

        h = hashlib.sha256()
        h.update("\x1f".join(prep.cat.frame["id"].astype(str).to_numpy()[rows]).encode())
        h.update("\x1f".join("" if t is None else str(t) for t in prep.titles[rows]).encode())
        for t in prep.tasks:
            h.update(f"{t.name}:{t.kind}:{'|'.join(map(str, t.classes))}".encode())
            h.update(np.ascontiguousarray(prep.Y[t.name][rows]).tobytes())
        h.update(cfg.text.model_dump_json().encode())
        return h.hexdigest()

    def get(self, key: str):
        """A copy of the fold's title model (its ``tasks`` are set per use), or None."""
        model = self.models.get(key)
        return copy.copy(model) if model is not None else None

    def put(self, key: str, model, seconds: float) -> None:
        self.models[key] = copy.copy(model)
        self.seconds, self.fits = self.seconds + seconds, self.fits + 1


def fit_on(prep: Prepared, train: np.ndarray, val: np.ndarray, cfg: Config, log=lambda *_: None,
           titles: TitleModels | None = None) -> Fitted:
    """Head (+ title fusion when ``cfg.text.enabled``) on ``train`` rows, tuned on ``val`` rows,
    as :func:`catalens.train.pipeline.train` does. ``titles``: title models to reuse (and add to)."""
    from catalens.evaluate.thresholds import tune_thresholds
    from catalens.heads import head_from_config

    tasks = copy.deepcopy(prep.tasks)
    h = cfg.head
    tr, va = train & prep.usable, val & prep.usable
    head = head_from_config(h, tasks, cfg.seed)
    head.fit(prep.features[tr], prep.select(tr), prep.features[va], prep.select(va))
    probs_val = head.predict_proba(prep.features[va])
    text = None
    if cfg.text.enabled:
        from catalens.text.fusion import fit_text_fusion


        rows = train & labelled_rows(prep.tasks, prep.Y)
        key = titles.key(prep, rows, cfg) if titles is not None else None
        model = titles.get(key) if titles is not None else None
        t = time.time()
        text = fit_text_fusion(tasks, prep.titles[rows], prep.select(rows), prep.titles[va], prep.select(va),
                               probs_val, cfg.text, log=log, model=model)
        if titles is not None and model is None and text is not None:
            titles.put(key, text.title_model, time.time() - t)
        if text is not None:
            probs_val = text.fuse(probs_val, prep.titles[va])
    Yv = prep.select(va)
    for t in tasks:
        if t.kind == "tags":
            t.thresholds = [float(x) for x in tune_thresholds(Yv[t.name], probs_val[t.name])] \
                if va.any() else [0.5] * t.n_outputs
    if text is not None:
        text.title_model.tasks = tasks
    head.tasks = tasks
    return Fitted(head, text, tasks, known_paths_of(prep.cat, tasks, train))


def predict_rows(prep: Prepared, fitted: Fitted, rows: np.ndarray) -> dict[str, np.ndarray]:
    probs = fitted.head.predict_proba(prep.features[rows])
    if fitted.text is not None:
        probs = fitted.text.fuse(probs, prep.titles[rows])
    return probs


def out_of_fold(prep: Prepared, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], cfg: Config,
                predict_from: Prepared | None = None,
                titles: TitleModels | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Out-of-fold probabilities over ``parts`` (:func:`fold_parts`): each part's head is fitted on its
    training rows (early stopping on its inner rows) and predicts its held-out rows, from
    ``predict_from``'s features when given (e.g. TTA features), else from ``prep``'s (``titles``: the
    folds' title models to reuse, :class:`TitleModels`). Returns
    ``({task: (n, C), NaN where never held out}, scored)`` with ``scored`` the ``(n,)`` rows predicted."""
    pred = predict_from if predict_from is not None else prep
    n = len(prep.cat)
    oof = {t.name: np.full((n, t.n_outputs), np.nan, np.float32) for t in prep.tasks}
    scored = np.zeros(n, bool)
    for train, inner, rows in parts:
        for name, p in predict_rows(pred, fit_on(prep, train, inner, cfg, titles=titles), rows).items():
            oof[name][rows] = p
        scored |= rows
    return oof, scored


def evaluate_rows(prep: Prepared, fitted: Fitted, rows: np.ndarray, probs: dict[str, np.ndarray],
                  decode: bool) -> tuple[dict, dict | None]:
    """compute_metrics on ``rows`` (usable ones) with optional hierarchy decoding."""
    from catalens.evaluate.metrics import compute_metrics
    from catalens.model.decode import Decoder

    flat = [p for v in fitted.paths.values() for p in v]
    decoded = Decoder(fitted.tasks, fitted.paths, True).decoded_index(probs) if decode else None
    m = compute_metrics(fitted.tasks, prep.select(rows), probs, known_paths=flat or None, pred_index=decoded)
    return m, decoded


def decoded_out_of_fold(prep: Prepared, probs: dict[str, np.ndarray],
                        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Hierarchy decoding of out-of-fold probabilities ``{task: (n, C)}``: each part's held-out rows
    decoded with the label paths of that part's training rows (what its model would have seen, as
    :func:`fit_on` records them). Returns ``{class task in a chain: (n,) decided class}`` (-1 on rows
    no part holds out); empty when the tasks form no chain."""
    from catalens.model.decode import Decoder

    n = len(prep.cat)
    out: dict[str, np.ndarray] = {}
    for train, _, rows in parts:
        if not rows.any():
            continue
        decoder = Decoder(prep.tasks, known_paths_of(prep.cat, prep.tasks, train), True)
        for name, idx in decoder.decoded_index({k: v[rows] for k, v in probs.items()}).items():
            out.setdefault(name, np.full(n, -1, np.int64))[rows] = idx
    return out


# ---------------------------------------------------------------- summary helpers
def scalar_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Flatten the headline numbers: ``task.accuracy``, ``task.micro_f1``, ``hierarchy.<chain>.consistent_share``."""
    out = {}
    keys = {"class": ("accuracy", "macro_f1", "weighted_f1", "top5_accuracy", "log_loss", "ece"),
            "tags": ("micro_f1", "macro_f1", "mean_average_precision")}
    for name, m in metrics.items():
        if isinstance(m, dict) and m.get("kind") in keys:
            for k in keys[m["kind"]]:
                if m.get(k) is not None:
                    out[f"{prefix}{name}.{k}"] = float(m[k])
    for chain, h in (metrics.get("hierarchy") or {}).items():
        for k in ("consistent_share", "path_accuracy"):
            if h.get(k) is not None:
                out[f"{prefix}hierarchy.{chain}.{k}"] = float(h[k])
    return out


def mean_std(per_fold: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """``{metric: {"mean", "std", "n"}}`` (sample std, 0 with one value)."""
    names = sorted({k for f in per_fold for k in f})
    out = {}
    for k in names:
        v = np.array([f[k] for f in per_fold if k in f], dtype=np.float64)
        out[k] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}
    return out


def _oof_table(prep: Prepared, fitted: Fitted, rows: np.ndarray, oof: dict, decoded: dict, fold: int,
               top_k: int, schema):
    """Prediction columns of ``rows`` (positions) at this fold's tag thresholds."""
    import pyarrow as pa

    from catalens.model.decode import Decoder

    frame = prep.cat.frame.iloc[rows]
    ok = prep.usable[rows]
    probs = {k: np.nan_to_num(v[rows], nan=0.0) for k, v in oof.items()}
    cols = {"id": frame["id"].astype(str).tolist(), "product_id": frame["product_id"].astype(str).tolist(),
            "path": frame["path"].astype(str).tolist(),
            "split": [s if isinstance(s, str) else None for s in frame["split"]],
            "problem": [None if u else "not predicted: image failed or no label" for u in ok]}
    decoder = Decoder(fitted.tasks, fitted.paths, bool(decoded))
    cols.update(decoder.columns(decoder.decode(probs, top_k), ok))
    cols["fold"] = [fold] * len(rows)
    return pa.table(cols, schema=schema)


def fold_parts(prep: Prepared, fold: np.ndarray, k: int, cfg: Config) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per fold ``(train, inner, scored)`` row masks: fit on ``train``, stop early on ``inner`` (a
    product-level share of the other folds), predict the fold's usable rows ``scored``."""
    parts = []
    for f in range(k):
        rest = fold != f
        inner = carve_products(prep.cat, rest, cfg.kfold.inner_val_fraction, cfg.seed + 1000 + f)
        parts.append((rest & ~inner, inner, (fold == f) & prep.usable))
    return parts


@dataclass
class KFoldResult:
    summary: dict
    per_fold: list[dict]
    pooled: dict
    oof_path: Path
    seconds: float


def cross_validate(data: str | Path, out: str | Path, cfg: Config, folds: int | None = None,
                   log=None, prep: Prepared | None = None) -> KFoldResult:
    """K-fold cross-validation; writes ``out/kfold/metrics.json`` and ``oof_predictions.parquet``."""
    log = log or _logger.info
    import pyarrow as pa
    import pyarrow.parquet as pq

    from catalens.evaluate.metrics import compute_metrics
    from catalens.model.decode import arrow_schema

    t0 = time.time()
    k = int(folds or cfg.kfold.folds)
    prep = prep or prepare(data, cfg, log=log, classes_from="pool")
    fold = product_folds(prep.cat, k, cfg.seed)
    parts = fold_parts(prep, fold, k, cfg)
    n = len(prep.cat)
    log(f"k-fold: {k} folds over {n} train+val images, {prep.cat.frame['product_id'].nunique()} products "
        f"(split by product, stratified on {_stratify_column(prep.cat)})")
    oof = {t.name: np.full((n, t.n_outputs), np.nan, np.float32) for t in prep.tasks}
    oof_decoded: dict[str, np.ndarray] = {}
    per_fold, pieces = [], []
    schema = arrow_schema(prep.tasks, {"fold": pa.int64()})
    for f, (train, inner, rows) in enumerate(parts):
        test = fold == f
        fitted = fit_on(prep, train, inner, cfg)
        probs = predict_rows(prep, fitted, rows)
        m, decoded = evaluate_rows(prep, fitted, rows, probs, cfg.hierarchy_decoding)
        for name, p in probs.items():
            oof[name][rows] = p
        for name, idx in (decoded or {}).items():
            oof_decoded.setdefault(name, np.full(n, -1, np.int64))[rows] = idx
        pieces.append(_oof_table(prep, fitted, np.flatnonzero(test), oof, oof_decoded, f, cfg.top_k, schema))
        flat = scalar_metrics(m)
        per_fold.append({"fold": f, "train_images": int((train & prep.usable).sum()),
                         "inner_val_images": int((inner & prep.usable).sum()), "test_images": int(rows.sum()),
                         "metrics": flat})
        log(f"  fold {f + 1}/{k}: " + ", ".join(f"{t.name} {flat.get(f'{t.name}.accuracy', float('nan')):.4f}"
                                               for t in prep.tasks if t.kind == "class"))
    summary = mean_std([pf["metrics"] for pf in per_fold])
    ok = prep.usable & ~np.isnan(oof[prep.tasks[0].name]).any(1)
    all_paths = known_paths_of(prep.cat, prep.tasks, np.ones(n, bool))
    pooled = compute_metrics(prep.tasks, prep.select(ok), {k_: v[ok] for k_, v in oof.items()},
                             known_paths=[p for v in all_paths.values() for p in v] or None,
                             pred_index={k_: v[ok] for k_, v in oof_decoded.items()} or None)
    folder = Path(out) / "kfold"
    folder.mkdir(parents=True, exist_ok=True)
    seconds = time.time() - t0
    report = {"folds": k, "seed": cfg.seed, "images": n, "hierarchy_decoding": cfg.hierarchy_decoding,
              "text": cfg.text.enabled, "summary": summary, "per_fold": per_fold,
              "pooled_oof": scalar_metrics(pooled), "seconds": round(seconds, 1)}
    (folder / "metrics.json").write_text(json.dumps(report, indent=1))
    # out-of-fold predictions: every pool row once, in the catalogue's order
    table = pa.concat_tables(pieces)
    order = np.argsort(np.concatenate([np.flatnonzero(fold == f) for f in range(k)]), kind="stable")
    oof_path = folder / "oof_predictions.parquet"
    pq.write_table(table.take(pa.array(order)), oof_path, compression="zstd")
    log(f"k-fold ({k} folds, {seconds:.0f}s): mean ± std over folds")
    for key, v in summary.items():
        if key.endswith(".accuracy") or key.endswith(".micro_f1") or key.endswith(".macro_f1") \
                or key.endswith("consistent_share"):
            log(f"  {key}: {v['mean']:.4f} ± {v['std']:.4f}")
    log(f"written: {folder / 'metrics.json'}, {oof_path}")
    return KFoldResult(summary, per_fold, pooled, oof_path, seconds)

