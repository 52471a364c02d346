"""Decoding photos into RGB uint8 arrays, with every problem named.

One decode serves both validation and embedding: :func:`load_rgb` either returns the
preprocessed pixels and the conversions it applied, or raises :class:`ImageProblem` with a
short code (``missing``, ``empty``, ``not_an_image``, ``truncated``, ``undecodable``,
``decompression_bomb``) and a message that says what is wrong and how to fix it.

JPEGs in RGB/YCbCr or grayscale are decoded by libjpeg-turbo through ``simplejpeg`` when it is
installed (``pip install catalens[fast]``), scaled in the DCT by the largest factor M/8 that
keeps both sides at least the resize target (Pillow's ``draft`` only offers 1/2, 1/4, 1/8, so a
400 px photo bound for 256 px is fully decoded there; here it is decoded at 6/8). Pillow still
opens every file first (a header read: format, size, the bomb checks, EXIF orientation), decodes
every other format and CMYK JPEGs, and decodes again any JPEG libjpeg-turbo rejects, so the
problem codes and notes are exactly those of the Pillow path. ``CATALENS_JPEG_DECODER=pillow``
(or ``jpeg="pillow"``) turns the libjpeg-turbo path off.
"""
from __future__ import annotations

import io
import logging
import os
import re
import warnings
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageOps

from catalens.config import check_box  # noqa: F401  (the crop-box rule lives with the config that takes it)

try:  # libjpeg-turbo with DCT scaling (catalens[fast])
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the install
    simplejpeg = None

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own warning limit (~ 9459 x 9459)

PROBLEM_FIXES = {
    "missing": "check the path (relative paths are resolved against the dataset file) or remove the row",
    "empty": "the file has 0 bytes: re-download or re-export it",
    "not_an_image": "the file is not a picture Pillow can read (JPEG, PNG, WebP, ...): replace or remove it",
    "truncated": "the file ends early (interrupted download?): re-download it",
    "undecodable": "the image data is corrupt: re-export it from the original",
    "decompression_bomb": "the image has more pixels than the limit: downscale it or raise the limit "
                          "(data.max_pixels; catalens serve --max-pixels)",
    # found by a source rather than by decoding (listed in problems.csv all the same)
    "corrupt_document": "re-export the dump (mongodump); the document was skipped",
    "empty_folder": "add its photos, or remove the folder",
}


