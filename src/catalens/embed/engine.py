"""The streaming engine behind ``embed``, ``predict`` and evaluation.

Worker processes read, hash, decode and resize images while the main process runs the
backbone; a bounded window of blocks in flight keeps memory constant whatever the
catalogue size. Features come back block by block, in row order, so callers can stream
them to heads and parquet files.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import sys
import weakref
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


#: share of the CPU that decoding needs next to inference (measured ~0.15 for EfficientNet-Lite0
#: on 400-900 px JPEGs; the margin covers larger photos and lighter backbones)
DECODE_SHARE = 0.25


@dataclass
class EngineConfig:
    """Knobs of the engine; ``None`` means "sized from the cores available" (see :func:`plan`)."""

    batch_size: int = 32            # images per inference call (memory grows with it, speed does not past ~32)
    workers: int | None = None      # decode processes; None: ceil(cores * DECODE_SHARE), at least 1
    block_rows: int = 128           # rows per worker task
    in_flight: int | None = None    # blocks submitted ahead of the one being consumed; None: 2 per worker + 1
    runtime: str = "auto"           # see catalens.embed.runtimes
    threads: int | None = None      # inference threads (torch and ONNX Runtime); None: available cores
    progress: bool = True
    runtime_dir: str | None = None  # ONNX exports and auto choices; None: ~/.cache/catalens/onnx


@dataclass
class Block:
    """Features of consecutive catalogue rows ``rows`` (``ok`` marks usable rows)."""

    rows: np.ndarray                # (m,) int row positions in the catalogue
    features: np.ndarray            # (m, dim) float32; zeros where not ok
    ok: np.ndarray                  # (m,) bool
    problems: list[dict] = field(default_factory=list)
    notes: list[dict] = field(default_factory=list)
    pixels: dict | None = None      # row -> (S,S,3) uint8, only when keep_pixels


@dataclass(frozen=True)
class Plan:
    """How the engine uses the machine for one run."""

    cores: int
    workers: int
    threads: int
    in_flight: int


def plan(cfg: EngineConfig, rows: int | None = None) -> Plan:
    """Decode processes, inference threads and blocks in flight for ``cfg`` on this machine.

    Decode workers and inference threads share the cores (ONNX Runtime threads do not spin,
    so decode fills their idle moments); on 2 cores this gives 1 worker + 2 inference threads,
    the best split measured (docs/engine.md). Tiny jobs decode in-process (no pool start-up).
    """
    cores = available_cpus()
    workers = cfg.workers if cfg.workers is not None else max(1, math.ceil(cores * DECODE_SHARE))
    if rows is not None and rows <= cfg.block_rows // 4:
        workers = 0
    threads = cfg.threads or cores
    in_flight = cfg.in_flight if cfg.in_flight is not None else 2 * max(1, workers) + 1
    return Plan(cores, workers, threads, max(1, in_flight))


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


# The last runner built, reused by later calls with the same backbone and settings (predict
# streams a catalogue part by part): an ONNX session costs ~0.3 s to open.
_RUNNER_CACHE: dict = {}


def engine_runner(backbone: Backbone, cfg: EngineConfig, threads: int | None = None,
                  fingerprint: str | None = None):
    """The inference runner ``cfg.runtime`` gives for ``backbone`` (cached for the last key)."""
    threads = threads or plan(cfg).threads
    fingerprint = fingerprint or backbone.fingerprint()
    key = (id(backbone.module), fingerprint, cfg.runtime, backbone.preprocess.size, threads, cfg.runtime_dir)
    hit = _RUNNER_CACHE.get(key)
    if hit is not None and hit[0]() is backbone.module:
        return hit[1]
    runner = make_runner(cfg.runtime, backbone.module, backbone.preprocess.size, threads=threads,
                         cache_dir=cfg.runtime_dir, fingerprint=fingerprint)
    _RUNNER_CACHE.clear()
    _RUNNER_CACHE[key] = (weakref.ref(backbone.module), runner)
    return runner


def _blocks(paths, block_rows: int) -> Iterator[list[tuple[int, str]]]:
    """(row, path) blocks made lazily: nothing per row is held beyond the blocks in flight."""
    for s in range(0, len(paths), block_rows):
        chunk = paths.iloc[s:s + block_rows].tolist()
        yield list(zip(range(s, s + len(chunk)), map(str, chunk)))


def stream_features(cat: Catalogue, backbone: Backbone, cache: EmbeddingCache | None = None,
                    cfg: EngineConfig | None = None, keep_pixels: bool = False) -> Iterator[Block]:
    """Yield :class:`Block` s of features for every row of ``cat``, in row order.

    Rows already in ``cache`` (same image bytes) are not decoded again; new features are
    added to it, so an interrupted run resumes where it stopped.
    """
    cfg = cfg or EngineConfig()
    paths = cat.frame["path"]
    pl = plan(cfg, len(paths))
    set_threads(pl.threads)
    known = frozenset(cache.keys()) if cache is not None and not keep_pixels else frozenset()
    job = DecodeJob(reader=cat.reader, pre=backbone.preprocess, known=known,
                    hash_content=cache is not None)
    pool = _Pool(job, pl.workers)  # forked before the runtime starts its threads
    bar = None
    try:
        runner = engine_runner(backbone, cfg, pl.threads)
        bar = _progress(len(paths), cfg.progress, f"embed {backbone.name} [{getattr(runner, 'name', cfg.runtime)}]")
        queue: deque = deque()
        pending = _blocks(paths, cfg.block_rows)
        for items in pending:
            queue.append(pool.submit(items))
            if len(queue) > pl.in_flight:
                break
        while queue:
            decoded = queue.popleft().get()
            nxt = next(pending, None)
            if nxt is not None:
                queue.append(pool.submit(nxt))
            block = _features_for(decoded, runner, cache, backbone.feature_dim, cfg.batch_size, keep_pixels)
            del decoded
            bar.update(len(block.rows))
            yield block
    finally:
        if bar is not None:
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
