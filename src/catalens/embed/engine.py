"""The streaming engine behind ``embed``, ``predict`` and evaluation.

Worker processes read, hash, decode and resize images while the main process runs the
backbone; a bounded window of blocks in flight keeps memory constant whatever the
catalogue size. Features come back block by block, in row order, so callers can stream
them to heads and parquet files.
"""
from __future__ import annotations

import logging
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
from catalens.embed.runtimes import Runner, cuda_available, make_runner, planned_precision, runtime_precision
from catalens.ingest.catalogue import Catalogue
from catalens.ingest.images import DEFAULT_MAX_PIXELS, jpeg_decoder
from catalens.runtime import available_cpus, set_threads, streaming_malloc


logger = logging.getLogger(__name__)

#: up to this many cores ``decode="auto"`` decodes in threads of this process, alternating with
#: inference: each phase then has every core and nothing contends (on 2 cores: ~90 img/s
#: against ~70 for a decode process overlapping inference, EfficientNet-Lite0, docs/engine.md).
#: Beyond it, decode processes overlap inference (the GIL caps threaded decoding at a few cores).
PHASED_MAX_CORES = 4

#: share of the CPU that decoding needs next to inference (measured ~0.15 for EfficientNet-Lite0
#: on 400-900 px JPEGs; the margin covers larger photos and lighter backbones)
DECODE_SHARE = 0.25


@dataclass
class EngineConfig:
    """Knobs of the engine; ``None`` means "sized from the cores available" (see :func:`plan`)."""

    batch_size: int = 32            # images per inference call (memory grows with it, speed does not past ~32)
    workers: int | None = None      # decode threads / processes; None: sized by :func:`plan`
    decode: str = "auto"            # threads | processes | auto (threads up to PHASED_MAX_CORES cores)
    block_rows: int = 128           # rows per worker task
    in_flight: int | None = None    # blocks submitted ahead of the one being consumed; None: 2 per worker + 1
    runtime: str = "auto"           # see catalens.embed.runtimes
    threads: int | None = None      # inference threads (torch and ONNX Runtime); None: available cores
    progress: bool = True
    runtime_dir: str | None = None  # ONNX exports and auto choices; None: ~/.cache/catalens/onnx
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb limit (config data.max_pixels)
    jpeg: str = "auto"              # JPEG decoder: auto (CATALENS_JPEG_DECODER, else simplejpeg when installed) | simplejpeg | pillow
    gpu_decode: bool = True         # with a CUDA runtime: decode plain JPEGs on the GPU (catalens.embed.gpu_decode)


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
    workers: int       # decode threads (decode "threads") or processes; 0 = in the main thread
    threads: int
    in_flight: int
    decode: str = "processes"


def plan(cfg: EngineConfig, rows: int | None = None) -> Plan:
    """Decode mode and workers, inference threads and blocks in flight for ``cfg`` here.

    ``threads`` mode (default up to ``PHASED_MAX_CORES`` cores): each block is decoded by a
    thread pool of ``cores`` threads (Pillow and hashing release the GIL), then inferred with
    every core, so the two never compete. ``processes`` mode: decode workers
    (``ceil(cores * DECODE_SHARE)``) run ahead of inference in other processes (ONNX Runtime
    threads do not spin, so decode fills their idle moments). Tiny jobs decode in the main
    thread (no pool start-up).
    """
    cores = available_cpus()
    if cfg.decode not in ("auto", "threads", "processes"):
        raise ValueError(f"engine decode must be auto, threads or processes, got {cfg.decode!r}")
    gpu = on_gpu(cfg.runtime)
    decode = cfg.decode if cfg.decode != "auto" else \
        ("threads" if cores <= PHASED_MAX_CORES and not gpu else "processes")
    # on a GPU the cores only decode: all but one (which feeds the GPU)
    default = cores if decode == "threads" else \
        max(1, cores - 1 if gpu else math.ceil(cores * DECODE_SHARE))
    workers = cfg.workers if cfg.workers is not None else default
    if rows is not None and rows <= cfg.block_rows // 4:
        workers = 0
    threads = cfg.threads or cores
    if decode == "threads":
        in_flight = 0      # decoded on demand, right before inference
    else:
        in_flight = max(1, cfg.in_flight if cfg.in_flight is not None else 2 * max(1, workers) + 1)
    return Plan(cores, workers, threads, in_flight, decode)


