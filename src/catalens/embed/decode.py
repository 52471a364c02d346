"""Worker-side work of the engine: read bytes, hash, decode and resize (no torch here).

Runs in worker processes; everything here is picklable and module-level.

Measured on clothing-small (400-900 px JPEGs, most 400 px on the short side) with one core:
decode + bicubic resize to 256 + centre crop 224 runs at ~170 img/s with Pillow, of which ~70%
is the resize (Pillow's ``draft`` DCT scaling cannot help when the short side is under 2x the
target; libjpeg-turbo through simplejpeg scales by M/8 and does: docs/engine.md). Shipping a decoded block back through the pool's pipe (pickle) costs ~0.2 ms per
image, about 1% of the decode and inference cost, so pixels travel by pipe, not shared memory.
"""
from __future__ import annotations

import signal
from dataclasses import dataclass

import numpy as np

from catalens.embed.cache import content_hash
from catalens.ingest.images import DEFAULT_MAX_PIXELS, ImageProblem, Preprocess, _orientation, load_rgb, open_image


#: resampling filters the GPU path reproduces with torch (antialiased, as Pillow's resize)
DEVICE_MODES = ("bicubic", "bilinear", "nearest")
_EOI = b"\xff\xd9"


def routable(data: bytes, pre: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int] | None:
    """The full-resolution ``(w, h)`` when the GPU decoder may take ``data``
    (:mod:`catalens.embed.gpu_decode`); None when the CPU path must: what Pillow's header read
    refuses, other formats, CMYK JPEGs, an EXIF orientation other than 1, no EOI marker at the
    end (truncated), or a resampling filter torch lacks (lanczos)."""
    if pre.interpolation not in DEVICE_MODES or not data.rstrip(b"\x00\r\n ").endswith(_EOI):
        return None
    try:
        im = open_image(data, max_pixels)
    except ImageProblem:
        return None
    if im.format != "JPEG" or im.mode not in ("RGB", "L") or _orientation(im) not in (1, None):
        return None
    return im.size


@dataclass
class DecodeJob:
    """What every worker needs, shipped once per worker at pool start."""

    reader: object                  # callable path -> bytes (Catalogue.reader)
    pre: Preprocess
    known: frozenset = frozenset()  # content hashes already in the cache: skip decoding
    max_pixels: int = DEFAULT_MAX_PIXELS
    hash_content: bool = True
    jpeg: str = "auto"              # JPEG decoder: auto (simplejpeg when installed) | simplejpeg | pillow
    device_jpeg: bool = False       # plain JPEGs come back as bytes, decoded on the GPU (catalens.embed.gpu_decode)


@dataclass
class Decoded:
    """One row's outcome: pixels, a cache hit, or a problem."""

    row: int
    key: str | None
    pixels: np.ndarray | None = None   # (size, size, 3) uint8 when decoded
    cached: bool = False
    problem: str | None = None         # ImageProblem code
    detail: str | None = None
    notes: tuple[str, ...] = ()
    data: bytes | None = None          # a plain JPEG left to the GPU decoder (DecodeJob.device_jpeg)


_JOB: DecodeJob | None = None


def init_worker(job: DecodeJob) -> None:
    """Pool initializer: keep the job in the worker process; Ctrl-C is the main process's to handle."""
    global _JOB
    _JOB = job
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _read(job: DecodeJob, path: str) -> bytes:
    try:
        return job.reader(path)
    except FileNotFoundError:
        raise ImageProblem("missing", f"no file at '{path}'") from None
    except IsADirectoryError:
        raise ImageProblem("not_an_image", f"'{path}' is a directory") from None
    except PermissionError as e:
        raise ImageProblem("missing", f"cannot read '{path}': {e}") from None


def decode_one(row: int, path: str, job: DecodeJob | None = None) -> Decoded:
    """Read, hash and (unless cached) decode one image."""
    job = job or _JOB
    key = None
    try:
        data = _read(job, path)
        if not data:
            raise ImageProblem("empty", "0 bytes")
        key = content_hash(data) if job.hash_content else None
        if key is not None and key in job.known:
            return Decoded(row, key, cached=True)
        if job.device_jpeg and routable(data, job.pre, job.max_pixels) is not None:
            return Decoded(row, key, data=data)
        notes: list[str] = []
        pixels = load_rgb(data, job.pre, job.max_pixels, notes, jpeg=job.jpeg)
        return Decoded(row, key, pixels=pixels, notes=tuple(notes))
    except ImageProblem as p:
        return Decoded(row, key, problem=p.code, detail=p.detail)


def decode_block(items: list[tuple[int, str]]) -> list[Decoded]:
    """A block of (row, path) pairs decoded in one worker call."""
    return [decode_one(r, p) for r, p in items]


def decode_rate(paths: list[str], job: DecodeJob, repeat: int = 1) -> float:
    """Images per CPU-second of :func:`decode_one` in this process (read, hash, decode, resize)."""
    import time

    t = time.process_time()
    for _ in range(repeat):
        for i, p in enumerate(paths):
            decode_one(i, p, job)
    return repeat * len(paths) / max(time.process_time() - t, 1e-9)
