"""Batch-level regularisers of fine-tuning: mixup, CutMix and progressive resizing.

All three act on ``x``, the batch that enters the *trained* part of the network
(:mod:`catalens.train.finetune`): pixels ``(n, 3, H, W)`` with ``--finetune all``, and the
frozen part's activations ``(n, C, h, w)`` with ``--finetune blocks`` (with precomputed views
they are all there is: the pixels were pushed through the frozen stages once, before training).
Mixing activations at the cut is "manifold mixup" (Verma et al. 2019); CutMix on them pastes a
box of the activation map, which is a box of the photo seen through the frozen stages.

``timm.data.Mixup`` is not reused: it one-hot encodes a single integer target, while catalens
trains several class tasks and tag tasks at once, with missing labels (``-1`` / NaN). Here the
loss is mixed instead of the targets: ``lam * L(out, y) + (1 - lam) * L(out, y[perm])``. Cross
entropy (with label smoothing) and binary cross entropy are linear in the target, so for a row
labelled on both sides this *is* the loss of the mixed target ``lam * y + (1 - lam) * y[perm]``
(tags included: their 0/1 targets are mixed too; tested); a row whose partner has no label for a
task only gets the ``lam`` share of its own label's loss for that task.

Every draw is a function of ``(seed, epoch, step)``, so a resumed run mixes exactly as an
uninterrupted one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Mix:
    """One batch's mixing: ``x_mixed = lam * x + (1 - lam) * x[perm]`` (or a box of ``x[perm]``)."""

    kind: str            # "mixup" | "cutmix"
    lam: float           # share of the batch's own rows in the mixed input (box-corrected for cutmix)
    perm: torch.Tensor   # (n,) partner of every row
    box: tuple[int, int, int, int] | None = None  # cutmix: (y0, y1, x0, x1) pasted from the partner


def mix_rng(seed: int, epoch: int, step: int) -> np.random.Generator:
    """The generator of one batch's mixing draws (independent of workers and resumes)."""
    return np.random.default_rng([seed, 17, epoch, step])


def draw_mix(rng: np.random.Generator, n: int, h: int, w: int, mixup: float, cutmix: float) -> Mix | None:
    """This batch's mixing for alphas ``mixup`` / ``cutmix`` (0 = off); both on: one or the other, half
    of the batches each (timm's ``switch_prob`` 0.5). None when both are off or the batch has one row."""
    if n < 2 or (mixup <= 0 and cutmix <= 0):
        return None
    use_cut = cutmix > 0 and (mixup <= 0 or rng.uniform() < 0.5)
    lam = float(rng.beta(cutmix, cutmix) if use_cut else rng.beta(mixup, mixup))
    perm = torch.from_numpy(rng.permutation(n))
    if not use_cut:
        return Mix("mixup", lam, perm)
    # a box of area (1 - lam) of the map, centred anywhere, clipped to it; lam = what is left
    cut_h, cut_w = int(round(h * math.sqrt(1 - lam))), int(round(w * math.sqrt(1 - lam)))
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h - cut_h // 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w - cut_w // 2, w)
    return Mix("cutmix", 1.0 - (y1 - y0) * (x1 - x0) / (h * w), perm, (y0, y1, x0, x1))


def apply_mix(x: torch.Tensor, mix: Mix | None) -> torch.Tensor:
    """``x`` mixed with its partners (a new tensor; ``x`` is not modified): any shape for mixup,
    ``(n, C, H, W)`` for CutMix."""
    if mix is None:
        return x
    other = x[mix.perm.to(x.device)]
    if mix.kind == "mixup":
        return x * mix.lam + other * (1.0 - mix.lam)
    y0, y1, x0, x1 = mix.box
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = other[:, :, y0:y1, x0:x1]
    return out


def mixed_loss(loss_fn, logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
               mix: Mix | None) -> torch.Tensor:
    """``loss_fn(logits, targets)`` of a mixed batch: ``lam * L(y) + (1 - lam) * L(y[perm])``."""
    if mix is None:
        return loss_fn(logits, targets)
    partner = {k: v[mix.perm.to(v.device)] for k, v in targets.items()}
    return mix.lam * loss_fn(logits, targets) + (1.0 - mix.lam) * loss_fn(logits, partner)


# ------------------------------------------------------------------ progressive resizing
def progressive_scale(start: float, epoch: int, epochs: int) -> float:
    """Input scale of 0-based ``epoch``: ``start`` in the first epoch, growing linearly to 1 in the
    last (which trains at the size validation and prediction use); ``start`` 0 = off (always 1)."""
    if start <= 0 or start >= 1 or epochs <= 1:
        return 1.0
    return start + (1.0 - start) * min(epoch, epochs - 1) / (epochs - 1)


def scaled_side(side: int, scale: float) -> int:
    """``side`` times ``scale``, rounded, at least 1."""
    return max(1, int(round(side * scale)))


def resize_batch(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``(n, C, H, W)`` resized by ``scale`` (bilinear, antialiased when shrinking); 1 = unchanged."""
    if scale >= 1.0:
        return x
    h, w = x.shape[-2:]
    size = (scaled_side(h, scale), scaled_side(w, scale))
    if size == (h, w):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