def engine_jpeg(cfg: EngineConfig, pre=None) -> str:
    """The JPEG decoder the engine uses: ``cfg.jpeg`` when set; else the one the preprocessing
    ``pre`` records (a model folder's: what its training features were decoded with); else this
    machine's (:func:`catalens.ingest.images.jpeg_decoder`: ``CATALENS_JPEG_DECODER``, else
    simplejpeg when installed), so training, prediction and serving decode a photo to the same pixels.

    The engine does not pick a decoder per plan: simplejpeg costs less CPU per photo but holds
    the GIL while it decodes (two decode threads: 468 against 788 img/s for Pillow on 2 cores),
    and a plan-dependent choice would make features depend on the machine's core count."""
    if cfg.jpeg == "auto" and pre is not None:
        return pre.decoder()
    return jpeg_decoder(cfg.jpeg)


def on_gpu(runtime: str) -> bool:
    """True when ``runtime`` infers on a CUDA GPU (``cuda*``, or ``auto`` where one is present)."""
    if runtime.startswith("cuda"):
        return True
    return runtime == "auto" and cuda_available()


class _Pool:
    """Decoding for the engine: a process pool (decode ``processes``), a thread pool used on
    demand (decode ``threads``), or the main thread (``workers == 0``)."""

    def __init__(self, job: DecodeJob, workers: int, mode: str = "processes") -> None:
        self.job = job
        self.pool = self.threads = None
        if workers > 0 and mode == "threads":
            from concurrent.futures import ThreadPoolExecutor

            self.threads = ThreadPoolExecutor(workers, thread_name_prefix="catalens-decode")
        elif workers > 0:
            ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
            self.pool = ctx.Pool(workers, initializer=init_worker, initargs=(job,))

    def submit(self, items):
        if self.threads is not None:
            return _Lazy(self._decode_threaded, items)
        if self.pool is None:
            return _Done([decode_one(r, p, self.job) for r, p in items])
        return self.pool.apply_async(decode_block, (items,))

    def _decode_threaded(self, items) -> list[Decoded]:
        return list(self.threads.map(lambda rp: decode_one(rp[0], rp[1], self.job), items))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
        if self.threads is not None:
            self.threads.shutdown(wait=True)


class _Lazy:
    """A block decoded when it is asked for (decode threads alternate with inference)."""

    def __init__(self, fn, items):
        self.fn, self.items = fn, items

    def get(self):
        return self.fn(self.items)


class _Done:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


#: runtimes that infer outside torch's allocator: the engine sets streaming malloc thresholds
OUTSIDE_TORCH = ("onnx", "openvino", "openvino-int8")

# The last runner built, reused by later calls with the same backbone and settings (predict
# streams a catalogue part by part): an ONNX session costs ~0.3 s to open.
_RUNNER_CACHE: dict = {}


def _hflip(batch):
    """The mirror image of pixels ``(b, H, W, 3)`` (NumPy, or a torch tensor decoded on the GPU)."""
    return torch.flip(batch, dims=[2]) if isinstance(batch, torch.Tensor) else np.ascontiguousarray(batch[:, :, ::-1])


#: TTA views that are exact on the decoded uint8 pixels ``(b, H, W, 3)`` (:mod:`catalens.model.tta` defines the
#: views; the mirror of the pixels is the mirror of the float tensor its module flips). A TTA backbone of only
#: these runs its plain network through the runtime once per view and averages, to the same features bit for
#: bit: Lite2@300 with ``hflip`` on clothing-small, end to end, 40.0 img/s against 23.4 for the graph with the
#: view inside it (plain: 74.1; ``benchmarks/bench_tta.py``, AMD EPYC, 2 cores).
PIXEL_VIEWS = {"hflip": _hflip}


def per_view(views) -> bool:
    """Whether a TTA backbone of ``views`` runs its plain network once per view (all are :data:`PIXEL_VIEWS`)."""
    return all(v in PIXEL_VIEWS for v in views)


def _views_runner(inner: Runner, views: tuple[str, ...]) -> Runner:
    """``inner`` (the plain network's runner) averaged over the identity and the pixel ``views``."""
    def run(batch):                                            # (b, H, W, 3) uint8 -> (b, dim) float32
        feats = inner(batch)
        for v in views:
            feats = feats + inner(PIXEL_VIEWS[v](batch))
        return feats / (1 + len(views))
    return Runner(inner.name, run, {**inner.info, "views": list(views)})


def _per_view(backbone: Backbone) -> tuple[tuple[str, ...], Backbone | None]:
    """``(views, plain)`` when the engine runs ``backbone``'s plain network once per TTA view, else ``((), None)``."""
    views, plain = tuple(getattr(backbone, "views", ()) or ()), getattr(backbone, "plain", None)
    return (views, plain) if views and plain is not None and per_view(views) else ((), None)


