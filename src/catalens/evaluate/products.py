"""Metrics per product (several photos of one product): the mean of its photos' probabilities.

:func:`aggregate_probs` averages full probability arrays in memory (exact); :func:`product_metrics`
scores those means against each product's label, as :func:`catalens.evaluate.metrics.compute_metrics`
scores photos.
"""
from __future__ import annotations

import numpy as np

from catalens.tasks import MISSING, TaskInfo


def aggregate_probs(product_ids, probs: dict[str, np.ndarray], ok: np.ndarray | None = None):
    """``(products, {task: mean probabilities (P, C)}, n_images (P,))`` over readable rows.

    Products appear in order of first appearance; a product without a readable image gets
    NaN probabilities and ``n_images`` 0.
    """
    pid = np.asarray([str(p) for p in product_ids], dtype=object)
    products, first, inverse = np.unique(pid, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")            # first-appearance order
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    g = rank[inverse]
    ok = np.ones(len(pid), bool) if ok is None else np.asarray(ok, bool)
    n = np.bincount(g[ok], minlength=len(products)).astype(np.float64)
    out = {}
    for name, p in probs.items():
        p = np.asarray(p, dtype=np.float64)
        sums = np.zeros((len(products), p.shape[1]))
        np.add.at(sums, g[ok], p[ok])
        with np.errstate(invalid="ignore", divide="ignore"):
            out[name] = sums / n[:, None]
    return products[order], out, n.astype(np.int64)


def product_labels(product_ids, y: dict[str, np.ndarray], tasks: list[TaskInfo]) -> dict[str, np.ndarray]:
    """Per product (first-appearance order): the first labelled class of its rows; tags: the
    mean of its rows' labels rounded (NaN when none labelled)."""
    pid = np.asarray([str(p) for p in product_ids], dtype=object)
    products, first, inverse = np.unique(pid, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    g = rank[inverse]
    out = {}
    for t in tasks:
        v = y[t.name]
        if t.kind == "class":
            lab = np.full(len(products), MISSING, np.int64)
            for i in range(len(v) - 1, -1, -1):    # the first labelled row wins
                if v[i] != MISSING:
                    lab[g[i]] = v[i]
            out[t.name] = lab
        else:
            s = np.zeros((len(products), v.shape[1]))
            c = np.zeros_like(s)
            known = ~np.isnan(v)
            np.add.at(s, g, np.where(known, v, 0.0))
            np.add.at(c, g, known.astype(float))
            with np.errstate(invalid="ignore", divide="ignore"):
                out[t.name] = np.where(c > 0, np.round(s / np.maximum(c, 1)), np.nan).astype(np.float32)
    return out


def product_metrics(tasks: list[TaskInfo], product_ids, y: dict[str, np.ndarray], probs: dict[str, np.ndarray],
                    ok: np.ndarray | None = None, known_paths: list[list[str]] | None = None,
                    hierarchy_paths: dict | None = None, accept: dict | None = None) -> dict:
    """:func:`catalens.evaluate.metrics.compute_metrics` at product level (mean of probabilities).

    ``hierarchy_paths``: also decode product predictions to known paths (as the model does).
    ``accept`` (model.json's): per class task also ``selective``, products auto-accepted as the
    products file decides (mean probability of the product's label against the threshold).
    Adds ``products`` (count) and ``images`` (readable images) to the result.
    """
    from catalens.evaluate.metrics import compute_metrics

    products, mean, n = aggregate_probs(product_ids, probs, ok)
    labels = product_labels(product_ids, y, tasks)
    keep = n > 0
    mean = {k: v[keep] for k, v in mean.items()}
    labels = {k: v[keep] for k, v in labels.items()}
    pred_index = None
    if hierarchy_paths:  # decided as the model decides (catalens.model.decode)
        from catalens.model.decode import Decoder

        pred_index = Decoder(tasks, hierarchy_paths, True).decoded_index(mean)
    m = compute_metrics(tasks, labels, mean, known_paths=known_paths, pred_index=pred_index)
    from catalens.evaluate.selective import add_selective

    add_selective(m, tasks, accept, labels, mean, pred_index)
    m["products"] = int(keep.sum())
    m["images"] = int(n.sum())
    return m
