"""Pixels for fine-tuning: decode once into a memory-mapped store, then augment uint8 crops.

:class:`PixelStore` decodes every row of a catalogue once, at a slightly larger square than
the backbone's input (the backbone's ``resize``: short side to ``resize``, centre crop
``resize`` x ``resize``), into one ``uint8`` memmap file. Epochs then read pixels from RAM /
page cache instead of decoding JPEGs again, and worker processes (forked) share the file.

The *evaluation view* of a stored image (:func:`center_view`) is exactly the pixels
:func:`catalens.ingest.images.load_rgb` gives for the backbone's preprocessing (same decode,
same resize, centre crop of the centre crop), so a model fine-tuned here sees at predict time
what it saw on validation.

:func:`augment` is the product-photo augmentation: random resized crop (area 50-100 %,
aspect 3/4-4/3), horizontal flip, mild brightness / contrast / saturation jitter. It is a
pure function of ``(image, numpy Generator)``; callers seed the generator per
``(seed, epoch, row, view)`` so results never depend on worker scheduling.
"""
from __future__ import annotations

import logging
import json
import math
import multiprocessing as mp
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from catalens.ingest.images import Preprocess

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AugmentParams:
    """Augmentation of one view; ``size`` is the backbone's input side (its height when ``width`` is set)."""

    size: int = 224
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    width: int | None = None  # a non-square input's columns (None: square)

    @property
    def hw(self) -> tuple[int, int]:
        return self.size, self.width or self.size


