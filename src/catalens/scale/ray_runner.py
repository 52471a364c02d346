"""``catalens embed|predict ... --ray [ADDRESS]``: the same pipeline on a Ray cluster.

The catalogue's rows (row, id, product_id, path, split) become a Ray Dataset
(``from_pandas``, one block per ``block_rows`` rows) that flows through two stages:

1. **decode** (stateless Ray tasks, ``decode_cpus`` each): read the bytes with the
   catalogue's reader, hash them (the embedding-cache key) and decode + resize with catalens'
   own :func:`catalens.embed.decode.decode_one` (:func:`catalens.ingest.images.load_rgb`:
   same problem codes as the single-process engine);
2. **infer** (an actor pool, ``concurrency=actors``, ``actor_cpus`` each): every actor loads
   the backbone (embed) or the whole model folder (predict) **once**, from bytes shipped
   through the object store (workers need neither the model folder nor the weights on
   their disk), and runs the backbone with the engine's runtimes (``auto`` / ``onnx`` /
   ``eager`` ...); predict actors also run the heads and return exactly the columns of
   :func:`catalens.model.predictor.output_schema` (decoded by the model's one decoder).

The driver collects the blocks as they finish, whatever their order: ``embed`` writes each
block's features into ``embeddings.npy`` at its rows (a memory-mapped file, so memory stays
bounded); ``predict`` writes each block as a part file, sorts the parts by row and merges
them into one parquet file (same schema, same row order as the single-process run),
written atomically. Images already in the driver's embedding cache are not inferred again
when the actor's node sees the same cache folder (one machine, or a shared folder); new
features are added to the driver's cache by the driver only (one writer).

What every node needs: catalens installed (same version) and the photos readable at the
catalogue's paths (a shared file system, or a BSON dump at the same path). See docs/scale.md.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

_logger = logging.getLogger(__name__)

#: inference actors per node grow past one only on big nodes (ONNX/torch threads scale
#: sub-linearly beyond ~8 threads; several actors fill the node better)
THREADS_PER_ACTOR_MAX = 8


# ----------------------------------------------------------------------------- cluster

@dataclass
class RayOptions:
    """How the work is spread; ``None`` means sized from the cluster (see :func:`plan_cluster`)."""

    address: str | None = None        # None / "local": start a local Ray; "auto", "ray://host:10001": connect
    num_cpus: int | None = None       # local Ray only: CPUs it may use (default: all)
    actors: int | None = None         # inference actors in all
    actor_cpus: float | None = None   # logical CPUs reserved by each inference actor
    threads: int | None = None        # inference threads per actor
    decode_cpus: float | None = None  # logical CPUs per decode task
    block_rows: int = 128             # rows per block (decode task / actor call)
    shutdown: bool | None = None      # shut Ray down at the end (default: only if this call started it)


@dataclass(frozen=True)
class ClusterPlan:
    nodes: int
    cpus_per_node: float
    actors: int
    actor_cpus: float
    threads: int
    decode_cpus: float

    def describe(self) -> str:
        return (f"{self.nodes} node(s) x {self.cpus_per_node:g} CPUs: {self.actors} inference actor(s) "
                f"x {self.threads} threads ({self.actor_cpus:g} CPUs reserved each), decode tasks "
                f"{self.decode_cpus:g} CPU each")


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to (or start) Ray; returns True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    kw = dict(include_dashboard=False, logging_level="warning", configure_logging=True)
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "CATALENS_OFFLINE", "CATALENS_NO_MALLOC_TUNING")
           if k in os.environ}
    if address in (None, "", "local"):
        ray.init(num_cpus=num_cpus, **kw)
        return True
    try:
        ray.init(address=address, runtime_env={"env_vars": env} if env else None, **kw)
    except Exception as e:  # ConnectionError, TimeoutError, ValueError...
        raise RuntimeError(f"cannot join the Ray cluster at '{address}' ({type(e).__name__}: {e}). Start one with "
                           f"'ray start --head' (and 'ray start --address=HEAD_IP:6379' on the other nodes), or "
                           f"use --ray alone for a local Ray on this machine") from None
    return True


def _cpu_nodes() -> list[float]:
    import ray

    return [float(n["Resources"].get("CPU", 0)) for n in ray.nodes()
            if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]


def plan_cluster(opts: RayOptions, nodes: list[float] | None = None) -> ClusterPlan:
    """Actors, threads and CPU reservations from the cluster's CPU nodes.

    Per node of ``C`` CPUs (the smallest node): decode gets ``max(0.5, C * DECODE_SHARE)``
    CPUs (as in the single-process engine), inference the rest, split into
    ``ceil(rest / 8)`` actors; each actor runs ``ceil(its CPUs)`` threads (on 2 CPUs: one
    actor reserving 1.5 CPUs with 2 threads + decode tasks of 0.5 CPU: the single-process
    split of 1 decode worker + 2 inference threads).
    """
    from catalens.embed.engine import DECODE_SHARE

    nodes = nodes if nodes is not None else _cpu_nodes()
    if not nodes:
        raise RuntimeError("the Ray cluster has no node with CPUs")
    c = min(nodes)
    decode_node = max(0.5, c * DECODE_SHARE)
    infer_node = max(0.5, c - decode_node)
    per_node = max(1, math.ceil(infer_node / THREADS_PER_ACTOR_MAX))
    actor_cpus = opts.actor_cpus or round(infer_node / per_node, 3)
    actors = opts.actors or per_node * len(nodes)
    threads = opts.threads or max(1, math.ceil(actor_cpus + decode_node / per_node - 1e-9))
    decode_cpus = opts.decode_cpus or min(1.0, decode_node)
    return ClusterPlan(len(nodes), c, actors, actor_cpus, threads, decode_cpus)


# ----------------------------------------------------------------------------- worker side

def _rows_frame(cat) -> pd.DataFrame:
    """What travels per row: position, ids, path, split, title and the labels of class tasks
    (``true_<task>``, written next to the predictions as the single-process run does)."""
    f = cat.frame
    out = pd.DataFrame({"row": np.arange(len(f), dtype=np.int64), "id": f["id"].astype(str).to_numpy(),
                        "product_id": f["product_id"].astype(str).to_numpy(),
                        "path": f["path"].astype(str).to_numpy(),
                        "split": [s if isinstance(s, str) else "" for s in f["split"]],
                        "text": [t if isinstance(t, str) else "" for t in f["text"]] if "text" in f
                        else [""] * len(f)})
    for t in cat.tasks:
        if t.kind == "class" and t.name in f:
            out[f"true_{t.name}"] = [v if isinstance(v, str) else "" for v in f[t.name]]
    return out


def _dataset(cat, block_rows: int):
    import ray

    rows = _rows_frame(cat)
    chunks = [rows.iloc[s:s + block_rows].reset_index(drop=True) for s in range(0, len(rows), block_rows)]
    return ray.data.from_pandas(chunks or [rows])


def _strings(v) -> list:
    """Text cells as str / None ("" travels as None: Arrow→numpy conversions differ on nulls)."""
    return [None if x is None or x == "" or (isinstance(x, float) and np.isnan(x)) else str(x) for x in v]


def _cells(values) -> np.ndarray:
    """str / None → a numpy str array with "" for None (a null-free column crosses stages intact)."""
    return np.asarray(["" if v is None else str(v) for v in values], dtype=object)


def decode_batch(batch: dict, reader, pre_dict: dict, max_pixels: int) -> dict:
    """Stage 1 (stateless tasks): bytes → hash → pixels, with catalens' own decode."""
    from catalens.embed.decode import DecodeJob, decode_one
    from catalens.ingest.images import Preprocess

    job = DecodeJob(reader=reader, pre=Preprocess.from_dict(pre_dict), max_pixels=max_pixels)
    h, w = job.pre.hw
    rows = np.asarray(batch["row"], dtype=np.int64)
    paths = _strings(batch["path"])
    decoded = [decode_one(int(r), p, job) for r, p in zip(rows, paths)]
    pixels = np.zeros((len(rows), h, w, 3), dtype=np.uint8)
    has = np.zeros(len(rows), dtype=bool)
    for i, d in enumerate(decoded):
        if d.pixels is not None:
            pixels[i] = d.pixels
            has[i] = True
    keep = ("id", "product_id", "path", "split", "text") + tuple(k for k in batch if k.startswith("true_"))
    out = {k: _cells(_strings(batch[k])) for k in keep}
    out.update(row=rows, has_pixels=has, pixels=pixels, key=_cells(d.key for d in decoded),
               problem=_cells(f"{d.problem}: {d.detail}" if d.problem else None for d in decoded))
    return out


