"""Several backbones as one: their features side by side (``--backbone a+b+c``).

``create_backbone("efficientnet_lite0+efficientnet_lite1@272")`` builds a
:class:`MultiBackbone`: the engine decodes each photo once, at a preprocessing wide and
sharp enough for every member (:func:`shared_preprocess`); each member gets its own crop
and side from those pixels (:class:`MemberInput`) and the features are concatenated. One
head is then trained on the concatenation. On clothing-small this beats every single
member by 1-3 points of 5-fold accuracy (docs/recipes.md, benchmarks/bench_accuracy_clothing.py):
the members were trained differently and make different mistakes.

It is a backbone like any other: cached embeddings, model folders (``model.json`` lists the
members; their weights sit in one ``backbone.safetensors`` under ``0.``, ``1.``, ...),
ONNX export, serving and TTA all work. Fine-tuning takes one backbone.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from catalens.embed.backbones import Backbone, materialize
from catalens.ingest.images import Preprocess


class MemberInput(nn.Module):
    """Shared crop → a member's input: centre crop to its share ``keep``, resize to its side."""

    def __init__(self, keep: float, size: int) -> None:
        super().__init__()
        self.keep, self.size = float(keep), int(size)

    def crop(self, s: int) -> tuple[int, int]:
        """``(offset, side)`` of the centre square this member keeps of a shared input of side ``s``."""
        c = int(round(s * self.keep)) if self.keep < 0.999 else s
        return (s - c) // 2, c

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n,3,S,S) -> (n,3,size,size)
        # plain ints: while torch.onnx traces, a shape is a tensor, and round() of it failed, so an ensemble or
        # side-by-side model whose members crop differently (Lite0 at crop 0.875 beside crop-1 members) had no
        # ONNX / OpenVINO graph and 'auto' fell back to eager (3.7 against ~10 img/s, AMD Zen 3); S is fixed
        s = int(x.shape[-1])
        o, c = self.crop(s)
        if c != s:
            x = x[..., o:o + c, o:o + c]
        if c != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x


def crop_fraction(pre: Preprocess) -> float:
    """Share of the resized short side that the centre crop keeps."""
    return pre.size / pre.resize


def shared_preprocess(pres: list[Preprocess]) -> tuple[Preprocess, list[MemberInput]]:
    """One decode for several preprocessings: the widest crop, at a side where every member's
    own crop has at least its own resolution; plus each member's way from it to its input."""
    if any(p.width is not None for p in pres):
        raise ValueError(f"backbones side by side (or ensemble members) share one square decode, and "
                         f"{' and '.join(p.shape_name for p in pres if p.width is not None)} is not square: give "
                         f"each member a square input (NAME@SIZE), or use the non-square backbone alone")
    modes = {(p.crop, p.box) for p in pres}
    if len(modes) > 1:
        raise ValueError(f"backbones side by side share one decode, so they need the same crop mode; got "
                         f"{', '.join(sorted(m if b is None else f'{m} {list(b)}' for m, b in modes))}: set "
                         f"backbone.crop once for all of them")
    cf = max(crop_fraction(p) for p in pres)
    size = max(round(p.size * cf / crop_fraction(p)) for p in pres)  # nearest: integer-pixel crops differ a little
    first = pres[0]
    pre = Preprocess(size=size, resize=max(size, int(round(size / cf))), interpolation=first.interpolation,
                     mean=first.mean, std=first.std, crop=first.crop, box=first.box, jpeg=first.jpeg)
    inputs = [MemberInput(min(1.0, crop_fraction(p) / cf), p.size) for p in pres]
    return pre, inputs


class ConcatExtractor(nn.Module):
    """Pixels 0..255 ``(n, 3, S, S)`` → member features side by side ``(n, sum D_i)``."""

    def __init__(self, extractors: list[nn.Module], inputs: list[MemberInput]) -> None:
        super().__init__()
        self.members = nn.ModuleList(extractors)
        self.inputs = nn.ModuleList(inputs)
        self.dims = [int(m.feature_dim) for m in extractors]
        self.feature_dim = sum(self.dims)

    @property
    def net(self) -> nn.ModuleList:
        """The members' networks (what a model folder stores: keys ``0.*``, ``1.*``, ...)."""
        return nn.ModuleList([m.net for m in self.members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n,3,S,S) -> (n, sum D_i)
        return torch.cat([m(f(x)) for m, f in zip(self.members, self.inputs)], dim=1)


@dataclass
class MultiBackbone(Backbone):
    """Backbones whose features are concatenated; cache key from the members' keys."""

    members: tuple[Backbone, ...] = ()

    def fingerprint(self) -> str:
        parts = (tuple(m.fingerprint() for m in self.members), sorted(self.preprocess.to_dict(decoder=False).items()))
        return f"multi{len(self.members)}-{hashlib.sha256(repr(parts).encode()).hexdigest()[:16]}"

    def describe(self) -> dict:
        return {"name": self.name, "arch": "concat", "feature_dim": self.feature_dim,
                "weights_origin": "members", "preprocess": self.preprocess.pinned().to_dict(),
                "members": [m.describe() for m in self.members]}


def multi_backbone(members: list[Backbone], name: str | None = None) -> MultiBackbone:
    """One backbone over ``members`` (features concatenated in this order)."""
    pre, inputs = shared_preprocess([m.preprocess for m in members])
    module = ConcatExtractor([materialize(m.module) for m in members], inputs).eval()
    name = name or "+".join(m.name for m in members)
    return MultiBackbone(name, "concat", module, pre, "members", tuple(members))


def member_state(state: dict, index: int) -> dict:
    """The tensors of member ``index`` in a multi-backbone state dict (prefix removed)."""
    prefix = f"{index}."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