def center_view(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Centre ``size`` x ``size`` (or ``(height, width)``) crop of a stored image (the evaluation view)."""
    h, w = (size, size) if isinstance(size, int) else size
    oy, ox = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
    return np.ascontiguousarray(img[oy:oy + h, ox:ox + w])


def random_resized_box(rng: np.random.Generator, side: int | tuple[int, int], scale: tuple[float, float],
                       ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """A crop box ``(x0, y0, x1, y1)`` of a square ``side`` image, or of a ``(height, width)`` one
    (torchvision's rule, 10 tries; ``ratio`` is the box's width / height relative to the image's)."""
    side_h, side_w = (side, side) if isinstance(side, int) else side
    area = side_h * side_w
    aspect = side_w / side_h  # a box of ratio 1 has the image's own shape
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        a = area * rng.uniform(scale[0], scale[1])
        r = math.exp(rng.uniform(*log_r)) * aspect
        w = int(round(math.sqrt(a * r)))
        h = int(round(math.sqrt(a / r)))
        if 0 < w <= side_w and 0 < h <= side_h:
            x0 = int(rng.integers(0, side_w - w + 1))
            y0 = int(rng.integers(0, side_h - h + 1))
            return x0, y0, x0 + w, y0 + h
    return 0, 0, side_w, side_h


def augment(img: np.ndarray, rng: np.random.Generator, p: AugmentParams) -> np.ndarray:
    """One augmented ``p.hw + (3,)`` uint8 view of a stored ``(S, S, 3)`` (or ``(SH, SW, 3)``) uint8 image."""
    side = img.shape[0] if img.shape[0] == img.shape[1] else img.shape[:2]
    box = random_resized_box(rng, side, p.scale, p.ratio)
    out = Image.fromarray(img).resize(p.hw[::-1], Image.Resampling.BILINEAR, box=box)
    a = np.asarray(out)
    if rng.uniform() < p.hflip:
        a = a[:, ::-1]
    jitter = p.brightness > 0 or p.contrast > 0 or p.saturation > 0
    if jitter:
        x = a.astype(np.float32)
        b = rng.uniform(1 - p.brightness, 1 + p.brightness)
        c = rng.uniform(1 - p.contrast, 1 + p.contrast)
        s = rng.uniform(1 - p.saturation, 1 + p.saturation)
        x *= b
        grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
        x = (x - grey.mean()) * c + grey.mean()
        grey = (x @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
        x = (x - grey) * s + grey
        a = np.clip(x + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def view_rng(seed: int, epoch: int, row: int, view: int) -> np.random.Generator:
    """The generator of one augmented view: independent of worker scheduling."""
    return np.random.default_rng([seed, 7, epoch, row, view])


# --------------------------------------------------------------------------- pixel store
@dataclass
class PixelStore:
    """Decoded ``(n, S, S, 3)`` (non-square input: ``(n, S, W, 3)``) uint8 images of a catalogue, in a memmap file."""

    path: Path
    n: int
    side: int
    ok: np.ndarray               # (n,) bool: decoded
    problems: list[dict]
    width: int | None = None     # columns of a non-square store (None: square)

    @property
    def pixels(self) -> np.ndarray:
        return np.memmap(self.path, dtype=np.uint8, mode="r", shape=(self.n, self.side, self.width or self.side, 3))


def _store_pre(pre: Preprocess) -> Preprocess:
    h, w = pre.resize_hw
    return Preprocess(size=h, resize=h, interpolation=pre.interpolation, mean=pre.mean, std=pre.std,
                      crop=pre.crop, box=pre.box, width=w)


def decode_store(cat, pre: Preprocess, folder: str | Path, workers: int = 1, max_pixels: int | None = None,
                 progress: bool = True, log=None) -> PixelStore:
    """Decode every row of ``cat`` once into ``folder/pixels.u8`` (reused when complete)."""
    log = log or _logger.info
    from catalens.embed.decode import DecodeJob, decode_block, decode_one, init_worker
    from catalens.ingest.images import DEFAULT_MAX_PIXELS

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    side, width = pre.resize_hw
    width = None if width == side else width
    n = len(cat)
    path, meta_path = folder / "pixels.u8", folder / "pixels.json"
    stamp = {"n": n, "side": side if width is None else [side, width], "pre": pre.to_dict(),
             "ids": [str(cat.frame["id"].iat[0]), str(cat.frame["id"].iat[-1])] if n else []}
    if meta_path.exists() and path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("stamp") == stamp:
            return PixelStore(path, n, side, np.asarray(meta["ok"], bool), meta["problems"], width)
    mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=(max(n, 1), side, width or side, 3))
    job = DecodeJob(reader=cat.reader, pre=_store_pre(pre), hash_content=False,
                    max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    paths = cat.frame["path"].tolist()
    chunks = [list(zip(range(s, min(s + 64, n)), paths[s:s + 64])) for s in range(0, n, 64)]
    ok = np.zeros(n, bool)
    problems: list[dict] = []
    bar = _bar(n, progress, "decode")
    pool = None
    try:
        if workers > 0 and n > 64:
            ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
            pool = ctx.Pool(workers, initializer=init_worker, initargs=(job,))
            results = pool.imap(decode_block, chunks)
        else:
            results = ([decode_one(r, p, job) for r, p in items] for items in chunks)
        for decoded in results:
            for d in decoded:
                if d.pixels is not None:
                    mm[d.row] = d.pixels
                    ok[d.row] = True
                else:
                    problems.append({"row": d.row, "problem": d.problem, "detail": d.detail})
            bar.update(len(decoded))
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    mm.flush()
    del mm
    meta_path.write_text(json.dumps({"stamp": stamp, "ok": ok.tolist(), "problems": problems}))
    return PixelStore(path, n, side, ok, problems, width)


# ------------------------------------------------------------------ batches from workers
_W: dict = {}


def _init_aug(path: str, n: int, side: int | tuple[int, int], params: dict, seed: int) -> None:
    h, w = (side, side) if isinstance(side, int) else side
    _W["pixels"] = np.memmap(path, dtype=np.uint8, mode="r", shape=(n, h, w, 3))
    p = dict(params)
    p["scale"], p["ratio"] = tuple(p["scale"]), tuple(p["ratio"])
    _W["params"] = AugmentParams(**p)
    _W["seed"] = seed


def _make_batch(task: tuple[int, list[tuple[int, int]]]) -> np.ndarray:
    """``(epoch, [(row, view), ...])`` → ``(b, size, size, 3)`` uint8; view ``-1`` = evaluation view."""
    epoch, items = task
    px, p, seed = _W["pixels"], _W["params"], _W["seed"]
    out = np.empty((len(items), *p.hw, 3), np.uint8)
    for i, (row, view) in enumerate(items):
        img = np.asarray(px[row])
        out[i] = center_view(img, p.hw) if view < 0 else augment(img, view_rng(seed, epoch, row, view), p)
    return out


class BatchMaker:
    """Augmented batches made by worker processes (or in-process with ``workers=0``), in order."""

    def __init__(self, store: PixelStore, params: AugmentParams, seed: int, workers: int = 1) -> None:
        side = store.side if store.width is None else (store.side, store.width)
        self.args = (str(store.path), store.n, side, asdict(params), seed)
        self.size = params.size
        self.input_size = params.size if params.width is None else (params.size, params.width)  # runners take it
        self.pool = None
        if workers > 0:
            ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
            self.pool = ctx.Pool(workers, initializer=_init_aug, initargs=self.args)
        else:
            _init_aug(*self.args)

    def batches(self, epoch: int, items: list[tuple[int, int]], batch_size: int):
        """Yield uint8 batches of ``items`` = ``[(row, view), ...]`` (view -1: evaluation view)."""
        tasks = [(epoch, items[s:s + batch_size]) for s in range(0, len(items), batch_size)]
        if self.pool is None:
            for t in tasks:
                yield _make_batch(t)
        else:
            yield from self.pool.imap(_make_batch, tasks)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


def default_workers() -> int:
    from catalens.runtime import available_cpus

    return max(1, min(4, available_cpus() - 1)) if os.environ.get("CATALENS_AUG_WORKERS") is None \
        else int(os.environ["CATALENS_AUG_WORKERS"])


def _bar(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr,
                mininterval=2.0, dynamic_ncols=True)