class ImageProblem(Exception):
    """An image that cannot be used; ``code`` is one of :data:`PROBLEM_FIXES`."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}; fix: {PROBLEM_FIXES[code]}")
        self.code = code
        self.detail = detail


#: how the square input is cut from a photo (``Preprocess.crop``)
CROP_MODES = ("center", "pad", "squish", "box")
PAD_FILL = (255, 255, 255)  # "pad": product photos are mostly shot on white


@dataclass(frozen=True)
class Preprocess:
    """How pixels are prepared for a backbone: stored in every model folder.

    ``crop`` says how the photo becomes a ``resize`` x ``resize`` square, from which the centre
    ``size`` x ``size`` is cut (``size == resize``: the whole square):

    - ``center`` (default): short side to ``resize``, centre crop (the long side's ends are lost);
    - ``pad``: long side to ``resize``, padded with white to a square (nothing is lost);
    - ``squish``: both sides to ``resize`` (the aspect ratio changes, nothing is lost);
    - ``box``: first cut ``box = (x0, y0, x1, y1)`` (fractions of width and height), then ``center``.

    Then ``(x / 255 - mean) / std`` per channel. ``to_dict`` writes ``crop``/``box`` only when not
    ``center``, so model folders written before crop modes existed load and keep their cache keys.

    ``jpeg`` is the JPEG decoder whose pixels the features were made from (``pillow`` or
    ``simplejpeg``), recorded in model.json so that prediction, evaluation and serving decode as
    training did; ``None``: not recorded, this machine's decoder (:func:`jpeg_decoder`). It is
    not part of the backbone's fingerprint (the embedding cache keeps each decoder's features in
    its own folder instead).

    **Non-square inputs.** ``width`` (None: square) makes the input ``size`` rows by ``width``
    columns (height x width, as torch's ``(n, 3, H, W)``); the resized canvas is then ``resize``
    x ``resize_width`` (the same crop share on both axes), and each crop mode fills that canvas
    instead of a square: ``center`` scales the photo to cover it, ``pad`` to fit in it, ``squish``
    to fill it exactly. ``width`` is written only when it differs from ``size``.
    """

    size: int = 224
    resize: int = 256
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    crop: str = "center"
    box: tuple[float, float, float, float] | None = None
    jpeg: str | None = None
    width: int | None = None  # input columns; None = size (square)

    def __post_init__(self) -> None:
        if self.jpeg not in (None,) + JPEG_DECODERS:
            raise ValueError(f"preprocess jpeg {self.jpeg!r} is not one of {', '.join(JPEG_DECODERS)}")
        if self.width == self.size:  # one spelling of a square: keys and model.json stay as before
            object.__setattr__(self, "width", None)
        if self.crop not in CROP_MODES:
            raise ValueError(f"preprocess crop {self.crop!r} is not one of {', '.join(CROP_MODES)}")
        if self.crop == "box":
            check_box(self.box)
        elif self.box is not None:
            raise ValueError(f"preprocess box {list(self.box)} is only used with crop 'box' (crop is {self.crop!r})")

    @property
    def hw(self) -> tuple[int, int]:
        """The input's ``(height, width)`` in pixels."""
        return self.size, self.width or self.size

    @property
    def input_size(self) -> int | tuple[int, int]:
        """What runners and exports take: the side of a square input, else ``(height, width)``."""
        return self.size if self.width is None else (self.size, self.width)

    @property
    def resize_hw(self) -> tuple[int, int]:
        """The resized canvas ``(height, width)`` the input is centre-cropped from."""
        if self.width is None:
            return self.resize, self.resize
        return self.resize, max(self.width, int(round(self.width * self.resize / self.size)))

    @property
    def shape_name(self) -> str:
        """``"224"`` for a square input, ``"256x192"`` (height x width) otherwise."""
        h, w = self.hw
        return str(h) if h == w else f"{h}x{w}"

    def to_dict(self, decoder: bool = True) -> dict:
        """The description stored in model.json; ``decoder=False`` leaves out ``jpeg`` (fingerprints)."""
        d = {"size": self.size, "resize": self.resize, "interpolation": self.interpolation,
             "mean": list(self.mean), "std": list(self.std)}
        if self.width is not None:
            d["width"] = self.width
        if self.crop != "center":
            d["crop"] = self.crop
        if self.box is not None:
            d["box"] = list(self.box)
        if decoder and self.jpeg is not None:
            d["jpeg"] = self.jpeg
        return d

    def decoder(self, source: str | None = None) -> str:
        """The JPEG decoder to use for this preprocessing here: the recorded one (:attr:`jpeg`),
        else this machine's (:func:`jpeg_decoder`). A recorded ``simplejpeg`` where simplejpeg is
        not installed falls back to Pillow with one logged warning naming ``source``."""
        if self.jpeg is None:
            return jpeg_decoder("auto")
        if self.jpeg == "simplejpeg" and simplejpeg is None:
            _warn_missing_simplejpeg(source)
            return "pillow"
        return self.jpeg

    def pinned(self) -> "Preprocess":
        """This preprocessing with :attr:`jpeg` set to the decoder used here (what model.json records)."""
        return self if self.jpeg is not None else replace(self, jpeg=self.decoder())

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        box = d.get("box")
        return cls(size=int(d["size"]), resize=int(d["resize"]), interpolation=d["interpolation"],
                   mean=tuple(d["mean"]), std=tuple(d["std"]), crop=d.get("crop", "center"),
                   box=tuple(float(x) for x in box) if box is not None else None,
                   width=int(d["width"]) if d.get("width") is not None else None, jpeg=d.get("jpeg"))


#: JPEG decoders a preprocessing may record
JPEG_DECODERS = ("pillow", "simplejpeg")
#: the decoder of model folders written before model.json recorded one (Pillow was the only
#: decoder until simplejpeg support came in, 2026-11-30)
LEGACY_JPEG = "pillow"
_WARNED: set = set()


def _warn_missing_simplejpeg(source: str | None) -> None:
    if _WARNED:
        return
    _WARNED.add(source)
    logger.warning(f"{source or 'this model'} was trained on JPEGs decoded by simplejpeg (libjpeg-turbo), which "
                   f"is not installed here: decoding with Pillow instead, so features differ slightly from "
                   f"training (~99% top-1 agreement measured). Fix: pip install simplejpeg")


_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


def _allow_pillow(max_pixels: int) -> None:
    """Let Pillow open images up to ``max_pixels``: its own bomb check (``Image.MAX_IMAGE_PIXELS``,
    an error at twice that) would otherwise refuse what the configured limit allows. The limit is
    only ever raised, and :func:`open_image` applies the configured one itself."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _bomb(e: Exception, max_pixels: int) -> ImageProblem:
    """Pillow's bomb error restated against the configured limit (Pillow quotes its own)."""
    m = re.search(r"\((\d+) pixels\)", str(e))
    size = f"{int(m.group(1)):,} pixels" if m else "more pixels"
    return ImageProblem("decompression_bomb", f"{size} > limit {max_pixels:,}")


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open (not yet decode) an image, refusing empties, non-images and bombs over ``max_pixels``."""
    if not data:
        raise ImageProblem("empty", "0 bytes")
    _allow_pillow(max_pixels)
    try:
        with warnings.catch_warnings():
            # Pillow's warning threshold is its own; the configured limit is checked below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise _bomb(e, max_pixels) from None
    except Exception as e:  # Pillow raises UnidentifiedImageError, SyntaxError, ValueError...
        head = data[:8].hex()
        raise ImageProblem("not_an_image", f"cannot identify image ({type(e).__name__}; first bytes {head})") from None
    w, h = im.size
    if w * h > max_pixels:
        raise ImageProblem("decompression_bomb", f"{w}x{h} = {w * h:,} pixels > limit {max_pixels:,}")
    return im


def _to_rgb(im: Image.Image, notes: list[str]) -> Image.Image:
    """Any mode to RGB: 16-bit scaled, alpha composited on white, CMYK/palette converted."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        notes.append(f"converted {mode} ({'16-bit' if hi > 255 else '32-bit'}) to 8-bit RGB")
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        notes.append(f"composited {mode} alpha on white")
        return Image.alpha_composite(bg, rgba).convert("RGB")
    notes.append(f"converted {mode} to RGB")
    return im.convert("RGB")


#: ``Image.info`` key holding the (upright) full-resolution size of a DCT-scaled decode
SOURCE_SIZE = "catalens_source_size"

#: EXIF orientation -> the transpose that shows the picture upright (as ImageOps.exif_transpose)
_ORIENT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


def jpeg_decoder(jpeg: str = "auto") -> str:
    """The JPEG decoder ``jpeg`` resolves to here: ``simplejpeg`` or ``pillow``.

    ``auto`` takes ``CATALENS_JPEG_DECODER`` when set, else simplejpeg when installed."""
    if jpeg == "auto":
        jpeg = os.environ.get("CATALENS_JPEG_DECODER", "auto").strip().lower() or "auto"
    if jpeg not in ("auto", "simplejpeg", "pillow"):
        raise ValueError(f"JPEG decoder must be auto, simplejpeg or pillow, got {jpeg!r} "
                         f"(check CATALENS_JPEG_DECODER)")
    if jpeg == "pillow" or simplejpeg is None:
        return "pillow"
    return "simplejpeg"


def _orientation(im: Image.Image) -> int | None:
    return im.getexif().get(0x0112, 1) if hasattr(im, "getexif") else 1


def _turbo_decode(data: bytes, im: Image.Image, min_side: int | None, notes: list[str]) -> Image.Image | None:
    """RGB/grayscale JPEG through libjpeg-turbo, DCT-scaled to keep both sides >= ``min_side``;
    None when libjpeg-turbo refuses the data (Pillow then decodes it and names the problem)."""
    try:
        a = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_side or 0, min_width=min_side or 0)
    except Exception:  # ValueError on corrupt/truncated data (strict): Pillow decides what it is
        return None
    out = Image.fromarray(a, "RGB")
    w, h = im.size
    orientation = _orientation(im)
    if orientation in _ORIENT:
        out = out.transpose(_ORIENT[orientation])
        notes.append(f"applied EXIF orientation {orientation}")
        if orientation >= 5:
            w, h = h, w
    # resize_crop sizes the output from the full-resolution geometry, not from the DCT-scaled
    # one (rounding at 6/8 would shift the centre crop by a pixel against the Pillow path)
    out.info[SOURCE_SIZE] = (w, h)
    if im.mode != "RGB":
        notes.append(f"converted {im.mode} to RGB")
    return out


