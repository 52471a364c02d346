"""Test-time augmentation: average the backbone's features over a few views of each image.

Views (of the preprocessed ``(n, 3, S, S)`` pixels the engine already decoded):

- ``hflip``: the mirror image;
- ``zoom``: the centre ``7/8`` of the crop, resized back to ``S`` (a slightly closer look).

The identity view is always included. Averaging *features* before a linear head is the same
as averaging its logits, and it needs nothing from the callers: :func:`with_tta` wraps a
:class:`~catalens.embed.backbones.Backbone` so that its module computes the averaged
features, and everything that runs ``model.backbone`` (predict, evaluate, serve, export)
gets TTA. A model folder asks for it with ``"tta": ["hflip"]`` in ``model.json``
(``catalens train --tta hflip``), honoured by :meth:`CatalensModel.load`.

The wrapped backbone has its own cache fingerprint (``...+tta:hflip``), so features with and
without TTA never mix in the embedding cache. Each view costs one more backbone pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from catalens.embed.backbones import Backbone

VIEWS = ("hflip", "zoom")
ZOOM = 7 / 8


def check_views(views) -> list[str]:
    """Validated list of view names (error naming the valid ones)."""
    views = list(views or [])
    bad = [v for v in views if v not in VIEWS]
    if bad:
        raise ValueError(f"unknown TTA view(s) {bad}; valid views: {', '.join(VIEWS)}")
    return list(dict.fromkeys(views))


def zoom_box(h: int, w: int) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of the centre the ``zoom`` view keeps of an ``h`` x ``w`` input."""
    ch, cw = int(round(h * ZOOM)), int(round(w * ZOOM))
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def view(x: torch.Tensor, name: str) -> torch.Tensor:
    """One view of pixels ``(n, 3, H, W)`` (square or not)."""
    if name == "hflip":
        return x.flip(-1)
    if name == "zoom":
        h, w = int(x.shape[-2]), int(x.shape[-1])   # plain ints when traced for ONNX too (a runner's size is fixed)
        oy, ox, ch, cw = zoom_box(h, w)
        crop = x[..., oy:oy + ch, ox:ox + cw]
        return F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False, antialias=False)
    raise ValueError(f"unknown TTA view '{name}'; valid views: {', '.join(VIEWS)}")


class TTAExtractor(nn.Module):
    """A feature extractor whose output is the mean over the identity + ``views``."""

    def __init__(self, inner: nn.Module, views: list[str]) -> None:
        super().__init__()
        self.inner = inner
        self.views = check_views(views)
        self.feature_dim = int(inner.feature_dim)

    @property
    def net(self) -> nn.Module:
        """The wrapped extractor's network (what a model folder stores)."""
        return self.inner.net

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n,3,S,S) 0..255 -> (n,D)
        feats = self.inner(x)
        for name in self.views:
            feats = feats + self.inner(view(x, name))
        return feats / (1 + len(self.views))


@dataclass
class TTABackbone(Backbone):
    """A backbone computing TTA features over ``plain``: same weights and description, own cache key."""

    views: tuple[str, ...] = ()
    plain: Backbone | None = None

    def fingerprint(self) -> str:
        return f"{self.plain.fingerprint()}+tta:{'-'.join(self.views)}"

    def describe(self) -> dict:
        return {**self.plain.describe(), "tta": list(self.views)}


def with_tta(backbone: Backbone, views) -> Backbone:
    """``backbone`` averaging over ``views`` (the plain backbone when ``views`` is empty)."""
    views = check_views(views)
    plain = without_tta(backbone)
    if not views:
        return plain
    module = TTAExtractor(plain.module, views).eval()
    return TTABackbone(plain.name, plain.arch, module, plain.preprocess, plain.weights_origin, tuple(views), plain)


def without_tta(backbone: Backbone) -> Backbone:
    """The plain backbone under a TTA one (the same weights)."""
    return backbone.plain if isinstance(backbone, TTABackbone) else backbone


def apply_model_tta(model, views=None):
    """``model`` with its backbone wrapped for ``views`` (default: ``model.meta['tta']``)."""
    views = check_views(model.meta.get("tta") if views is None else views)
    model.backbone = with_tta(model.backbone, views)
    return model
