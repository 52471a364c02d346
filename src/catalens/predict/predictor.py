"""``catalens predict --out FILE``: a whole catalogue to parquet / CSV / JSON Lines, streaming and resumable.

Rows are processed in parts of ``part_rows``; each finished part is written atomically as
``OUT.parts/part-NNNNN-<fingerprint>.parquet``, where the fingerprint hashes the part's rows
(ids and paths), the model and the output settings. A re-run reuses a part only when its
fingerprint still matches, so a catalogue changed between runs (a row removed, another added)
never resumes into stale rows: the parts that changed are predicted again and the run says so.
When every part exists they are merged, part by part (constant memory), into ``OUT`` in the
format its extension names (:mod:`catalens.predict.writers`), and the parts are removed.

Rows whose photo failed are kept, with ``problem`` set and null predictions. Labels the
catalogue carries (a labelled folder, a dataset file) are written as ``true_<task>``. The
columns and their decoding come from the inference core (:mod:`catalens.model.predictor`,
:mod:`catalens.model.decode`); nothing here decides a label. When some product has several
photos, ``OUT`` is followed by ``OUT.products.<ext>``: one row per product, the mean of its
photos' probabilities (:mod:`catalens.predict.aggregate`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from catalens.config import Config
from catalens.ingest.catalogue import Catalogue
from catalens.model.predictor import (output_schema, prediction_columns, stream_probabilities,
                                      true_label_tasks)
from catalens.predict.writers import TableWriter, output_format, tmp_path

logger = logging.getLogger(__name__)


@dataclass
class PredictResult:
    path: Path
    rows: int
    problems: int
    seconds: float
    resumed_parts: int
    products: Path | None = None   # per-product file, when some product has several photos


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def part_fingerprint(model_stamp: str, cat: Catalogue, rows: np.ndarray, settings: str) -> str:
    """A hash of what part ``rows`` would hold: the model, the settings, the rows' ids, paths and titles."""
    f = cat.frame.iloc[rows]
    h = hashlib.sha256(f"{model_stamp}\n{settings}\n".encode())
    for col in ("id", "path", "text"):
        if col in f:
            h.update("\x1f".join("" if v is None else str(v) for v in f[col]).encode("utf-8", "replace"))
            h.update(b"\x1e")
    return h.hexdigest()[:16]


def model_stamp(model) -> str:
    return json.dumps({"created": model.meta.get("created"), "backbone": model.backbone.fingerprint(),
                       "tasks": [t.to_dict() for t in model.tasks],
                       "hierarchy_decoding": bool(model.meta.get("hierarchy_decoding"))}, sort_keys=True, default=str)


