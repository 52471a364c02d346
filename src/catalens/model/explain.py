"""Grad-CAM heatmaps: where in the photo the evidence for a label lies.

For a timm CNN backbone (anything whose ``forward_features`` gives a ``(n, C, h, w)`` map, the
EfficientNet-Lite family included) the map of the last stage is kept, the score of the chosen
class (its logit, before softmax) is back-propagated to it, each channel is weighted by its mean
gradient, and the positive part of the weighted sum, upsampled to the photo, is the heat
(Selvaraju et al. 2017). Plain torch autograd: no extra package. Vision transformers and
side-by-side multi-backbones are refused with a clear error.

Used by ``catalens predict MODEL SOURCE --explain DIR`` (one overlay PNG per photo) and by the
evaluation report (the most confident mistakes).
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np

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
            fmap = net.forward_features((x - fe.mean) * fe.inv_std)
            if fmap.ndim != 4:
                raise ExplainError(f"Grad-CAM needs a CNN feature map; backbone '{model.backbone.name}' gives "
                                   f"shape {tuple(fmap.shape)}")
            logits = head(net.forward_head(fmap, pre_logits=True))[task]
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
            _atomic_bytes(path, png_bytes(overlay(rgb, h)))
            written.append(path)
    return written


def _atomic_bytes(path: Path, data: bytes) -> None:
    import os

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _safe(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "photo"
