"""Grad-CAM heatmaps: where in the photo the evidence for a label lies.

For a timm CNN backbone (anything whose ``forward_features`` gives a ``(n, C, h, w)`` map, the
EfficientNet-Lite family included) the map of the last stage is kept, the score of the chosen
class (its logit, before softmax) is back-propagated to it, each channel is weighted by its mean
gradient, and the positive part of the weighted sum, upsampled to the photo, is the heat
(Selvaraju et al. 2017). Plain torch autograd: no extra package. Vision transformers and
side-by-side multi-backbones are refused with a clear error.

Used by ``catalens predict MODEL SOURCE --explain DIR`` (one overlay PNG per photo), by the
evaluation report (the most confident mistakes) and by the server (``explain=true``:
:func:`explain_photo`, an overlay at the photo's own size, the heat mapped back through the
model's crop).
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np

from catalens.files import atomic_write_bytes

_logger = logging.getLogger(__name__)


class ExplainError(ValueError):
    """The model cannot be explained with Grad-CAM (not a single CNN backbone)."""


def _net(model):
    fe = getattr(model.backbone, "module", None)
    net = getattr(fe, "net", None)
    if net is None or not hasattr(net, "forward_features") or not hasattr(net, "forward_head"):
        raise ExplainError(f"Grad-CAM needs a single timm CNN backbone; '{model.backbone.name}' is not one "
                           f"(multi-backbones and ensembles cannot be explained)")
    return fe, net


def grad_cam(model, pixels: np.ndarray, task: str | None = None, classes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(heat, classes)``: ``(n, S, S)`` heat in [0, 1] for ``pixels`` ``(n, S, S, 3)`` uint8 (the
    model's preprocessed input) and the class explained per row (``classes``, default the most
    probable) of class task ``task`` (default the first class task)."""
    import torch

    fe, net = _net(model)
    tasks = [t for t in model.tasks if t.kind == "class"]
    if not tasks:
        raise ExplainError("Grad-CAM explains a class task; this model has none")
    task = task or tasks[0].name
    if task not in {t.name for t in tasks}:
        raise ExplainError(f"'{task}' is not a class task of the model; class tasks: {[t.name for t in tasks]}")
    head = model.head._check_fitted()
    for module in (fe, head):
        _normal_tensors(module)
    x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))).float()
    was_training = net.training
    net.eval()
    try:
        with torch.enable_grad():
            fmap, feats = fe.map_and_features((x - fe.mean) * fe.inv_std)  # (n,C,h,w), (n,D)
            if fmap.ndim != 4:
                raise ExplainError(f"Grad-CAM needs a CNN feature map; backbone '{model.backbone.name}' gives "
                                   f"shape {tuple(fmap.shape)}")
            logits = head(feats)[task]
            chosen = logits.argmax(1) if classes is None else torch.as_tensor(np.asarray(classes), dtype=torch.long)
            score = logits.gather(1, chosen[:, None]).sum()
            grads = torch.autograd.grad(score, fmap)[0]
        cam = torch.relu((grads.mean((2, 3), keepdim=True) * fmap).sum(1, keepdim=True)).detach()
    finally:
        net.train(was_training)
    cam = torch.nn.functional.interpolate(cam, size=pixels.shape[1:3], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.amax((1, 2), keepdim=True)
    heat = torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam))
    return heat.numpy().astype(np.float32), chosen.numpy()


def _normal_tensors(module) -> None:
    """Replace parameters and buffers made under ``torch.inference_mode`` (e.g. by the engine's
    runtime set-up) by normal copies: autograd cannot save inference tensors. Values unchanged."""
    import torch

    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_inference():
                m._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_inference():
                m._buffers[name] = b.clone()


