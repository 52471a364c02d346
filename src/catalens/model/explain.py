"""Grad-CAM heatmaps: where in the photo the evidence for a label lies.

For a timm CNN backbone (anything whose ``forward_features`` gives a ``(n, C, h, w)`` map, the
EfficientNet-Lite family included) the map of the last stage is kept, the score of the chosen
class (its logit, before softmax) is back-propagated to it, each channel is weighted by its mean
gradient, and the positive part of the weighted sum, upsampled to the photo, is the heat
(Selvaraju et al. 2017). Plain torch autograd: no extra package. Vision transformers and
anything without a CNN feature map is refused with a clear error. Several backbones side by side, an
ensemble's members and TTA views each add their own pass's map, put back where that pass's input came
from in the model's input (:func:`evidence`).

Used by ``catalens predict MODEL SOURCE --explain DIR`` (one overlay PNG per photo), by the
evaluation report (the most confident mistakes) and by the server (``explain=true``:
:func:`explain_photo`, an overlay at the photo's own size, the heat mapped back through the
model's crop).
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from catalens.files import atomic_write_bytes

_logger = logging.getLogger(__name__)


class ExplainError(ValueError):
    """The model cannot be explained with Grad-CAM (no CNN feature map, or no such class task)."""


@dataclass
class _Pass:
    """One backbone pass of a model's features: its feature map and where its input lies in the model's input."""

    fmap: object            # (n, C, h, w) torch tensor
    region: tuple[float, float, float, float]   # (top, left, height, width) in model-input pixels
    flip: bool              # the pass's input is the mirror image of that region


def _frame(steps: list, height: int, width: int) -> tuple[tuple[float, float, float, float], bool]:
    """Where a pass's input lies in the model's ``height`` x ``width`` input after ``steps`` (in order:
    ``("member", MemberInput)`` a centre crop resized to the member's side, ``("view", name)`` a TTA view).
    Every crop is centred, so a mirror commutes with the crops after it and only its parity is kept."""
    from catalens.model.tta import zoom_box

    top, left, h, w = 0.0, 0.0, float(height), float(width)
    side_h, side_w, flip = height, width, False
    for kind, what in steps:
        if what == "hflip":
            flip = not flip
            continue
        if kind == "member":                         # the centre square MemberInput keeps
            o, c = what.crop(side_w)
            oy, ox, ch, cw = o, o, c, c
        else:                                        # the centre the zoom view keeps
            oy, ox, ch, cw = zoom_box(side_h, side_w)
        top, left = top + oy * h / side_h, left + ox * w / side_w
        h, w = h * ch / side_h, w * cw / side_w
        if kind == "member":
            side_h = side_w = what.size
    return (top, left, h, w), flip


def _features(module, x, steps: list, passes: list, size: tuple[int, int], name: str):
    """``module``'s features of ``x`` ``(n, 3, h, w)`` computed as its own forward computes them (several
    side by side: the members' features concatenated; TTA: the mean over the views), keeping each CNN pass's
    feature map and the frame of its input (:func:`_frame`) in ``passes``."""
    from catalens.embed.backbones import materialize
    from catalens.embed.multi import ConcatExtractor
    from catalens.model.tta import TTAExtractor, view

    import torch

    module = materialize(module)
    if isinstance(module, ConcatExtractor):          # (n, sum D_i)
        return torch.cat([_features(m, inp(x), steps + [("member", inp)], passes, size, name)
                          for inp, m in zip(module.inputs, module.members)], 1)
    if isinstance(module, TTAExtractor):             # (n, D): the mean over the identity + views
        feats = [_features(module.inner, x, steps, passes, size, name)]
        feats += [_features(module.inner, view(x, v), steps + [("view", v)], passes, size, name) for v in module.views]
        return sum(feats) / len(feats)
    net = getattr(module, "net", None)
    if not hasattr(module, "map_and_features") or not hasattr(net, "forward_features") \
            or not hasattr(net, "forward_head"):
        raise ExplainError(f"Grad-CAM needs timm CNN backbones; '{name}' has a part that is not one "
                           f"({type(net if net is not None else module).__name__})")
    fmap, feats = module.map_and_features((x - module.mean) * module.inv_std)      # (n,C,h,w), (n,D)
    if fmap.ndim != 4:
        raise ExplainError(f"Grad-CAM needs a CNN feature map; backbone '{name}' gives shape {tuple(fmap.shape)}")
    passes.append(_Pass(fmap, *_frame(steps, *size)))
    return feats


def _heads(model) -> list[tuple[float, tuple[int, ...], object]]:
    """``[(weight, feature blocks read, logits net)]``: one for a model (its one block of features), one per
    member for an ensemble (its blocks: the distinct backbones it reads, side by side)."""
    members = getattr(model, "members", None)
    if members is None:
        return [(1.0, (0,), model.head._check_fitted())]
    return [(float(w), tuple(p), m.head._check_fitted())
            for w, p, m in zip(model.weights, model.backbone.member_parts, members)]


def _paste(cam, p: _Pass, height: int, width: int):
    """A pass's Grad-CAM ``(n, h, w)`` as evidence per model-input pixel ``(n, height, width)``: upsampled to
    the region its input covers, divided by the pixels a map cell covers there (so each pass's sum is kept
    whatever its resolution and crop), mirrored back where its input was mirrored, zero outside the region."""
    import torch
    import torch.nn.functional as F

    top, left, h, w = p.region
    rh, rw = max(1, int(round(h))), max(1, int(round(w)))
    up = F.interpolate(cam[:, None], size=(rh, rw), mode="bilinear", align_corners=False)[:, 0]
    up = up * (cam.shape[1] * cam.shape[2] / float(rh * rw))
    if p.flip:
        up = up.flip(-1)
    out = torch.zeros((cam.shape[0], height, width), dtype=up.dtype)
    y0, x0 = int(round(top)), int(round(left))
    y1, x1 = min(height, y0 + rh), min(width, x0 + rw)
    out[:, y0:y1, x0:x1] = up[:, :y1 - y0, :x1 - x0]
    return out


def evidence(model, pixels: np.ndarray, task: str | None = None, classes: np.ndarray | None = None,
             positive: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(evidence, classes)``: per model-input pixel ``(n, S, S)`` float64, the Grad-CAM evidence for the
    class explained per row (``classes``, default the most probable) of class task ``task`` (default the
    first), summed over every backbone pass of the model: the members of several backbones side by side, an
    ensemble's members (each head's logit by its weight), TTA views (by their share of the features). Each
    pass's map is put back where its input came from in the model's input, per pixel (see :func:`_paste`).
    ``positive``: each pass's positive part, as Grad-CAM draws it; ``False``: signed (with average pooling
    and a linear head a pass's sum is then its share of the logit, less the bias)."""
    import torch

    tasks = [t for t in model.tasks if t.kind == "class"]
    if not tasks:
        raise ExplainError("Grad-CAM explains a class task; this model has none")
    task = task or tasks[0].name
    if task not in {t.name for t in tasks}:
        raise ExplainError(f"'{task}' is not a class task of the model; class tasks: {[t.name for t in tasks]}")
    from catalens.embed.backbones import materialize

    n, height, width = pixels.shape[:3]
    heads = _heads(model)
    backbone = materialize(model.backbone.module)
    ensemble = getattr(model, "members", None) is not None
    # an ensemble's heads read its distinct backbones, side by side in one ConcatExtractor
    tops = list(zip(backbone.inputs, backbone.members)) if ensemble else [(None, backbone)]
    roots = [backbone] + [h for _, _, h in heads]
    for root in roots:
        _normal_tensors(root)
    modes = [(m, m.training) for root in roots for m in root.modules()]
    for root in roots:
        root.eval()
    x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))).float()   # (n,3,S,S)
    try:
        with torch.enable_grad():
            passes: list[_Pass] = []
            blocks = [_features(m, x if inp is None else inp(x), [] if inp is None else [("member", inp)], passes,
                                (height, width), model.backbone.name) for inp, m in tops]          # [(n, D_j)]
            logits = [(w, net(torch.cat([blocks[i] for i in part], 1))[task]) for w, part, net in heads]   # (n,K)
            if classes is None:
                prob = sum(w * torch.softmax(z, 1) for w, z in logits)
                chosen = prob.argmax(1)
            else:
                chosen = torch.as_tensor(np.asarray(classes), dtype=torch.long)
            score = sum(w * z.gather(1, chosen[:, None]).sum() for w, z in logits)
            grads = torch.autograd.grad(score, [p.fmap for p in passes])
        out = torch.zeros((n, height, width), dtype=torch.float64)
        for p, g in zip(passes, grads):
            cam = (g.mean((2, 3), keepdim=True) * p.fmap).sum(1).detach().double()        # (n,h,w)
            out += _paste(torch.relu(cam) if positive else cam, p, height, width)
    finally:
        for m, mode in modes:
            m.training = mode
    return out.numpy(), chosen.numpy()


def grad_cam(model, pixels: np.ndarray, task: str | None = None, classes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(heat, classes)``: ``(n, S, S)`` heat in [0, 1] for ``pixels`` ``(n, S, S, 3)`` uint8 (the
    model's preprocessed input) and the class explained per row (``classes``, default the most
    probable) of class task ``task`` (default the first class task): :func:`evidence`, scaled to its peak
    per photo. Any model of timm CNN backbones: one, several side by side, an ensemble, with TTA."""
    ev, chosen = evidence(model, pixels, task, classes)
    peak = ev.max(axis=(1, 2), keepdims=True)
    heat = np.where(peak > 0, ev / np.maximum(peak, 1e-300), 0.0)
    return heat.astype(np.float32), chosen


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