def runner_net(backbone: Backbone) -> Backbone:
    """The backbone whose network :func:`engine_runner`'s runtime runs for ``backbone``: the plain one of a TTA
    backbone of pixel views (run once per view), else ``backbone`` itself. Its fingerprint and input size name
    the runtime's files (ONNX export, ``auto`` choice, ``openvino-int8`` calibration)."""
    _, plain = _per_view(backbone)
    return plain or backbone


def cache_precision(backbone: Backbone, cfg: EngineConfig, threads: int) -> str:
    """The precision of the features :func:`engine_runner` will compute for ``backbone`` (fp32, bf16, int8),
    known before it is built (:func:`catalens.embed.runtimes.planned_precision`)."""
    net = runner_net(backbone)
    return planned_precision(cfg.runtime, net.fingerprint(), net.preprocess.input_size, threads, cfg.runtime_dir)


def engine_runner(backbone: Backbone, cfg: EngineConfig, threads: int | None = None,
                  fingerprint: str | None = None):
    """The inference runner ``cfg.runtime`` gives for ``backbone`` (cached for the last key). A TTA backbone
    whose views are all :data:`PIXEL_VIEWS` runs its plain network once per view (its runtime's own graph)."""
    threads = threads or plan(cfg).threads
    fingerprint = fingerprint or backbone.fingerprint()
    key = (id(backbone.module), fingerprint, cfg.runtime, backbone.preprocess.input_size, threads, cfg.runtime_dir)
    hit = _RUNNER_CACHE.get(key)
    if hit is not None and hit[0]() is backbone.module:
        return hit[1]
    views, plain = _per_view(backbone)
    if views:
        runner = _views_runner(make_runner(cfg.runtime, plain.module, plain.preprocess.input_size, threads=threads,
                                           cache_dir=cfg.runtime_dir, fingerprint=plain.fingerprint()), views)
    else:
        runner = make_runner(cfg.runtime, backbone.module, backbone.preprocess.input_size, threads=threads,
                             cache_dir=cfg.runtime_dir, fingerprint=fingerprint)
    if getattr(runner, "name", "") in OUTSIDE_TORCH:   # keep RSS flat (catalens.runtime)
        streaming_malloc()
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
    jpeg = engine_jpeg(cfg, backbone.preprocess)
    if cache is not None and getattr(cache, "decoder", jpeg) != jpeg:
        raise ValueError(f"the embedding cache at {cache.dir} holds features of JPEGs decoded by {cache.decoder}, "
                         f"but the engine decodes with {jpeg}: open the cache with jpeg={jpeg!r} or run the "
                         f"engine with jpeg={cache.decoder!r}")
    paths = cat.frame["path"]
    pl = plan(cfg, len(paths))
    set_threads(pl.threads)
    if cache is not None:   # a lossy runtime's features are kept apart from the fp32 ones (catalens.embed.cache)
        cache = cache.with_precision(cache_precision(backbone, cfg, pl.threads))
    known = frozenset(cache.keys()) if cache is not None and not keep_pixels else frozenset()
    device = _device_decode(cfg, backbone.preprocess, jpeg)
    job = DecodeJob(reader=cat.reader, pre=backbone.preprocess, known=known,
                    hash_content=cache is not None, max_pixels=cfg.max_pixels, jpeg=jpeg,
                    device_jpeg=device is not None)
    pool = _Pool(job, pl.workers, pl.decode)  # processes fork before the runtime starts its threads
    bar, store = None, cache   # store: where new features go (a first 'auto' may choose a lossy runtime)
    try:
        runner = engine_runner(backbone, cfg, pl.threads)
        if cache is not None and runtime_precision(getattr(runner, "name", None)) != cache.precision:
            store = cache.with_precision(runtime_precision(runner.name))
            logger.info("runtime auto chose %s (%s features): new features go to %s; rows already in %s are "
                        "read from it", runner.name, store.precision, store.dir, cache.dir)
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
            block = _features_for(decoded, runner, cache, backbone.feature_dim, cfg.batch_size, keep_pixels, device,
                                  store=store)
            del decoded
            bar.update(len(block.rows))
            yield block
    finally:
        if bar is not None:
            bar.close()
        pool.close()
        if cache is not None:
            cache.flush()
        if store is not cache:   # a first 'auto' that chose a lossy runtime wrote to its own folder
            store.flush()


