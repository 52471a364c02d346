"""Several photos per product: one prediction per product id, the mean of its images' probabilities.

Two entry points:

- :func:`aggregate_predictions` reads the predictions parquet of ``catalens predict`` (one row
  per image) and returns / writes one row per ``product_id``. Class tasks: the mean over the
  product's images of each label's probability, where an image contributes the probabilities
  of its stored top-k labels (a label outside an image's top-k counts 0 for that image: exact
  when ``top_k`` covers every class, otherwise a lower bound of the mean that can only lose
  labels that were never in any image's top-k). Tags: the mean of ``TASK_TAG_prob``, decided
  at the model's thresholds. Images whose ``problem`` is set are left out; a product without
  any readable image gets nulls.
Evaluation at product level works on full probability arrays in memory (exact):
:mod:`catalens.evaluate.products`.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from catalens.tasks import TaskInfo


def infer_tasks(columns: list[str]) -> list[TaskInfo]:
    """Tasks from prediction column names (class tasks: ``T_top_labels``; tags: ``T_tags`` and
    ``T_<tag>_prob``). Thresholds are unknown (0.5): pass the model's tasks when you have them."""
    cols = set(columns)
    tasks = []
    for c in columns:
        if c.endswith("_top_labels"):
            tasks.append(TaskInfo(c[: -len("_top_labels")], "class", []))
        elif c.endswith("_tags"):
            name = c[: -len("_tags")]
            tags = [x[len(name) + 1: -len("_prob")] for x in columns
                    if x.startswith(name + "_") and x.endswith("_prob") and x != f"{name}_prob"]
            tags = [t for t in tags if f"{name}_{t}" in cols]
            tasks.append(TaskInfo(name, "tags", tags))
    return tasks


def _class_columns(df: pd.DataFrame, name: str, n_images: pd.Series, top_k: int) -> pd.DataFrame:
    """Per product: TASK, TASK_prob, TASK_top_labels, TASK_top_probs (mean over readable images)."""
    long = df[["product_id", f"{name}_top_labels", f"{name}_top_probs"]].explode(
        [f"{name}_top_labels", f"{name}_top_probs"]).dropna()
    long.columns = ["product_id", "label", "prob"]
    long["prob"] = long["prob"].astype(np.float64)
    sums = long.groupby(["product_id", "label"], sort=False)["prob"].sum().reset_index()
    sums["prob"] = sums["prob"] / sums["product_id"].map(n_images).to_numpy()
    sums = sums.sort_values(["product_id", "prob", "label"], ascending=[True, False, True], kind="mergesort")
    top = sums.groupby("product_id", sort=False).head(top_k)
    grouped = top.groupby("product_id", sort=False)
    out = pd.DataFrame({f"{name}_top_labels": grouped["label"].agg(list),
                        f"{name}_top_probs": grouped["prob"].agg(list)})
    out[name] = out[f"{name}_top_labels"].str[0]
    out[f"{name}_prob"] = out[f"{name}_top_probs"].str[0]
    return out[[name, f"{name}_prob", f"{name}_top_labels", f"{name}_top_probs"]]