def decode(data: bytes, draft_to: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
           notes: list[str] | None = None, jpeg: str = "auto") -> Image.Image:
    """Decode bytes to an RGB image with EXIF orientation applied.

    ``draft_to`` lets the JPEG decoder scale in the DCT while keeping both sides at least that
    many pixels (Pillow: by 1/2, 1/4 or 1/8, about 3x faster for 800-1000 px photos to 256;
    libjpeg-turbo through simplejpeg: by any M/8). ``jpeg`` picks the JPEG decoder
    (:func:`jpeg_decoder`).
    """
    notes = notes if notes is not None else []
    im = open_image(data, max_pixels)
    if im.format == "JPEG" and im.mode in ("RGB", "L") and jpeg_decoder(jpeg) == "simplejpeg":
        out = _turbo_decode(data, im, draft_to, notes)
        if out is not None:
            return out
    if draft_to and im.format == "JPEG":
        im.draft("RGB", (draft_to, draft_to))
    try:
        im.load()
    except OSError as e:
        msg = str(e)
        code = "truncated" if "truncated" in msg or "broken data stream" in msg else "undecodable"
        raise ImageProblem(code, msg) from None
    except Exception as e:
        raise ImageProblem("undecodable", f"{type(e).__name__}: {e}") from None
    orientation = _orientation(im)
    if orientation not in (1, None):
        im = ImageOps.exif_transpose(im)
        notes.append(f"applied EXIF orientation {orientation}")
    return _to_rgb(im, notes)