class _DeviceDecode:
    """JPEG bytes -> pixels on the GPU for the engine (:func:`catalens.embed.gpu_decode.decode_batch`).

    The device decoder is loaded and checked on first use, after the decode processes forked (no
    CUDA context is created before the fork); when it cannot decode on the GPU, a warning says why
    and every photo takes the CPU path (``load_rgb`` with the run's JPEG decoder)."""

    def __init__(self, pre, decoder, device, max_pixels: int, jpeg: str) -> None:
        self.pre, self.decoder, self.device, self.max_pixels, self.jpeg = pre, decoder, device, max_pixels, jpeg

    def _decoder(self):
        if self.decoder is None:
            from catalens.embed.gpu_decode import device_decoder

            try:
                self.decoder = device_decoder(self.device)
            except RuntimeError as e:
                logger.warning(f"decoding JPEGs on the CPU: {e}")
                self.decoder = _refuse
        return self.decoder

    def pixels(self, decoded: list[Decoded]) -> dict:
        """Decode the rows left as bytes; row index -> (S, S, 3) uint8 on the device; problems and
        notes (the CPU path's, for photos the device refused) are set on the rows."""
        from catalens.embed.gpu_decode import decode_batch

        raw = [i for i, d in enumerate(decoded) if d.data is not None]
        if not raw:
            return {}
        out = decode_batch([decoded[i].data for i in raw], self.pre, self.device, self.max_pixels,
                           self._decoder(), self.jpeg)
        px = {}
        for j, i in enumerate(raw):
            d = decoded[i]
            d.data = None
            if out.ok[j]:
                px[i] = out.pixels[j]
            else:
                d.problem, d.detail = out.problems[j]
            d.notes = out.notes.get(j, d.notes)
        return px


def _device_decode(cfg: EngineConfig, pre, jpeg: str):
    """The GPU decode for this run, or None: only with ``cfg.gpu_decode``, a CUDA runtime and a
    GPU torch sees (the CPU path never imports :mod:`catalens.embed.gpu_decode`)."""
    if not (cfg.gpu_decode and on_gpu(cfg.runtime) and cuda_available()):
        return None
    return _DeviceDecode(pre, None, torch.device("cuda"), cfg.max_pixels, jpeg)


def _refuse(datas, device):
    """A device decoder that decodes nothing: every photo goes to the CPU path."""
    raise RuntimeError("no device decoder")


def _features_for(decoded: list[Decoded], runner, cache: EmbeddingCache | None, dim: int,
                  batch_size: int, keep_pixels: bool, device: _DeviceDecode | None = None,
                  store: EmbeddingCache | None = None) -> Block:
    """Run the backbone on decoded rows, fill cached rows from ``cache`` and add the new ones to ``store``
    (default ``cache``); with ``device``, rows left as JPEG bytes are decoded on the GPU first and their
    batches stay there."""
    store = store if store is not None else cache
    m = len(decoded)
    rows = np.array([d.row for d in decoded], dtype=np.int64)
    feats = np.zeros((m, dim), dtype=np.float32)
    ok = np.zeros(m, dtype=bool)
    on_device = device.pixels(decoded) if device is not None else {}
    todo = [i for i, d in enumerate(decoded) if d.pixels is not None or i in on_device]
    for s in range(0, len(todo), batch_size):
        idx = todo[s:s + batch_size]
        if on_device:   # (b, S, S, 3) uint8 on the GPU; the runner takes it as is
            batch = torch.stack([on_device[i] if i in on_device else
                                 torch.tensor(decoded[i].pixels, device=device.device) for i in idx])
        else:
            batch = np.stack([decoded[i].pixels for i in idx])          # (b, S, S, 3) uint8
        out = runner(batch)                                           # (b, dim) float32
        feats[idx] = out
        ok[idx] = True
        if store is not None:
            store.add([decoded[i].key for i in idx], out)
    hits = [i for i, d in enumerate(decoded) if d.cached]
    if hits:
        feats[hits] = cache.get([decoded[i].key for i in hits])
        ok[hits] = True
    problems = [{"row": d.row, "problem": d.problem, "detail": d.detail} for d in decoded if d.problem]
    notes = [{"row": d.row, "note": n} for d in decoded for n in d.notes]
    pixels = None
    if keep_pixels:
        pixels = {d.row: d.pixels for d in decoded if d.pixels is not None}
        pixels.update({decoded[i].row: t.cpu().numpy() for i, t in on_device.items()})
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