def overlay(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """``rgb`` ``(S, S, 3)`` uint8 with ``heat`` drawn over it (jet colour map), uint8."""
    from matplotlib import colormaps

    colour = colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255.0
    weight = alpha * np.clip(heat, 0.15, 1.0)[..., None]
    return (rgb * (1 - weight) + colour * weight).clip(0, 255).astype(np.uint8)


def png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def crop_square(width: int, height: int, pre) -> tuple[float, float, float]:
    """``(x0, y0, side)``: the square of the photo (its own pixels, EXIF-rotated; it may reach
    outside the photo with ``pad``) that the model's ``size`` x ``size`` input shows (see
    :func:`catalens.ingest.images.resize_crop`). For ``squish`` the side is the width's and the
    height is scaled separately: use :func:`heat_on_photo`."""
    bx, by, bw, bh = 0.0, 0.0, float(width), float(height)
    if pre.crop == "box":
        x0, y0, x1, y1 = pre.box
        bx, by, bw, bh = x0 * width, y0 * height, (x1 - x0) * width, (y1 - y0) * height
    ref = max(bw, bh) if pre.crop == "pad" else min(bw, bh)
    side = ref * pre.size / pre.resize
    return bx + (bw - side) / 2, by + (bh - side) / 2, side


def heat_on_photo(heat: np.ndarray, width: int, height: int, pre) -> np.ndarray:
    """``(height, width)`` heat: the model-input heat ``(S, S)`` put back where that input came
    from in the photo (0 outside the crop)."""
    from PIL import Image

    if pre.crop == "squish":
        fx, fy = width * pre.size / pre.resize, height * pre.size / pre.resize
        x0, y0, w, h = (width - fx) / 2, (height - fy) / 2, fx, fy
    else:
        x0, y0, side = crop_square(width, height, pre)
        w = h = side
    w_px, h_px = max(1, round(w)), max(1, round(h))
    big = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize((w_px, h_px), Image.BILINEAR))
    out = np.zeros((height, width), np.float32)
    left, top = round(x0), round(y0)
    sx0, sy0 = max(0, -left), max(0, -top)                       # part of ``big`` inside the photo
    dx0, dy0 = max(0, left), max(0, top)
    cw, ch = min(w_px - sx0, width - dx0), min(h_px - sy0, height - dy0)
    if cw > 0 and ch > 0:
        out[dy0:dy0 + ch, dx0:dx0 + cw] = big[sy0:sy0 + ch, sx0:sx0 + cw]
    return np.clip(out, 0.0, 1.0)


def explain_photo(model, data: bytes, task: str | None = None, label: int | None = None,
                  max_pixels: int | None = None) -> tuple[bytes, int]:
    """``(png, class)``: the Grad-CAM overlay of one encoded photo at the photo's own size (EXIF
    orientation applied), for class ``label`` of ``task`` (default: the most probable class of the
    first class task); raises :class:`~catalens.ingest.images.ImageProblem` for a bad photo and
    :class:`ExplainError` for a model Grad-CAM cannot explain."""
    from catalens.ingest.images import DEFAULT_MAX_PIXELS, decode, resize_crop

    im = decode(data, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)     # full size (no draft), RGB, EXIF
    pixels = resize_crop(im, model.preprocess)
    heat, chosen = grad_cam(model, pixels[None], task, None if label is None else [int(label)])
    rgb = np.asarray(im, dtype=np.uint8)
    return png_bytes(overlay(rgb, heat_on_photo(heat[0], rgb.shape[1], rgb.shape[0], model.preprocess))), \
        int(chosen[0])


def explain_catalogue(model, cat, out_dir: str | Path, task: str | None = None, batch: int = 16) -> list[Path]:
    """One ``<name>.png`` overlay per readable photo of ``cat`` in ``out_dir`` (the decided class of
    ``task``, default the first class task; ``name``: the photo's id, or its file name without
    extension when the id is a path; ``_<row>`` added when two photos share a name); unreadable
    photos are skipped with a warning."""
    from catalens.ingest.images import ImageProblem, load_rgb

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    ids = cat.frame["id"].astype(str).tolist()
    names = [_safe(Path(i).stem if ("/" in i or "\\" in i) else i) for i in ids]
    seen: dict[str, int] = {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
    names = [n if seen[n] == 1 else f"{n}_{r}" for r, n in enumerate(names)]
    for start in range(0, len(cat), batch):
        rows, pix = [], []
        for r in range(start, min(start + batch, len(cat))):
            try:
                pix.append(load_rgb(cat.read_bytes(r), model.preprocess))
                rows.append(r)
            except (ImageProblem, OSError) as e:
                _logger.warning(f"--explain: {ids[r]}: {e}; no heatmap")
        if not rows:
            continue
        arr = np.stack(pix)
        heat, _ = grad_cam(model, arr, task)
        for r, rgb, h in zip(rows, arr, heat):
            path = out_dir / f"{names[r]}.png"
            atomic_write_bytes(path, png_bytes(overlay(rgb, h)))
            written.append(path)
    return written


def _safe(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "photo"