def resize_crop(im: Image.Image, pre: Preprocess) -> np.ndarray:
    """``pre.crop`` to the ``resize`` canvas, then its centre crop: ``(height, width, 3)`` uint8
    (``pre.hw``; a square ``(size, size, 3)`` unless ``pre.width`` is set).

    Sizes are computed from the full-resolution geometry (``SOURCE_SIZE`` of a DCT-scaled decode),
    so both JPEG decoders give the same crop."""
    resample = _RESAMPLE[pre.interpolation]
    w, h = im.info.get(SOURCE_SIZE, im.size)
    out_h, out_w = pre.hw
    canvas_h, canvas_w = pre.resize_hw
    if pre.crop == "box":
        x0, y0, x1, y1 = pre.box
        sw, sh = im.size  # the box in the decoded pixels; its full-resolution size for what follows
        im = im.crop((round(x0 * sw), round(y0 * sh), max(round(x0 * sw) + 1, round(x1 * sw)),
                      max(round(y0 * sh) + 1, round(y1 * sh))))
        w, h = max(1, round((x1 - x0) * w)), max(1, round((y1 - y0) * h))
    if pre.crop == "squish":
        im = im.resize((canvas_w, canvas_h), resample, reducing_gap=None)
    elif pre.crop == "pad":
        scale = min(canvas_w / w, canvas_h / h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = Image.new("RGB", (canvas_w, canvas_h), PAD_FILL)
        canvas.paste(im.resize((nw, nh), resample, reducing_gap=None), ((canvas_w - nw) // 2, (canvas_h - nh) // 2))
        im = canvas
    else:
        scale = max(canvas_w / w, canvas_h / h)  # a square canvas: the short side to resize
        im = im.resize((max(out_w, round(w * scale)), max(out_h, round(h * scale))), resample,
                       reducing_gap=None)
    if pre.width is not None:  # non-square: the canvas first, so that the centre crop of the canvas (the
        nw, nh = im.size        # fine-tuning store, catalens.train.augment) is exactly this crop
        left, top = (nw - canvas_w) // 2, (nh - canvas_h) // 2
        im = im.crop((left, top, left + canvas_w, top + canvas_h))
    nw, nh = im.size
    left, top = (nw - out_w) // 2, (nh - out_h) // 2
    im = im.crop((left, top, left + out_w, top + out_h))
    return np.asarray(im, dtype=np.uint8)


def _draft_side(pre: Preprocess) -> int:
    """The side JPEG draft decoding must keep: more when only a box of the photo is used."""
    side = max(pre.resize_hw)
    if pre.crop == "box":
        x0, y0, x1, y1 = pre.box
        return int(np.ceil(side / max(1e-3, min(x1 - x0, y1 - y0))))
    return side


def load_rgb(data: bytes, pre: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS,
             notes: list[str] | None = None, jpeg: str = "auto") -> np.ndarray:
    """Bytes → preprocessed ``(height, width, 3)`` uint8 pixels (raises :class:`ImageProblem`);
    ``jpeg``: the JPEG decoder (:func:`jpeg_decoder`); ``auto``: the one ``pre`` records, else
    this machine's (:meth:`Preprocess.decoder`)."""
    if jpeg == "auto":
        jpeg = pre.decoder()
    im = decode(data, draft_to=_draft_side(pre), max_pixels=max_pixels, notes=notes, jpeg=jpeg)
    return resize_crop(im, pre)


def normalise(batch: np.ndarray, pre: Preprocess) -> np.ndarray:
    """``(n, H, W, 3)`` uint8 → ``(n, 3, H, W)`` float32 normalised."""
    x = batch.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    mean = np.asarray(pre.mean, dtype=np.float32)[None, :, None, None]
    std = np.asarray(pre.std, dtype=np.float32)[None, :, None, None]
    return (x - mean) / std
