"""JPEG decode, resize and crop on a torch device (nvJPEG on a CUDA GPU), for the GPU engine path.

On a GPU machine the engine is decode-bound (docs/engine.md, *On a GPU*): 15 host cores decode
~2,200-3,200 photos/s while the GPU infers ~8,000-10,000. :func:`decode_batch` moves the decode
and the resize/crop onto the device: ``torchvision.io.decode_jpeg(list_of_bytes, device=...)``
(nvJPEG's batched decode when ``device`` is CUDA), then torch ops that follow
:func:`catalens.ingest.images.resize_crop` step by step (the same ``crop`` mode, ``resize`` and
``size``, sizes computed from the full-resolution geometry, antialiased resampling like
Pillow's, uint8 rounding). Normalisation stays inside the backbone module, as for every path.

Only plain photos go to the device. The CPU path (:func:`catalens.ingest.images.load_rgb`)
decodes everything else, so problem codes, details and notes are exactly the engine's:

- what Pillow's header read refuses (``empty``, ``not_an_image``, ``decompression_bomb``);
- other formats (PNG, WebP, ...), JPEGs that are not RGB/grayscale (CMYK), JPEGs with an
  EXIF orientation other than 1, JPEGs that do not end with the EOI marker (truncated: the
  CPU path names them ``truncated``), and resampling Pillow has but torch lacks (lanczos);
- any photo the device decoder refuses (the batch is retried one by one to find it).

This module is imported only by the engine's CUDA path (``torch.cuda.is_available()`` and a
CUDA runtime); the CPU path never imports it (tests/test_gpu_decode.py checks both).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from catalens.embed.decode import routable
from catalens.ingest.images import DEFAULT_MAX_PIXELS, PAD_FILL, ImageProblem, Preprocess, load_rgb


@dataclass
class DeviceBatch:
    """Outcome of :func:`decode_batch` for ``n`` inputs, in input order.

    ``pixels``: ``(n, S, S, 3)`` uint8 on the device (zeros where a row failed); ``ok``: rows with
    pixels; ``on_device``: rows decoded on the device (the others by the CPU path); ``problems``:
    row -> ``(code, detail)``; ``notes``: row -> the CPU path's notes."""

    pixels: torch.Tensor
    ok: np.ndarray
    on_device: np.ndarray
    problems: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)


def torchvision_decoder():
    """``torchvision.io.decode_jpeg`` (list of uint8 byte tensors, device -> list of (3, H, W)
    uint8), importing torchvision through the ``nms`` schema shim (:mod:`catalens.runtime`).
    Raises RuntimeError when torchvision's image extension does not load (e.g. a CUDA build of
    torchvision next to a CPU torch)."""
    from catalens.runtime import import_torchvision

    tv = import_torchvision()
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(datas: list[torch.Tensor], device) -> list[torch.Tensor]:
        out = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    decode.version = tv.__version__
    return decode


def device_decoder(device="cuda"):
    """:func:`torchvision_decoder`, checked on one tiny JPEG on ``device``; RuntimeError naming
    the cause when it cannot decode there (the engine then decodes on the CPU)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "JPEG")
    try:
        decode = torchvision_decoder()
        img = decode([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)], device)[0]
    except Exception as e:
        raise RuntimeError(f"torchvision cannot decode JPEGs on {device} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]}); install the torchvision build that matches "
                           f"torch") from None
    if tuple(img.shape) != (3, 16, 16):
        raise RuntimeError(f"torchvision decoded a 16x16 JPEG on {device} to shape {tuple(img.shape)}")
    return decode


def pillow_decoder():
    """A stand-in for :func:`torchvision_decoder` with the same interface: Pillow (libjpeg-turbo)
    at full resolution, no DCT scaling, copied to ``device``. For checking everything around the
    device decode on a machine where torchvision's image extension does not load (tests here:
    a CUDA build of torchvision next to a CPU torch)."""
    import io

    from PIL import Image

    def decode(datas: list[torch.Tensor], device) -> list[torch.Tensor]:
        out = []
        for t in datas:
            with Image.open(io.BytesIO(t.numpy().tobytes())) as im:
                a = np.asarray(im.convert("RGB"))
            out.append(torch.from_numpy(a.copy()).permute(2, 0, 1).to(device))
        return out

    decode.version = "pillow"
    return decode


def _resize(x: torch.Tensor, w: int, h: int, mode: str) -> torch.Tensor:
    """``(3, H, W)`` float -> ``(3, h, w)`` float, antialiased like Pillow's resize."""
    if x.shape[-2:] == (h, w):
        return x
    aa = mode != "nearest"
    return F.interpolate(x[None], size=(h, w), mode=mode, antialias=aa,
                         align_corners=False if aa else None)[0]


