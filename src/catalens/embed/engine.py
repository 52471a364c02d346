"""The streaming engine behind ``embed``, ``predict`` and evaluation.

Worker processes read, hash, decode and resize images while the main process runs the
backbone; a bounded window of blocks in flight keeps memory constant whatever the
catalogue size. Features come back block by block, in row order, so callers can stream
them to heads and parquet files.
"""
from __future__ import annotations

import multiprocessing as mp
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from catalens.embed.backbones import Backbone
from catalens.embed.cache import EmbeddingCache
from catalens.embed.decode import Decoded, DecodeJob, decode_block, decode_one, init_worker
from catalens.embed.runtimes import make_runner
from catalens.ingest.catalogue import Catalogue
from catalens.runtime import available_cpus, set_threads


@dataclass
class EngineConfig:
    """Knobs of the engine; defaults suit a 2-core CPU."""

    batch_size: int = 64
    workers: int | None = None      # decode processes; None: one per spare core, at least 1
    block_rows: int = 256           # rows per worker task
    in_flight: int = 4              # blocks submitted ahead of the one being consumed
    runtime: str = "eager"          # see catalens.embed.runtimes
    threads: int | None = None      # torch threads; None: available cores
    progress: bool = True


@dataclass
class Block:
    """Features of consecutive catalogue rows ``rows`` (``ok`` marks usable rows)."""

    rows: np.ndarray                # (m,) int row positions in the catalogue
    features: np.ndarray            # (m, dim) float32; zeros where not ok
    ok: np.ndarray                  # (m,) bool
    problems: list[dict] = field(default_factory=list)
    notes: list[dict] = field(default_factory=list)
    pixels: dict | None = None      # row -> (S,S,3) uint8, only when keep_pixels


def _n_workers(cfg: EngineConfig) -> int:
    return cfg.workers if cfg.workers is not None else max(1, available_cpus() - 1)


class _Pool:
    """A process pool when workers > 0, else in-process decoding (debugging, tiny jobs)."""

    def __init__(self, job: DecodeJob, workers: int) -> None:
        self.job = job
        self.pool = None
        if workers > 0:
            ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
            self.pool = ctx.Pool(workers, initializer=init_worker, initargs=(job,))

    def submit(self, items):
        if self.pool is None:
            return _Done([decode_one(r, p, self.job) for r, p in items])
        return self.pool.apply_async(decode_block, (items,))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


class _Done:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


def stream_features(cat: Catalogue, backbone: Backbone, cache: EmbeddingCache | None = None,
                    cfg: EngineConfig | None = None, keep_pixels: bool = False) -> Iterator[Block]:
    """Yield :class:`Block` s of features for every row of ``cat``, in row order.

    Rows already in ``cache`` (same image bytes) are not decoded again; new features are
    added to it, so an interrupted run resumes where it stopped.
    """
    cfg = cfg or EngineConfig()
    set_threads(cfg.threads)
    runner = make_runner(cfg.runtime, backbone.module, backbone.preprocess.size)
    known = frozenset(cache.keys()) if cache is not None and not keep_pixels else frozenset()
    job = DecodeJob(reader=cat.reader, pre=backbone.preprocess, known=known,
                    hash_content=cache is not None)
    paths = cat.frame["path"].tolist()
    blocks = [list(zip(range(s, min(s + cfg.block_rows, len(paths))), paths[s:s + cfg.block_rows]))
              for s in range(0, len(paths), cfg.block_rows)]
    pool = _Pool(job, _n_workers(cfg) if len(paths) > cfg.block_rows // 4 else 0)
    bar = _progress(len(paths), cfg.progress, f"embed {backbone.name}")
    try:
        queue: deque = deque()
        pending = iter(blocks)
        for items in pending:
            queue.append(pool.submit(items))
            if len(queue) > cfg.in_flight:
                break
        while queue:
            decoded = queue.popleft().get()
            nxt = next(pending, None)
            if nxt is not None:
                queue.append(pool.submit(nxt))
            block = _features_for(decoded, runner, cache, backbone.feature_dim, cfg.batch_size, keep_pixels)
            bar.update(len(decoded))
            yield block
    finally:
        bar.close()
        pool.close()
        if cache is not None:
            cache.flush()


def _features_for(decoded: list[Decoded], runner, cache: EmbeddingCache | None, dim: int,
                  batch_size: int, keep_pixels: bool) -> Block:
    """Run the backbone on decoded rows, fill cached rows from the cache."""
    m = len(decoded)
    rows = np.array([d.row for d in decoded], dtype=np.int64)
    feats = np.zeros((m, dim), dtype=np.float32)
    ok = np.zeros(m, dtype=bool)
    todo = [i for i, d in enumerate(decoded) if d.pixels is not None]
    for s in range(0, len(todo), batch_size):
        idx = todo[s:s + batch_size]
        batch = np.stack([decoded[i].pixels for i in idx])          # (b, S, S, 3) uint8
        out = runner(batch)                                           # (b, dim) float32
        feats[idx] = out
        ok[idx] = True
        if cache is not None:
            cache.add([decoded[i].key for i in idx], out)
    hits = [i for i, d in enumerate(decoded) if d.cached]
    if hits:
        feats[hits] = cache.get([decoded[i].key for i in hits])
        ok[hits] = True
    problems = [{"row": d.row, "problem": d.problem, "detail": d.detail} for d in decoded if d.problem]
    notes = [{"row": d.row, "note": n} for d in decoded for n in d.notes]
    pixels = {d.row: d.pixels for d in decoded if d.pixels is not None} if keep_pixels else None
    return Block(rows, feats, ok, problems, notes, pixels)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr,
                mininterval=1.0, dynamic_ncols=True)


@dataclass
class Embedded:
    """All features of a catalogue (rows that failed have ``ok == False``)."""

    features: np.ndarray   # (n, dim) float32
    ok: np.ndarray         # (n,) bool
    problems: list[dict]
    notes: list[dict]


def embed_catalogue(cat: Catalogue, backbone: Backbone, cache: EmbeddingCache | None = None,
                    cfg: EngineConfig | None = None) -> Embedded:
    """Collect :func:`stream_features` into arrays (for training-sized catalogues)."""
    feats = np.zeros((len(cat), backbone.feature_dim), dtype=np.float32)
    ok = np.zeros(len(cat), dtype=bool)
    problems, notes = [], []
    with torch.inference_mode():
        for b in stream_features(cat, backbone, cache, cfg):
            feats[b.rows] = b.features
            ok[b.rows] = b.ok
            problems += b.problems
            notes += b.notes
    return Embedded(feats, ok, problems, notes)