def predict_catalogue(model, cat: Catalogue, out: str | Path, cfg: Config, engine=None, part_rows: int = 8192,
                      use_cache: bool = True, log=None) -> PredictResult:
    """Predict every row of ``cat`` into ``out`` (format by extension; resumable). ``engine``
    defaults to the configuration's (``cfg.engine``)."""
    from catalens.embed.features import engine_config

    log = log or logger.info
    if part_rows < 1:
        raise ValueError(f"part_rows must be at least 1, got {part_rows}")
    t0 = time.time()
    out = Path(out)
    output_format(out)  # an unknown extension fails before any work
    engine = engine if engine is not None else engine_config(cfg)
    true_tasks = true_label_tasks(model.tasks, cat)
    schema = output_schema(model.tasks, true_tasks)
    parts = parts_dir(out)
    parts.mkdir(parents=True, exist_ok=True)
    n_parts = max(1, -(-len(cat) // part_rows))
    stamp = model_stamp(model)
    settings = json.dumps({"top_k": cfg.top_k, "part_rows": part_rows, "columns": schema.names})
    plan = [(k, np.arange(k * part_rows, min((k + 1) * part_rows, len(cat)))) for k in range(n_parts)]
    names = {k: f"part-{k:05d}-{part_fingerprint(stamp, cat, rows, settings)}.parquet" for k, rows in plan}
    stale = [p for p in parts.glob("part-*.parquet") if p.name not in names.values()]
    done = [k for k in names if (parts / names[k]).exists()]
    if stale:
        log(f"{len(stale)} part(s) in {parts} were written for other rows, another model or other settings: "
            f"predicting them again")
        for p in stale:
            p.unlink()
    if done:
        log(f"resuming: {len(done)} of {n_parts} parts already written in {parts}")
    cache = None
    if use_cache:
        from catalens.embed.cache import EmbeddingCache

        cache = EmbeddingCache(cfg.cache_dir, model.backbone.fingerprint(), model.backbone.feature_dim,
                               jpeg=model.backbone.preprocess.decoder())  # the decoder model.json records
    for k, rows in plan:
        if k in done:
            continue
        _write_part(_predict_part(model, cat.subset(rows), cache, engine, cfg.top_k, schema, true_tasks),
                    parts / names[k])
    n_problems = _merge(parts, [names[k] for k, _ in plan], out, schema)
    products = write_product_predictions(model, cat, out, cfg.top_k, log)
    return PredictResult(out, len(cat), n_problems, time.time() - t0, len(done), products)


def _predict_part(model, sub: Catalogue, cache, engine, top_k: int, schema: pa.Schema, true_tasks) -> pa.Table:
    tables = [pa.table(prediction_columns(model, sub, b, top_k, true_tasks), schema=schema)
              for b in stream_probabilities(model, sub, cache, engine)]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _write_part(table: pa.Table, path: Path) -> None:
    tmp = tmp_path(path)
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)


def _merge(parts: Path, names: list[str], out: Path, schema: pa.Schema) -> int:
    """Parts → ``out`` (one row group at a time); returns the number of rows with a problem."""
    w = TableWriter(out, schema)
    problems = 0
    try:
        for name in names:
            pf = pq.ParquetFile(parts / name)
            for i in range(pf.num_row_groups):
                group = pf.read_row_group(i)
                problems += len(group) - group.column("problem").null_count
                w.write(group)
    except BaseException:
        w.abort()
        raise
    w.close()
    shutil.rmtree(parts)
    return problems


def write_product_predictions(model, cat: Catalogue, out: Path, top_k: int, log=None) -> Path | None:
    """``OUT.products.<ext>`` (mean of each product's photo probabilities) when some product has
    several photos; ``None`` otherwise."""
    if not cat.frame["product_id"].duplicated().any():
        return None
    import pandas as pd

    from catalens.predict.aggregate import aggregate_predictions
    from catalens.predict.writers import write_frame

    log = log or logger.info
    fmt = output_format(out)
    if fmt == "parquet":
        df = pd.read_parquet(out)
    else:
        df = _read_back(out, fmt)
    decoding = model.meta.get("hierarchy_decoding")
    products = out.with_name(out.stem + ".products" + out.suffix)
    result = aggregate_predictions(df, model.tasks, top_k=top_k,
                                   hierarchy_paths=model.meta.get("hierarchy_paths") if decoding else None,
                                   accept=(model.meta.get("accept") or {}).get("thresholds"))
    write_frame(result, products)
    log(f"per-product predictions (mean over each product's photos): {products}")
    return products


def _read_back(out: Path, fmt: str):
    """A CSV / JSONL prediction file as a DataFrame with list columns restored."""
    import pandas as pd

    if fmt == "jsonl":
        return pd.read_json(out, lines=True, dtype=False)
    df = pd.read_csv(out, dtype=str, keep_default_na=False, na_values=[""])
    for c in df.columns:
        if c.endswith(("_top_labels", "_top_probs", "_tags")):
            df[c] = [json.loads(v) if isinstance(v, str) else None for v in df[c]]
        elif c.endswith("_prob") or (c.endswith("_probs")):
            df[c] = pd.to_numeric(df[c])
    return df