def resize_crop_tensor(img: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """:func:`catalens.ingest.images.resize_crop` in torch: ``(3, H, W)`` uint8 (full resolution)
    -> ``(size, size, 3)`` uint8 on the same device."""
    x = img.float()
    h, w = x.shape[-2:]
    if pre.crop == "box":
        x0, y0, x1, y1 = pre.box
        left, top = round(x0 * w), round(y0 * h)
        x = x[:, top:max(top + 1, round(y1 * h)), left:max(left + 1, round(x1 * w))]
        w, h = max(1, round((x1 - x0) * w)), max(1, round((y1 - y0) * h))
    if pre.crop == "squish":
        x = _resize(x, pre.resize, pre.resize, pre.interpolation)
    elif pre.crop == "pad":
        scale = pre.resize / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = torch.tensor(PAD_FILL, dtype=x.dtype, device=x.device).view(3, 1, 1).expand(
            3, pre.resize, pre.resize).clone()
        left, top = (pre.resize - nw) // 2, (pre.resize - nh) // 2
        canvas[:, top:top + nh, left:left + nw] = _resize(x, nw, nh, pre.interpolation).round().clamp(0, 255)
        x = canvas
    else:
        scale = pre.resize / min(w, h)
        x = _resize(x, max(pre.size, round(w * scale)), max(pre.size, round(h * scale)), pre.interpolation)
    nh, nw = x.shape[-2:]
    left, top = (nw - pre.size) // 2, (nh - pre.size) // 2
    x = x[:, top:top + pre.size, left:left + pre.size]
    return x.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()


def decode_batch(datas: list[bytes], pre: Preprocess, device="cuda", max_pixels: int = DEFAULT_MAX_PIXELS,
                 decoder=None, jpeg: str = "auto") -> DeviceBatch:
    """Decode, resize and crop ``datas`` to ``(n, height, width, 3)`` uint8 pixels on ``device``.

    Plain JPEGs are decoded together on ``device`` by ``decoder`` (default
    :func:`torchvision_decoder`: nvJPEG on a CUDA device); the rest by the CPU path
    (:func:`catalens.ingest.images.load_rgb` with the ``jpeg`` decoder), whose pixels are copied
    to ``device`` and whose problems and notes are reported as the engine reports them.
    """
    decoder = decoder or torchvision_decoder()
    n, (h, w) = len(datas), pre.hw
    out = torch.zeros((n, h, w, 3), dtype=torch.uint8, device=device)
    ok, dev_rows = np.zeros(n, bool), np.zeros(n, bool)
    problems, notes = {}, {}
    square = pre.width is None  # the device resize/crop is written for square inputs; others: the CPU path
    gpu = [i for i, d in enumerate(datas) if square and d and routable(d, pre, max_pixels) is not None]
    decoded = _decode_device(decoder, [datas[i] for i in gpu], device)
    for i, img in zip(gpu, decoded):
        if img is not None:
            out[i] = resize_crop_tensor(img, pre)
            ok[i] = dev_rows[i] = True
    for i in np.flatnonzero(~dev_rows):
        row_notes: list[str] = []
        try:
            px = load_rgb(datas[i], pre, max_pixels, row_notes, jpeg=jpeg)
        except ImageProblem as p:
            problems[int(i)] = (p.code, p.detail)
            continue
        out[i] = torch.tensor(px, device=device)
        ok[i] = True
        if row_notes:
            notes[int(i)] = tuple(row_notes)
    return DeviceBatch(out, ok, dev_rows, problems, notes)


def _decode_device(decoder, datas: list[bytes], device) -> list:
    """Batched device decode; when the batch fails, one by one (None for a refused photo)."""
    if not datas:
        return []
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        return decoder(tensors, device)
    except Exception:  # one bad photo fails the batch: find it, the CPU path names its problem
        out = []
        for t in tensors:
            try:
                out.append(decoder([t], device)[0])
            except Exception:
                out.append(None)
        return out