def _folder_files(folder: Path) -> dict[str, bytes]:
    """A model folder's files by relative path (sub-folders included: title model, ensemble
    members), without exported ONNX graphs and hidden working folders (fine-tuning state)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix != ".onnx"
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def _materialise(files: dict[str, bytes]) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="catalens-ray-model-"))
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return folder


class InferStage:
    """Stage 2 (actor pool): backbone (+ heads) loaded once per actor.

    ``payload`` is ``{"kind": "embed", "desc": ..., "state": safetensors bytes}`` or
    ``{"kind": "predict", "files": {relative path: bytes}}`` (a model folder).
    """

    def __init__(self, payload, runtime: str, threads: int, batch_size: int, top_k: int,
                 cache_dir: str | None, return_features: bool, runtime_dir: str | None = None) -> None:
        import ray

        from catalens.embed.cache import EmbeddingCache
        from catalens.embed.runtimes import runtime_precision
        from catalens.embed.engine import EngineConfig, engine_runner
        from catalens.runtime import set_threads

        if isinstance(payload, list):          # [ObjectRef]: fetched once per actor
            payload = ray.get(payload[0])
        self.kind = payload["kind"]
        if self.kind == "predict":
            from catalens.model.load import load_model

            folder = _materialise(payload["files"])
            try:
                self.model = load_model(folder)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            self.backbone = self.model.backbone
        else:
            from safetensors.torch import load as load_tensors

            from catalens.embed.factory import backbone_from_description

            self.model = None
            self.backbone = backbone_from_description(payload["desc"], load_tensors(payload["state"]))
        set_threads(threads)
        self.fingerprint = payload.get("fingerprint") or self.backbone.fingerprint()
        ecfg = EngineConfig(batch_size=batch_size, runtime=runtime, threads=threads, progress=False,
                            runtime_dir=runtime_dir)
        self.runner = engine_runner(self.backbone, ecfg, threads, fingerprint=self.fingerprint)
        self.batch_size = batch_size
        self.top_k = top_k
        self.return_features = return_features
        self.cache = None
        # the driver's cache holds the requested runtime's precision; a lossy one chosen here by 'auto' keeps its own
        own = runtime_precision(getattr(self.runner, "name", runtime))
        self.share_new = own == runtime_precision(runtime)
        if cache_dir:
            try:  # read-only here: the driver is the cache's only writer
                self.cache = EmbeddingCache(cache_dir, self.fingerprint, self.backbone.feature_dim, precision=own)
            except OSError:
                self.cache = None
        self.dim = self.backbone.feature_dim
        if self.kind == "predict":
            from catalens.model.predictor import output_schema

            self.true_tasks = list(payload.get("true_tasks") or [])
            self.schema = output_schema(self.model.tasks, self.true_tasks).append(pa.field("row", pa.int64()))
        else:
            self.schema = pa.schema([("row", pa.int64()), ("ok", pa.bool_()), ("problem", pa.string())])
        if return_features:
            self.schema = self.schema.append(pa.field("key", pa.string())).append(
                pa.field("new", pa.bool_())).append(pa.field("features", pa.list_(pa.float32(), self.dim)))

    def _features(self, batch: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import torch

        n = len(batch["row"])
        feats = np.zeros((n, self.dim), dtype=np.float32)
        ok = np.zeros(n, dtype=bool)
        new = np.zeros(n, dtype=bool)
        keys = _strings(batch["key"])
        has = np.asarray(batch["has_pixels"], dtype=bool)
        cached = [i for i in np.flatnonzero(has) if self.cache is not None and keys[i] in self.cache]
        if cached:
            feats[cached] = self.cache.get([keys[i] for i in cached])
            ok[cached] = True
        todo = [i for i in np.flatnonzero(has) if not ok[i]]
        pixels = batch["pixels"]
        with torch.inference_mode():
            for s in range(0, len(todo), self.batch_size):
                idx = todo[s:s + self.batch_size]
                feats[idx] = self.runner(np.ascontiguousarray(pixels[idx]))
                ok[idx] = True
                new[idx] = self.share_new
        return feats, ok, new

    def __call__(self, batch: dict) -> pa.Table:
        feats, ok, new = self._features(batch)
        rows = np.asarray(batch["row"], dtype=np.int64)
        problems = _strings(batch["problem"])
        if self.kind == "predict":   # the probabilities and the decoder every other entry point uses
            titles = [t or None for t in _strings(batch["text"])] if "text" in batch else None  # "" = no title
            probs = self.model.predict_proba_features(feats, texts=titles)
            cols = {"id": _strings(batch["id"]), "product_id": _strings(batch["product_id"]),
                    "path": _strings(batch["path"]), "split": _strings(batch["split"]), "problem": problems}
            for n in self.true_tasks:
                cols[f"true_{n}"] = [v or None for v in _strings(batch[f"true_{n}"])]
            decoder = self.model.decoder
            cols.update(decoder.columns(decoder.decode(probs, self.top_k), ok))
            cols["row"] = rows
        else:
            cols = {"row": rows, "ok": ok, "problem": problems}
        if self.return_features:
            cols["key"] = _strings(batch["key"])
            cols["new"] = new
            cols["features"] = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), self.dim)
        return pa.table(cols, schema=self.schema)


# ----------------------------------------------------------------------------- driver side

def _pipeline(cat, payload_ref, pre_dict: dict, cfg, opts: RayOptions, plan: ClusterPlan,
              cache_dir: str | None, return_features: bool):
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    if not cfg.engine.progress:
        import logging

        logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx.execution_options.preserve_order = False   # the driver sorts by row
    ds = _dataset(cat, opts.block_rows)
    ds = ds.map_batches(decode_batch, fn_kwargs={"reader": cat.reader, "pre_dict": pre_dict,
                                                 "max_pixels": cfg.data.max_pixels},
                        batch_size=opts.block_rows, batch_format="numpy", num_cpus=plan.decode_cpus)
    ds = ds.map_batches(InferStage, fn_constructor_kwargs={
        "payload": [payload_ref], "runtime": cfg.engine.runtime, "threads": plan.threads,
        "batch_size": cfg.engine.batch_size, "top_k": cfg.top_k, "cache_dir": cache_dir,
        "return_features": return_features},
        batch_size=opts.block_rows, batch_format="numpy", num_cpus=plan.actor_cpus,
        compute=ray.data.ActorPoolStrategy(size=plan.actors))
    return ds


def _start(opts: RayOptions, log) -> tuple[bool, ClusterPlan]:
    started = connect(opts.address, opts.num_cpus)
    plan = plan_cluster(opts)
    log(f"ray: {plan.describe()}")
    return started, plan


def _stop(started: bool, opts: RayOptions) -> None:
    import ray

    if opts.shutdown or (opts.shutdown is None and started):
        ray.shutdown()


def _bar(total: int, enabled: bool, desc: str):
    from catalens.embed.engine import _progress

    return _progress(total, enabled, desc)


def _add_to_cache(cache, tb: pa.Table) -> int:
    if cache is None or "new" not in tb.column_names:
        return 0
    new = tb.column("new").to_numpy(zero_copy_only=False)
    if not new.any():
        return 0
    idx = np.flatnonzero(new)
    feats = np.asarray(tb.column("features").combine_chunks().flatten().to_numpy(), dtype=np.float32)
    feats = feats.reshape(len(tb), -1)[idx]
    keys = [tb.column("key")[int(i)].as_py() for i in idx]
    cache.add(keys, feats)
    return len(idx)


def ray_predict_catalogue(model_folder: str | Path, cat, out: str | Path, cfg, opts: RayOptions | None = None,
                          use_cache: bool = True, log=None, model=None):
    """Predict every row of ``cat`` on Ray into the parquet file ``out`` (as :func:`predict_catalogue`)."""
    log = log or _logger.info
    import ray

    from catalens.embed.cache import EmbeddingCache
    from catalens.embed.runtimes import runtime_precision
    from catalens.model.load import load_model
    from catalens.model.predictor import output_schema, true_label_tasks
    from catalens.predict.predictor import PredictResult, write_product_predictions

    opts = opts or RayOptions()
    t0 = time.time()
    out = Path(out)
    folder = Path(model_folder)
    model = model if model is not None else load_model(folder)
    true_tasks = true_label_tasks(model.tasks, cat)
    schema = output_schema(model.tasks, true_tasks)
    fingerprint = model.backbone.fingerprint()
    cache = EmbeddingCache(cfg.cache_dir, fingerprint, model.backbone.feature_dim,  # model.json's decoder
                           jpeg=model.backbone.preprocess.decoder(),
                           precision=runtime_precision(cfg.engine.runtime)) if use_cache else None
    files = _folder_files(folder)
    started, plan = _start(opts, log)
    parts = out.with_name(out.name + f".ray-parts{os.getpid()}")
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(parents=True)
    n_problems = new = 0
    try:
        ref = ray.put({"kind": "predict", "files": files, "fingerprint": fingerprint, "true_tasks": true_tasks})
        ds = _pipeline(cat, ref, model.preprocess.to_dict(), cfg, opts, plan,
                       cfg.cache_dir if use_cache else None, return_features=use_cache)
        bar = _bar(len(cat), cfg.engine.progress, f"predict on ray [{plan.actors} actors]")
        starts = []
        for tb in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if not len(tb):
                continue
            new += _add_to_cache(cache, tb)
            tb = tb.sort_by("row").select(schema.names + ["row"])
            first = int(tb.column("row")[0].as_py())
            starts.append(first)
            pq.write_table(tb, parts / f"part-{first:012d}.parquet", compression="zstd")
            n_problems += len(tb) - tb.column("problem").null_count
            bar.update(len(tb))
        bar.close()
        if cache is not None:
            cache.flush()
        merge_sorted_parts(parts, out, schema, len(cat))
    finally:
        shutil.rmtree(parts, ignore_errors=True)
        _stop(started, opts)
    products = write_product_predictions(model, cat, out, cfg.top_k, log)   # as the single-process run
    return PredictResult(out, len(cat), n_problems, time.time() - t0, 0, products)


def merge_sorted_parts(parts: Path, out: Path, schema: pa.Schema, n_rows: int) -> None:
    """Parts (each sorted by ``row``) → one file ordered by row, written atomically; ``row`` dropped.

    Parts cover contiguous row ranges in practice (one block each) and are streamed in order
    (constant memory); should they ever overlap, everything is read and sorted at once.
    """
    files = sorted(parts.glob("part-*.parquet"))
    ranges = []
    for f in files:
        rows = pq.read_table(f, columns=["row"]).column("row").to_numpy()
        ranges.append((int(rows[0]), int(rows[-1]), len(rows)))
    contiguous = all(lo == (ranges[k - 1][1] + 1 if k else 0) and hi - lo + 1 == n
                     for k, (lo, hi, n) in enumerate(ranges))
    total = sum(r[2] for r in ranges)
    if total != n_rows:
        raise RuntimeError(f"ray run returned {total} rows for a catalogue of {n_rows}")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(tmp, schema, compression="zstd") as w:
        if contiguous:
            for f in files:
                w.write_table(pq.read_table(f).select(schema.names).cast(schema))
        else:
            tb = pa.concat_tables([pq.read_table(f) for f in files]).sort_by("row")
            rows = tb.column("row").to_numpy()
            if not np.array_equal(rows, np.arange(n_rows)):
                raise RuntimeError("ray run returned duplicate or missing rows")
            w.write_table(tb.select(schema.names).cast(schema))
    os.replace(tmp, out)


def ray_embed_to_folder(data, out: str | Path, cfg, opts: RayOptions | None = None, use_cache: bool = True,
                        log=None, stats: dict | None = None) -> Path:
    """``catalens embed --ray``: the files of :func:`catalens.embed.export_features.embed_to_folder`.

    ``stats`` (a dict), when given, receives timings: ``submitted`` / ``first_block`` /
    ``last_block`` (``time.time()``), ``driver_seconds`` (time the driver spent on blocks)
    and the cluster ``plan``.
    """
    log = log or _logger.info
    import json

    import ray
    from safetensors.torch import save as save_tensors

    from catalens.embed.factory import backbone_from_config
    from catalens.embed.cache import EmbeddingCache
    from catalens.embed.runtimes import runtime_precision
    from catalens.ingest.open import open_catalogue

    opts = opts or RayOptions()
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cat = open_catalogue(data) if not hasattr(data, "frame") else data
    backbone = backbone_from_config(cfg.backbone)
    fingerprint = backbone.fingerprint()
    dim = backbone.feature_dim
    cache = EmbeddingCache(cfg.cache_dir, fingerprint, dim, precision=runtime_precision(cfg.engine.runtime)) \
        if use_cache else None
    state = save_tensors({k: v.contiguous() for k, v in backbone.module.net.state_dict().items()})
    started, plan = _start(opts, log)
    tmp = out / f"embeddings.npy.tmp{os.getpid()}"
    n = len(cat)
    ok = np.zeros(n, dtype=bool)
    problems: list[str | None] = [None] * n
    try:
        ref = ray.put({"kind": "embed", "desc": backbone.describe(), "state": state, "fingerprint": fingerprint})
        ds = _pipeline(cat, ref, backbone.preprocess.to_dict(), cfg, opts, plan,
                       cfg.cache_dir if use_cache else None, return_features=True)
        feats = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
        bar = _bar(n, cfg.engine.progress, f"embed on ray [{plan.actors} actors]")
        seen = 0
        st = stats if stats is not None else {}
        st.update(plan=plan, submitted=time.time(), driver_seconds=0.0)
        for tb in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if not len(tb):
                continue
            t_block = time.time()
            st.setdefault("first_block", t_block)
            st["first_rows"] = st.get("first_rows", len(tb))
            _add_to_cache(cache, tb)
            rows = tb.column("row").to_numpy()
            block = np.asarray(tb.column("features").combine_chunks().flatten().to_numpy(), dtype=np.float32)
            feats[rows] = block.reshape(len(rows), dim)
            ok[rows] = tb.column("ok").to_numpy(zero_copy_only=False)
            for r, p in zip(rows.tolist(), tb.column("problem").to_pylist()):
                problems[r] = p
            seen += len(rows)
            bar.update(len(rows))
            st["last_block"] = time.time()
            st["driver_seconds"] += st["last_block"] - t_block
        bar.close()
        if seen != n:
            raise RuntimeError(f"ray run returned {seen} rows for a catalogue of {n}")
        feats.flush()
        del feats
        if cache is not None:
            cache.flush()
        os.replace(tmp, out / "embeddings.npy")
    finally:
        if tmp.exists():
            tmp.unlink()
        _stop(started, opts)
    index = pd.DataFrame({"id": cat.frame["id"].astype(str), "path": cat.frame["path"].astype(str),
                          "split": cat.frame["split"], "ok": ok, "problem": problems})
    index.to_parquet(out / "index.parquet", index=False)
    desc = backbone.describe() | {"fingerprint": fingerprint, "images": n, "failed": int((~ok).sum()),
                                  "ray": plan.describe()}
    (out / "backbone.json").write_text(json.dumps(desc, indent=1))
    dt = time.time() - t0
    log(f"{n} images embedded on ray ({int((~ok).sum())} failed) into {out} in {dt:.1f}s "
        f"({n / max(dt, 1e-9):.1f} img/s)")
    return out
