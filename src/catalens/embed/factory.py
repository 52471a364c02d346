"""Backbones by name: the registry's, any timm architecture, several side by side, or the one a
model folder describes. Kept apart from :mod:`catalens.embed.backbones` (the Backbone type and the
registry) so that :mod:`catalens.embed.multi` can build on those without an import cycle."""
from __future__ import annotations

from catalens.embed.backbones import (BACKBONES, Backbone, BackboneError, FeatureExtractor, _timm_backbone,
                                      with_input)
from catalens.embed.multi import member_state, multi_backbone
from catalens.config import parse_input_size
from catalens.ingest.images import Preprocess
from catalens.runtime import import_timm


def create_backbone(name: str = "efficientnet_lite0", weights: str | None = None,
                    image_size: int | str | tuple[int, int] | None = None, crop_pct: float | None = None,
                    crop: str | None = None, box=None) -> Backbone:
    """Build a backbone by registry or timm name; ``weights``: None, a file, or ``"random"``.

    ``NAME@SIZE`` feeds a backbone at another input side, ``NAME@HxW`` (or ``image_size="HxW"``) a
    non-square input of H rows by W columns; ``A+B+...`` concatenates the
    features of several backbones (:mod:`catalens.embed.multi`); ``crop_pct``, ``crop`` (a crop
    mode: center, pad, squish, box) and ``box`` apply to each.
    """
    specs = [s.strip() for s in name.split("+")]
    if isinstance(image_size, str):
        try:
            image_size = parse_input_size(image_size)
        except ValueError as e:
            raise BackboneError(str(e)) from None
    if len(specs) == 1:
        base, size = _parse_spec(specs[0])
        return with_input(_create_one(base, weights), image_size or size, crop_pct, crop, box)
    if weights not in (None, "random"):
        raise BackboneError(f"a weights file belongs to one backbone, but '{name}' names {len(specs)}; "
                            f"train with each backbone alone, or use offline/hub weights for all")
    if image_size:
        raise BackboneError(f"image_size {image_size} is ambiguous for '{name}': give each member its "
                            f"side as NAME@SIZE, e.g. efficientnet_lite0@256+efficientnet_lite1@272")
    members = []
    for spec in specs:
        base, size = _parse_spec(spec)
        members.append(with_input(_create_one(base, weights), size, crop_pct, crop, box))
    return multi_backbone(members, name)


def _parse_spec(spec: str) -> tuple[str, int | tuple[int, int] | None]:
    """``"efficientnet_lite1@272"`` → ``("efficientnet_lite1", 272)``; ``"efficientnet_lite0@256x192"``
    → ``("efficientnet_lite0", (256, 192))`` (height x width)."""
    base, _, size = spec.partition("@")
    if not base:
        raise BackboneError(f"empty backbone name in '{spec}'; write NAME or NAME@SIZE joined by '+'")
    if not size:
        return base, None
    try:
        return base, parse_input_size(size)
    except ValueError:
        raise BackboneError(f"'{spec}': the input size after '@' must be a side or HEIGHTxWIDTH, each a whole number "
                            f"of pixels from 32 to 1024, e.g. {base}@256 or {base}@256x192") from None


def _create_one(name: str, weights: str | None) -> Backbone:
    if name in BACKBONES:
        return BACKBONES.create(name, weights=weights)
    return _timm_backbone(name, weights)


def backbone_from_config(bc) -> Backbone:
    """The backbone a :class:`catalens.config.BackboneConfig` describes (name, weights, input)."""
    return create_backbone(bc.name, bc.weights, bc.image_size, bc.crop_pct, bc.crop, bc.box)


def backbone_from_description(desc: dict, state: dict) -> Backbone:
    """Rebuild a backbone saved in a model folder (architecture + its own weights)."""
    if desc["arch"] == "concat":  # several backbones side by side (catalens.embed.multi)
        members = [backbone_from_description(d, member_state(state, i)) for i, d in enumerate(desc["members"])]
        return multi_backbone(members, desc["name"])
    timm = import_timm()
    net = timm.create_model(desc["arch"], pretrained=False, num_classes=0)
    net.load_state_dict(state, strict=True)
    pre = Preprocess.from_dict(desc["preprocess"])
    return Backbone(desc["name"], desc["arch"], FeatureExtractor(net.eval(), pre), pre, desc["weights_origin"])
