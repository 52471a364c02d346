"""``catalens predict``: a whole catalogue to parquet, streaming and resumable.

Rows are processed in parts of ``part_rows``; each finished part is written atomically
as ``OUT.parts/part-NNNNN.parquet``. A re-run skips finished parts (no duplicate, no
missing row). When all parts exist they are merged, row group by row group (constant
memory), into the single file ``OUT``, and the parts are removed. Rows whose image failed
are kept, with the ``problem`` column set and null predictions.

A model with a title model (``catalens train --text``) reads each row's title from the
catalogue's ``text`` column (rows without one are predicted from the image alone). A model
trained with ``hierarchy_decoding`` writes the most probable known path in the label and
``_prob`` columns (``_top_labels`` stay ranked by probability). When some product has
several photos, ``OUT`` is followed by ``OUT.products.parquet``: one row per product, the
mean of its photos' probabilities (:mod:`catalens.predict.aggregate`).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from catalens.artifact import CatalensModel
from catalens.config import Config
from catalens.embed.cache import EmbeddingCache
from catalens.embed.engine import EngineConfig, stream_features
from catalens.ingest.catalogue import Catalogue
from catalens.predict.outputs import output_schema, prediction_columns


@dataclass
class PredictResult:
    path: Path
    rows: int
    problems: int
    seconds: float
    resumed_parts: int
    products: Path | None = None   # per-product parquet, when some product has several photos


def _part_path(parts: Path, k: int) -> Path:
    return parts / f"part-{k:05d}.parquet"


def _write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def _base_columns(cat: Catalogue, rows: np.ndarray, problems: dict[int, str]) -> dict[str, list]:
    f = cat.frame.iloc[rows]
    return {"id": f["id"].astype(str).tolist(), "product_id": f["product_id"].astype(str).tolist(),
            "path": f["path"].astype(str).tolist(),
            "split": [s if isinstance(s, str) else None for s in f["split"]],
            "problem": [problems.get(int(r)) for r in rows]}


def predict_catalogue(model: CatalensModel, cat: Catalogue, out: str | Path, cfg: Config,
                      engine: EngineConfig | None = None, part_rows: int = 8192, use_cache: bool = True,
                      log=print) -> PredictResult:
    """Predict every row of ``cat`` into the parquet file ``out`` (resumable)."""
    t0 = time.time()
    out = Path(out)
    parts = out.with_name(out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    _check_parts_match(parts, model, cat, part_rows)
    schema = output_schema(model.tasks)
    n_parts = max(1, -(-len(cat) // part_rows))
    done = [k for k in range(n_parts) if _part_path(parts, k).exists()]
    if done:
        log(f"resuming: {len(done)} of {n_parts} parts already written in {parts}")
    cache = None
    if use_cache:
        cache = EmbeddingCache(cfg.cache_dir, model.backbone.fingerprint(), model.backbone.feature_dim)
    n_problems = 0
    for k in range(n_parts):
        if k in done:
            continue
        rows = np.arange(k * part_rows, min((k + 1) * part_rows, len(cat)))
        table, bad = _predict_part(model, cat.subset(rows), rows, cache, engine, cfg.top_k, schema)
        n_problems += bad
        _write_atomic(table, _part_path(parts, k))
    _merge(parts, n_parts, out, schema)
    products = write_product_predictions(model, cat, out, cfg.top_k, log)
    return PredictResult(out, len(cat), n_problems, time.time() - t0, len(done), products)


def write_product_predictions(model, cat: Catalogue, out: Path, top_k: int, log=print) -> Path | None:
    """``OUT.products.parquet`` (mean of each product's photo probabilities) when some
    product has several photos; ``None`` otherwise."""
    if not cat.frame["product_id"].duplicated().any():
        return None
    from catalens.predict.aggregate import aggregate_predictions

    products = out.with_name(out.stem + ".products.parquet")
    decoding = model.meta.get("hierarchy_decoding")
    aggregate_predictions(out, model.tasks, out=products, top_k=top_k,
                          hierarchy_paths=model.meta.get("hierarchy_paths") if decoding else None)
    log(f"per-product predictions (mean over each product's photos): {products}")
    return products


def _predict_part(model, sub: Catalogue, rows: np.ndarray, cache, engine, top_k: int, schema) -> tuple[pa.Table, int]:
    tables = []
    bad = 0
    with torch.inference_mode():
        for block in stream_features(sub, model.backbone, cache, engine):
            probs = model_probabilities(model, block.features, sub, block.rows)
            problems = {int(p["row"]): f"{p['problem']}: {p['detail']}" for p in block.problems}
            bad += len(problems)
            cols = _base_columns(sub, block.rows, problems)
            cols.update(model_columns(model, probs, block.ok, top_k))
            tables.append(pa.table(cols, schema=schema))
    return pa.concat_tables(tables) if tables else schema.empty_table(), bad


def model_probabilities(model, features: np.ndarray, cat: Catalogue, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The model's probabilities for ``rows`` of ``cat``: with the rows' titles when the model
    has a title model (rows without a title: image only), else from the features alone."""
    if getattr(model, "text", None) is not None and "text" in cat.frame:
        return model.predict_proba_features(features, texts=cat.frame["text"].to_numpy(dtype=object)[rows])
    return model.predict_proba_features(features)


def model_columns(model, probs: dict[str, np.ndarray], ok: np.ndarray, top_k: int) -> dict[str, list]:
    """The prediction columns of rows with probabilities ``probs`` (see catalens.predict.outputs);
    hierarchy tasks hold the best known path when the model was trained with hierarchy decoding.
    Shared by the single-process predictor and the Ray actors."""
    cols = prediction_columns(model.tasks, probs, ok, top_k)
    if model.meta.get("hierarchy_decoding"):
        _decoded_columns(cols, model, probs, ok)
    return cols


def _decoded_columns(cols: dict, model, probs: dict[str, np.ndarray], ok: np.ndarray) -> None:
    """Label / ``_prob`` columns of hierarchy tasks replaced by the best known path."""
    from catalens.heads.hierarchy import decode_hierarchy

    decoded = decode_hierarchy(model.tasks, probs, model.meta.get("hierarchy_paths", {}))
    for t in model.tasks:
        if t.name in decoded:
            idx = decoded[t.name]
            cols[t.name] = [t.classes[j] if k else None for j, k in zip(idx, ok)]
            cols[f"{t.name}_prob"] = [float(probs[t.name][i, j]) if k else None
                                      for i, (j, k) in enumerate(zip(idx, ok))]


def _check_parts_match(parts: Path, model: CatalensModel, cat: Catalogue, part_rows: int) -> None:
    """Refuse to resume parts written for another model, catalogue or part size."""
    stamp = {"model": model.meta.get("created"), "rows": len(cat), "part_rows": part_rows,
             "first_id": str(cat.frame["id"].iat[0]) if len(cat) else None,
             "last_id": str(cat.frame["id"].iat[-1]) if len(cat) else None}
    f = parts / "_run.json"
    if f.exists():
        old = json.loads(f.read_text())
        if old != stamp:
            raise ValueError(f"'{parts}' holds parts of another run ({old}); delete it or choose another --out")
    else:
        f.write_text(json.dumps(stamp))


def _merge(parts: Path, n_parts: int, out: Path, schema: pa.Schema) -> None:
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    with pq.ParquetWriter(tmp, schema, compression="zstd") as w:
        for k in range(n_parts):
            pf = pq.ParquetFile(_part_path(parts, k))
            for i in range(pf.num_row_groups):
                w.write_table(pf.read_row_group(i))
    os.replace(tmp, out)
    shutil.rmtree(parts)