def aggregate_predictions(predictions, tasks: list[TaskInfo] | None = None, out: str | Path | None = None,
                          top_k: int | None = None, hierarchy_paths: dict | None = None,
                          accept: dict | None = None) -> pd.DataFrame:
    """One row per product from the per-image predictions (parquet path or DataFrame).

    Columns: ``product_id``, ``n_images`` (readable ones), ``ids`` (all image ids), then per
    class task ``TASK, TASK_prob, TASK_top_labels, TASK_top_probs`` and per tags task
    ``TASK_tags, TASK_<tag>_prob, TASK_<tag>``. ``tasks`` (the model's) give the tag
    thresholds; without them they are inferred from the columns with threshold 0.5.
    ``hierarchy_paths`` (``model.meta["hierarchy_paths"]``): product labels are decoded to the
    best known path over the aggregated probabilities. ``accept`` (model.json
    ``accept.thresholds``): ``TASK_accept`` per product, the product's mean probability of its
    label against the task's threshold (chosen per photo, so a product is accepted when its
    photos agree confidently). ``out``: also written there (atomic).
    """
    df = pd.read_parquet(predictions) if not isinstance(predictions, pd.DataFrame) else predictions
    tasks = tasks or infer_tasks(list(df.columns))
    df = df.assign(product_id=df["product_id"].astype(str))
    readable = df["problem"].isna() if "problem" in df else pd.Series(True, index=df.index)
    ok = df[readable]
    products = pd.Index(pd.unique(df["product_id"]), name="product_id")
    n_images = ok.groupby("product_id").size().reindex(products, fill_value=0)
    result = pd.DataFrame(index=products)
    result["n_images"] = n_images.astype(np.int64)
    result["ids"] = df.groupby("product_id", sort=False)["id"].agg(list).reindex(products)
    for t in tasks:
        if t.kind == "class":
            k = top_k or max((len(v) for v in ok[f"{t.name}_top_labels"] if v is not None), default=1)
            cols = _class_columns(ok, t.name, n_images, k) if len(ok) else pd.DataFrame(
                columns=[t.name, f"{t.name}_prob", f"{t.name}_top_labels", f"{t.name}_top_probs"])
            result = result.join(cols)
        else:
            thr = t.threshold_array()
            means = ok.groupby("product_id")[[f"{t.name}_{tag}_prob" for tag in t.classes]].mean()
            means = means.reindex(products)
            dec = means.to_numpy() >= thr[None, :]
            has = means.notna().all(1).to_numpy()
            result[f"{t.name}_tags"] = [[c for c, d in zip(t.classes, row) if d] if h else None
                                        for row, h in zip(dec, has)]
            for j, tag in enumerate(t.classes):
                result[f"{t.name}_{tag}_prob"] = means.iloc[:, j].to_numpy()
                result[f"{t.name}_{tag}"] = [bool(d) if h else None for d, h in zip(dec[:, j], has)]
    if hierarchy_paths:
        _decode_products(result, tasks, hierarchy_paths)
    for name, thr in (accept or {}).items():
        if name in result:
            from catalens.model.decode import accept_mask

            prob = result[f"{name}_prob"].astype(np.float64)
            flags = accept_mask(prob.fillna(-1.0).to_numpy(np.float32), thr)
            result.insert(result.columns.get_loc(f"{name}_prob") + 1, f"{name}_accept",
                          [bool(f) if not np.isnan(v) else None for f, v in zip(flags, prob)])
    result = result.reset_index()
    if out is not None:
        out = Path(out)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        result.to_parquet(tmp, index=False)
        os.replace(tmp, out)
    return result


def _decode_products(result: pd.DataFrame, tasks: list[TaskInfo], paths: dict, chunk: int = 20_000) -> None:
    """Replace class labels by the best known path over the aggregated top-k probabilities."""
    from catalens.heads.hierarchy import decode_hierarchy
    from catalens.tasks import hierarchy_levels

    chains = hierarchy_levels(tasks)
    names = sorted({c for ch in chains for c in ch})
    if not names:
        return
    flat = [p for v in paths.values() for p in v]
    classes = {n: sorted({str(p[ch.index(n)]) for ch in chains if n in ch for p in paths.get(" > ".join(ch), [])}
                         | {x for x in result[n].dropna()}) for n in names}
    levels = [TaskInfo(n, "class", classes[n], next((t.parent for t in tasks if t.name == n), None)) for n in names]
    rows = np.flatnonzero(result[names].notna().all(1).to_numpy())
    for s in range(0, len(rows), chunk):
        r = rows[s:s + chunk]
        dense = {}
        for t in levels:
            index = {c: i for i, c in enumerate(t.classes)}
            m = np.zeros((len(r), t.n_outputs))
            for i, (labs, probs) in enumerate(zip(result[f"{t.name}_top_labels"].iloc[r],
                                                  result[f"{t.name}_top_probs"].iloc[r])):
                for lab, p in zip(labs, probs):
                    if lab in index:
                        m[i, index[lab]] = p
            dense[t.name] = m
        decoded = decode_hierarchy(levels, dense, paths if isinstance(paths, dict) else flat)
        for t in levels:
            if t.name not in decoded:
                continue
            idx = decoded[t.name]
            col = result.columns.get_loc(t.name)
            pcol = result.columns.get_loc(f"{t.name}_prob")
            result.iloc[r, col] = np.asarray(t.classes, dtype=object)[idx]
            result.iloc[r, pcol] = dense[t.name][np.arange(len(r)), idx]
