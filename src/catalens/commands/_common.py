"""Options shared by several sub-commands and their mapping onto :class:`catalens.config.Config`."""
from __future__ import annotations

import argparse
import math
from typing import Callable

from catalens.config import Config, load_config, parse_override


def input_size(text: str) -> int | str:
    """``--image-size``: a side (``256``) or ``HEIGHTxWIDTH`` (``256x192``)."""
    from catalens.config import parse_input_size

    if text.strip().isdigit():  # one side: the bounds' own message ("must be <= 1024, got ...")
        return bounded(int, 32, 1024)(text)
    try:
        size = parse_input_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return size if isinstance(size, int) else f"{size[0]}x{size[1]}"


def bounded(kind: type, lo: float | None = None, hi: float | None = None, *,
            lo_open: bool = False, what: str | None = None) -> Callable[[str], float]:
    """An argparse ``type=`` that parses ``kind`` (int or float) and enforces ``lo <= x <= hi``
    (``lo < x`` with ``lo_open``); the error says the bound and gives an example.

    argparse prints it as ``argument --flag: must be ...`` and exits with status 2.
    """
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what or _kind_name(kind)}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if lo is not None and (value <= lo if lo_open else value < lo):
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo:g}, got {text}")
        if hi is not None and value > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi:g}, got {text}")
        return value

    parse.__name__ = what or _kind_name(kind)  # argparse names the type in its own messages
    return parse


def _kind_name(kind: type) -> str:
    return "an integer" if kind is int else "a number"


#: argparse types for numeric options: use one of these (or :func:`bounded`) for every number
positive_int = bounded(int, 1)                  # counts, sizes, rows per part: >= 1
nonneg_int = bounded(int, 0)                    # 0 meaning "off" or "none": >= 0
positive_float = bounded(float, 0, lo_open=True)  # durations, budgets: > 0
nonneg_float = bounded(float, 0)                # waits that may be 0: >= 0
unit_float = bounded(float, 0, 1)               # shares, cosines: 0..1
port_int = bounded(int, 1, 65535, what="a TCP port")


def add_config_options(p: argparse.ArgumentParser, training: bool = False, backbone: bool = False) -> None:
    """Add the configuration flags: common ones; ``backbone`` adds backbone choice and --strict
    (commands that embed); ``training`` adds those and the head/text/k-fold/hierarchy flags."""
    g = p.add_argument_group("configuration (defaults < --config file < flags < --set)")
    g.add_argument("--config", metavar="FILE", help="YAML run configuration")
    g.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override any config key, e.g. --set head.lr=0.01 (repeatable)")
    g.add_argument("--seed", type=nonneg_int)
    g.add_argument("--cache-dir", metavar="DIR", help="embedding cache (default ~/.cache/catalens/embeddings)")
    g.add_argument("--runtime", help="inference runtime: auto, eager, onnx, openvino, openvino-int8, compile, bf16, cuda, cuda-bf16")
    g.add_argument("--workers", type=nonneg_int, help="decode processes (default: spare cores)")
    g.add_argument("--batch-size", type=positive_int, help="images per inference batch")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    if training or backbone:
        g.add_argument("--backbone", help="backbone name (efficientnet_lite0/1/2 offline, or any timm name)")
        g.add_argument("--weights", metavar="FILE", help="backbone checkpoint (.safetensors/.pth), or 'random'")
        g.add_argument("--image-size", type=input_size, metavar="PX",
                       help="backbone input side, or HEIGHTxWIDTH for a non-square input, e.g. 256x192 "
                            "(default: the backbone's own, e.g. 224 for lite0)")
        g.add_argument("--crop-pct", type=bounded(float, 0, 1, lo_open=True), metavar="F",
                       help="centre crop share of the resized short side (default 0.875; 1 = no crop)")
        g.add_argument("--crop", choices=["center", "pad", "squish", "box"],
                       help="how the square input is cut: center (default), pad (whole photo on white), squish "
                            "(whole photo stretched), box (--set backbone.box=[x0,y0,x1,y1] fractions)")
        g.add_argument("--pool", choices=["avg", "gem", "multilevel"],
                       help="how the backbone's feature map becomes the feature vector: avg (default), gem "
                            "(generalised mean), multilevel (gem + the last three stages' averages; "
                            "EfficientNet-family backbones)")
        g.add_argument("--strict", action="store_true", help="any image problem is fatal")
    if training:
        g.add_argument("--head", dest="head_type", help="head type: linear, mlp")
        g.add_argument("--epochs", type=positive_int)
        g.add_argument("--text", action="store_true",
                       help="also learn from product titles (the data's text column): TF-IDF title model "
                            "fused with the image head; rows without a title use the image alone")
        g.add_argument("--folds", type=nonneg_int, metavar="K",
                       help="also cross-validate over train+val (K folds by product): mean/std per metric "
                            "and out-of-fold predictions in OUT")
        g.add_argument("--hierarchical-decoding", action="store_true",
                       help="predict the most probable class path seen in training (master > sub > article)")


def config_from_args(args: argparse.Namespace) -> Config:
    """Resolve the configuration: defaults < --config < flags < --set."""
    flags: dict = {}

    def put(path: str, value) -> None:
        if value is None or value is False:
            return
        node = flags
        *parents, last = path.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value

    put("seed", getattr(args, "seed", None))
    put("cache_dir", getattr(args, "cache_dir", None))
    put("engine.runtime", getattr(args, "runtime", None))
    put("engine.workers", getattr(args, "workers", None))
    put("engine.batch_size", getattr(args, "batch_size", None))
    if getattr(args, "no_progress", False):
        put("engine.progress", None)
        flags.setdefault("engine", {})["progress"] = False
    put("backbone.name", getattr(args, "backbone", None))
    put("backbone.weights", getattr(args, "weights", None))
    put("backbone.image_size", getattr(args, "image_size", None))
    put("backbone.crop_pct", getattr(args, "crop_pct", None))
    put("backbone.crop", getattr(args, "crop", None))
    put("backbone.pool", getattr(args, "pool", None))
    put("head.type", getattr(args, "head_type", None))
    put("head.epochs", getattr(args, "epochs", None))
    put("data.strict", getattr(args, "strict", None))
    put("text.enabled", getattr(args, "text", None))
    put("kfold.folds", getattr(args, "folds", None))
    put("hierarchy_decoding", getattr(args, "hierarchical_decoding", None))
    put("selective.target_precision", getattr(args, "target_precision", None))
    put("finetune.mode", getattr(args, "finetune", None))
    put("finetune.epochs", getattr(args, "finetune_epochs", None))
    put("finetune.resume", "require" if getattr(args, "resume", False) else None)
    put("finetune.tta", getattr(args, "tta", None))
    put("preset.name", getattr(args, "preset", None))
    put("preset.time_limit", getattr(args, "time_limit", None))
    overrides = [flags] + [parse_override(s) for s in getattr(args, "set", [])]
    return load_config(getattr(args, "config", None), overrides)
