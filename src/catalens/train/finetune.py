"""Fine-tuning the backbone: ``catalens train DATA --out M --finetune blocks|all``.

Starts from the linear probe the frozen pipeline just fitted (LP-FT: the head is already
sensible, so the first gradient steps do not wreck the pretrained features), then trains

- ``blocks``: the last ``N`` stages of the backbone + its 1x1 conv head + the task heads;
  ``N = 0`` trains the heads only, on augmented views of the frozen features;
- ``all``: every backbone weight + the task heads,

with discriminative learning rates (backbone ``lr * backbone_lr_mult``), SGD + momentum or
AdamW, linear warm-up then cosine decay, label smoothing, and the product-photo augmentation
of :mod:`catalens.train.augment` (random resized crop, flip, mild colour jitter) on uint8
pixels decoded once into a memmap. BatchNorm statistics stay frozen (affine parameters train):
small batches then cannot corrupt them, and precomputed activations stay valid.

**Precomputed views (the CPU trick).** When only the last stages train, everything before
them is a fixed function. With ``views = K > 0`` each training image is augmented ``K`` times
*once*, pushed through the frozen part, and the activations stored as float16 in a memmap;
every epoch then only runs the trainable tail on one of those views per image. On a 2-core CPU
this makes an epoch several times cheaper than augmenting and running the whole network.
``views = 0`` augments online every epoch (the default on a GPU, and the only sensible choice
for ``all``).

**Checkpoints.** After every epoch ``WORK/ckpt-EPOCH.safetensors`` (backbone, heads, optimizer
tensors, torch RNG) and ``WORK/ckpt.json`` (epoch, optimizer hyper-parameters, history, a stamp
of the run's settings; written last, atomically, so it always names a complete checkpoint) are
written; no pickle. A re-run with the same settings resumes after the last finished epoch and
ends with the same weights as an uninterrupted run: data order and augmentation are functions
of ``(seed, epoch, row, view)``, the learning rate a function of the step.

**Several GPUs (torchrun).** Launched by ``torchrun`` (see :mod:`catalens.distributed`
and docs/scale.md), rank 0 decodes the pixels and precomputes the views (the others then map
its files), the trained part is wrapped in DistributedDataParallel, every rank trains on its
shard of each epoch's permutation (``finetune.batch_size`` per process), and only rank 0
evaluates, checkpoints and returns a model worth saving.
"""
from __future__ import annotations

import logging
import copy
import hashlib
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from catalens.config import Config
from catalens.embed.backbones import Backbone
from catalens.embed.runtimes import has_native_bf16
from catalens.heads.estimator import AccuracyCounter, MultiTaskHead
from catalens.heads.losses import class_weights, multitask_loss
from catalens.heads.schedules import plateau_drops, schedule_factor, schedule_params
from catalens.tasks import TaskInfo
from catalens import distributed as ddp
from catalens.train.augment import AugmentParams, BatchMaker, decode_store, default_workers
from catalens.train.mixing import apply_mix, draw_mix, mix_rng, mixed_loss, progressive_scale, resize_batch

_logger = logging.getLogger(__name__)


class FinetuneError(ValueError):
    """Fine-tuning cannot run as configured."""


class DivergedError(FinetuneError):
    """The training loss stopped being finite (learning rate too high for this data)."""


def check_finetunable(backbone: Backbone) -> None:
    """Fine-tuning trains one network through its average pooling: a multi-backbone (``a+b``) or
    another pooling is refused, with the ways out."""
    members = getattr(backbone, "members", None)
    if members:
        raise FinetuneError(f"--finetune takes one backbone, and '{backbone.name}' has {len(members)}: "
                            f"fine-tune each alone and combine the models with 'catalens ensemble', or train "
                            f"the multi-backbone frozen (without --finetune)")
    if backbone.pool != "avg":
        raise FinetuneError(f"--finetune trains the net through its own average pooling, and backbone.pool is "
                            f"'{backbone.pool}': fine-tune with pool avg (the default), or train frozen with "
                            f"pool {backbone.pool} (without --finetune)")


def _diverged(value: float, epoch: int, step: int, f) -> DivergedError:
    return DivergedError(f"fine-tuning diverged: the training loss became {value} in epoch {epoch} (step {step}); "
                         f"lower finetune.lr (now {f.lr:g}) or finetune.backbone_lr_mult (now "
                         f"{f.backbone_lr_mult:g}), e.g. --set finetune.lr={f.lr / 3:.3g}")


@dataclass
class FinetuneResult:
    backbone: Backbone
    head: MultiTaskHead
    probs_val: dict[str, np.ndarray]     # rows of ``is_val``, in order
    history: list[dict]
    meta: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- devices
def cpu_has_native_bf16() -> bool:
    """True when the CPU has avx512_bf16 or amx_bf16 (bf16 autocast is slow otherwise)."""
    return has_native_bf16()


def pick_device() -> torch.device:
    """CUDA when available (under torchrun: the GPU of ``LOCAL_RANK``), else the CPU."""
    return ddp.device()


def use_bf16(setting: str, device: torch.device) -> bool:
    if setting == "off":
        return False
    if setting == "on":
        return True
    return device.type == "cuda" or cpu_has_native_bf16()


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def default_views(f, device: torch.device) -> int:
    """Precomputed views per image: ``finetune.views``, or 3 on a CPU (0 = online on a GPU or for ``all``)."""
    if f.views is not None:
        return f.views
    return 0 if device.type == "cuda" or f.mode == "all" else 3


# ------------------------------------------------------------------- backbone split
class _Trunk(nn.Module):
    """The frozen part: pixels 0..255 → activations entering the trainable tail."""

    def __init__(self, extractor: nn.Module, n_frozen_stages: int | None) -> None:
        super().__init__()
        self.x = extractor
        self.k = n_frozen_stages      # None: the whole extractor (heads-only training)

    def forward(self, px: torch.Tensor) -> torch.Tensor:
        if self.k is None:
            return self.x(px)
        net = self.x.net
        h = net.bn1(net.conv_stem((px - self.x.mean) * self.x.inv_std))
        for stage in net.blocks[:self.k]:
            h = stage(h)
        return h


class _Joint(nn.Module):
    """What trains (the DDP-wrapped module): trainable tail of the backbone, then the heads."""

    def __init__(self, tail: nn.Module, hnet: nn.Module) -> None:
        super().__init__()
        self.tail, self.hnet = tail, hnet

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.hnet(self.tail(x).flatten(1))


class _Tail(nn.Module):
    """The trainable part of the backbone: the last stages, conv head, norm and pooling."""

    def __init__(self, net: nn.Module, k: int) -> None:
        super().__init__()
        self.stages = nn.Sequential(*list(net.blocks)[k:])
        self.conv_head, self.bn2, self.pool = net.conv_head, net.bn2, net.global_pool

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.pool(self.bn2(self.conv_head(self.stages(h))))


def split_backbone(extractor: nn.Module, mode: str, blocks: int) -> tuple[nn.Module, nn.Module, list[nn.Parameter]]:
    """``(trunk, tail, trainable backbone parameters)``; ``tail(trunk(px))`` = ``extractor(px)``.

    EfficientNet/MobileNet-style nets (stages in ``.blocks``) count each of ``.blocks`` as a stage;
    any other timm architecture (ResNet, ConvNeXt, VGG, DenseNet, Inception, RegNet, ...) is split
    at the stage boundaries its ``feature_info`` names (:func:`timm_stages`).
    """
    net = extractor.net
    if mode == "all":
        return nn.Identity(), extractor, list(extractor.parameters())
    if blocks == 0:
        return _Trunk(extractor, None), nn.Identity(), []
    needed = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool")
    if not all(hasattr(net, a) for a in needed):
        return _split_by_feature_info(extractor, blocks)
    n_stages = len(net.blocks)
    if blocks >= n_stages:
        return nn.Identity(), extractor, list(extractor.parameters())
    k = n_stages - blocks
    tail = _Tail(net, k)
    return _Trunk(extractor, k), tail, list(tail.parameters())


#: children of a timm model that belong to ``forward_head`` (pooling, classifier), not to the stages
HEAD_NAMES = frozenset({"global_pool", "fc", "head", "classifier", "head_drop", "pre_logits", "fc_norm",
                        "head_dist", "attn_pool"})


def timm_stages(net: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[list[int]]]:
    """The modules ``forward_features`` runs, in order (``(qualified name, module)``), and the
    stages as lists of their positions: the stem first, then one stage per ``feature_info``
    level; what follows the last level (a final norm or 1x1 conv) joins the last stage, and a
    stage without parameters (a lone pooling layer) joins the one before it."""
    info = getattr(net, "feature_info", None)
    names = [d["module"] for d in info] if isinstance(info, list) and info and isinstance(info[0], dict) else []
    if not names or not hasattr(net, "forward_head"):
        raise FinetuneError(f"--finetune blocks needs a timm backbone that names its stages (feature_info); "
                            f"'{type(net).__name__}' does not: use --finetune all, or --set finetune.blocks=0 "
                            f"to train the heads on augmented views")
    seq: list[tuple[str, nn.Module]] = []
    for name, child in net.named_children():
        if name in HEAD_NAMES:
            continue
        if isinstance(child, nn.Sequential) and any(n.startswith(name + ".") for n in names):
            seq += [(f"{name}.{n}", m) for n, m in child.named_children()]
        else:
            seq.append((name, child))
    ends = sorted({i for n in names for i, (q, _) in enumerate(seq) if n == q or n.startswith(q + ".")})
    if not ends:
        raise FinetuneError(f"--finetune blocks: none of the stages {names} of '{type(net).__name__}' was found "
                            f"among its modules; use --finetune all")
    bounds = [0] + [e + 1 for e in ends]
    stages = [list(range(a, b)) for a, b in zip(bounds, bounds[1:]) if b > a]
    if bounds[-1] < len(seq):
        stages[-1] += list(range(bounds[-1], len(seq)))
    merged: list[list[int]] = []
    for st in stages:
        has_params = any(p.numel() for i in st for p in seq[i][1].parameters())
        if merged and not has_params:
            merged[-1] += st
        else:
            merged.append(st)
    return seq, merged


class _SeqTrunk(nn.Module):
    """Frozen part of a timm net split by :func:`timm_stages`: normalisation + the first modules."""

    def __init__(self, extractor: nn.Module, modules: list[nn.Module]) -> None:
        super().__init__()
        self.x = extractor
        self.mods = nn.ModuleList(modules)

    def forward(self, px: torch.Tensor) -> torch.Tensor:
        h = (px - self.x.mean) * self.x.inv_std
        for m in self.mods:
            h = m(h)
        return h


class _SeqTail(nn.Module):
    """Trainable part of a timm net split by :func:`timm_stages`: the last modules, then ``forward_head``."""

    def __init__(self, net: nn.Module, modules: list[nn.Module]) -> None:
        super().__init__()
        self.mods = nn.ModuleList(modules)
        self.head_mods = nn.ModuleList([m for n, m in net.named_children() if n in HEAD_NAMES])
        object.__setattr__(self, "_net", net)  # not a submodule: its other parameters stay out of the tail's

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for m in self.mods:
            h = m(h)
        return self._net.forward_head(h)


def _split_by_feature_info(extractor: nn.Module, blocks: int):
    net = extractor.net
    seq, stages = timm_stages(net)
    body = stages[1:]  # the stem is never one of "the last N stages"
    if blocks >= len(body):
        return nn.Identity(), extractor, list(extractor.parameters())
    cut = body[-blocks][0]
    trunk = _SeqTrunk(extractor, [m for _, m in seq[:cut]])
    tail = _SeqTail(net, [m for _, m in seq[cut:]])
    _check_split(extractor, trunk, tail)
    return trunk, tail, list(tail.parameters())


def _check_split(extractor: nn.Module, trunk: nn.Module, tail: nn.Module, side: int = 96) -> None:
    """The split must compute what the whole net computes (a net whose ``forward_features`` does more
    than run its children in order cannot be split this way)."""
    was = extractor.training
    extractor.eval()
    try:
        x = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(0)) * 255
        with torch.no_grad():
            ref, got = extractor(x), tail(trunk(x)).flatten(1)
    finally:
        extractor.train(was)
    if got.shape != ref.shape or not torch.allclose(got, ref, rtol=1e-4, atol=1e-4):
        raise FinetuneError(f"--finetune blocks cannot split '{type(extractor.net).__name__}' into stages (its "
                            f"forward is more than its modules in order): use --finetune all")


def _freeze_bn(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


# ------------------------------------------------------------------------ schedule
def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine to 0 at ``total`` (schedule ``cosine``)."""
    return schedule_factor("cosine", step, total, warmup, 1)


def _optimizer(cfg, groups: list[dict]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)


# --------------------------------------------------------------------- checkpoints
def _stamp(cfg: Config, backbone: Backbone, n_train: int, n_val: int, tasks: list[TaskInfo]) -> dict:
    f = cfg.finetune.model_dump(mode="json")
    for k in ("workers", "keep_work", "tta", "resume"):
        f.pop(k, None)
    stamp = {"finetune": f, "seed": cfg.seed, "backbone": backbone.fingerprint(), "train": n_train,
             "val": n_val, "tasks": [[t.name, t.classes] for t in tasks],
             "head": cfg.head.model_dump(mode="json")}
    if ddp.is_distributed():  # batch_size is per process: another world size is another run
        stamp["world_size"] = ddp.world_size()
    return stamp


def save_checkpoint(work: Path, epoch: int, step: int, net: nn.Module, head: nn.Module,
                    opt: torch.optim.Optimizer, history: list[dict], stamp: dict) -> Path:
    """Write ``ckpt-EPOCH.safetensors`` then, atomically, ``ckpt.json`` (the commit point)."""
    from safetensors.torch import save_file

    tensors = {f"backbone.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tensors.update({f"head.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()})
    sd = opt.state_dict()
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{pid}.{name}"] = v.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    name = f"ckpt-{epoch:04d}.safetensors"
    tmp = work / (name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, work / name)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    meta = {"epoch": epoch, "step": step, "file": name, "param_groups": groups, "history": history,
            "stamp": stamp}
    tmpj = work / "ckpt.json.tmp"
    tmpj.write_text(json.dumps(meta))
    os.replace(tmpj, work / "ckpt.json")
    for old in work.glob("ckpt-*.safetensors"):
        if old.name != name:
            old.unlink()
    return work / name


def load_checkpoint(work: Path, net: nn.Module, head: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Restore weights, optimizer and RNG from ``work``; returns the JSON part."""
    from safetensors.torch import load_file

    meta = json.loads((work / "ckpt.json").read_text())
    t = load_file(str(work / meta["file"]))
    net.load_state_dict({k[9:]: v for k, v in t.items() if k.startswith("backbone.")}, strict=True)
    head.load_state_dict({k[5:]: v for k, v in t.items() if k.startswith("head.")}, strict=True)
    state: dict = {}
    for k, v in t.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(t["rng.torch"])
    return meta


# -------------------------------------------------------------------------- helpers
def _targets(Y: dict[str, np.ndarray], tasks: list[TaskInfo], rows: np.ndarray) -> dict[str, torch.Tensor]:
    return {t.name: torch.from_numpy(Y[t.name][rows].astype(np.int64 if t.kind == "class" else np.float32))
            for t in tasks}


def _probs(logits: dict[str, torch.Tensor], tasks: list[TaskInfo]) -> dict[str, np.ndarray]:
    out = {}
    for t in tasks:
        z = logits[t.name].float()
        out[t.name] = (z.softmax(-1) if t.kind == "class" else z.sigmoid()).cpu().numpy()
    return out


def _class_accuracies(probs: dict[str, np.ndarray], Y: dict[str, np.ndarray], tasks, rows) -> dict[str, float]:
    """Validation accuracy of every class task, finest (most classes) first: that one is the hard one."""
    out = {}
    for t in sorted((t for t in tasks if t.kind == "class"), key=lambda t: -t.n_outputs):
        y = Y[t.name][rows]
        keep = y >= 0
        if len(rows) and keep.any():
            out[t.name] = float((probs[t.name].argmax(1)[keep] == y[keep]).mean())
    return out


def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _after_epoch(epoch: int) -> None:
    """Hook called after each epoch's checkpoint is written (tests simulate interrupts here)."""


class _ViewStore:
    """Float16 activations of the frozen part, ``(rows, *shape)``, in a memmap file."""

    def __init__(self, path: Path, rows: int, shape: tuple[int, ...], mode: str) -> None:
        self.path, self.shape = path, (rows, *shape)
        self.arr = np.lib.format.open_memmap(path, mode=mode, dtype=np.float16, shape=self.shape) \
            if mode == "w+" else np.load(path, mmap_mode="r")


def _compute_views(work: Path, name: str, trunk, maker: BatchMaker, items: list[tuple[int, int]],
                   batch_size: int, device, bf16: bool, channels_last: bool, progress: bool, log) -> np.ndarray:
    """``trunk`` of the pixels of ``items`` into ``WORK/NAME.npy`` (reused when complete)."""
    path, done = work / f"{name}.npy", work / f"{name}.done"
    if path.exists() and done.exists():
        arr = np.load(path, mmap_mode="r")
        if len(arr) == len(items):
            return arr
    store = None
    run = _trunk_runner(trunk, maker, work, device, bf16, channels_last, log)
    bar = _bar(len(items), progress, f"views {name}")
    pos = 0
    t0 = time.time()
    with torch.inference_mode():
        for px in maker.batches(0, items, batch_size):
            h = run(px).astype(np.float16)
            if store is None:
                store = _ViewStore(path, len(items), h.shape[1:], "w+")
            store.arr[pos:pos + len(h)] = h
            pos += len(h)
            bar.update(len(h))
    bar.close()
    store.arr.flush()
    done.write_text("ok")
    log(f"  {name}: {len(items)} views {tuple(store.shape[1:])} float16 "
        f"({store.arr.nbytes / 2 ** 20:.0f} MiB) in {time.time() - t0:.0f}s")
    return np.load(path, mmap_mode="r")


def _trunk_runner(trunk, maker: BatchMaker, work: Path, device, bf16: bool, channels_last: bool, log):
    """uint8 NHWC pixels → frozen activations (float32 numpy).

    On a CPU the frozen part runs in ONNX Runtime (about 2x faster than eager torch here; the
    graph is exported once per run into ``WORK``); eager torch elsewhere or if that fails.
    """
    if getattr(trunk, "_catalens_runner", None) is not None:
        return trunk._catalens_runner

    def eager(px: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), _autocast(device, bf16):
            return trunk(_to_input(px, device, channels_last)).float().cpu().numpy()

    run = eager
    if device.type == "cpu" and not bf16 and not isinstance(trunk, nn.Identity) \
            and os.environ.get("CATALENS_FINETUNE_ONNX", "1") != "0":
        try:
            from catalens.embed.runtimes import export_onnx, ort_session
            from catalens.runtime import available_cpus

            from catalens.embed.runtimes import input_hw, size_tag

            size = maker.input_size
            path = work / f"trunk-s{size_tag(size)}.onnx"
            if not path.exists():
                export_onnx(trunk.float().to(memory_format=torch.contiguous_format), size, path)
            sess = ort_session(path, available_cpus())
            name = sess.get_inputs()[0].name
            probe = np.zeros((2, *input_hw(size), 3), np.uint8)
            ref, got = eager(probe), sess.run(None, {name: probe})[0]
            if got.shape != ref.shape or not np.allclose(got, ref, rtol=1e-3, atol=1e-3):
                raise RuntimeError(f"ONNX trunk differs from torch (max {np.abs(got - ref).max():.3g})")

            def run(px: np.ndarray) -> np.ndarray:
                return sess.run(None, {name: np.ascontiguousarray(px, dtype=np.uint8)})[0]
        except Exception as e:  # onnxruntime missing, export unsupported, mismatch: eager torch
            log(f"  frozen part in eager torch (ONNX Runtime not used: {type(e).__name__}: {e})")
            run = eager
        if channels_last:
            trunk.to(memory_format=torch.channels_last)
    trunk._catalens_runner = run
    return run


def _regularise(x: torch.Tensor, f, seed: int, epoch: int, step: int):
    """The batch transform of the trained part's input: progressive resizing (``finetune.progressive``),
    then mixup / CutMix (``finetune.mixup`` / ``cutmix``); ``(x, mix or None)`` (:mod:`catalens.train.mixing`).
    Heads-only training (``blocks: 0``) gets pooled features ``(n, D)``: mixup only, nothing to resize or cut."""
    spatial = x.dim() == 4
    if spatial:
        x = resize_batch(x, progressive_scale(f.progressive, epoch, f.epochs))
    h, w = x.shape[-2:] if spatial else (1, 1)
    mix = draw_mix(mix_rng(seed, epoch, step), len(x), h, w, f.mixup, f.cutmix if spatial else 0.0)
    return apply_mix(x, mix), mix


def _to_input(px: np.ndarray, device, channels_last: bool) -> torch.Tensor:
    x = torch.from_numpy(px).to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def _act_input(a: np.ndarray, device, channels_last: bool) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(a, dtype=np.float32)).to(device, non_blocking=True)
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
    return x


def _bar(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr,
                mininterval=2.0, dynamic_ncols=True, leave=False)


# ------------------------------------------------------------------------ main entry
def finetune(cat, tasks: list[TaskInfo], Y: dict[str, np.ndarray], is_train: np.ndarray, is_val: np.ndarray,
             backbone: Backbone, head: MultiTaskHead, cfg: Config, work: str | Path, log=None,
             views_dir: str | Path | None = None) -> FinetuneResult:
    """Fine-tune ``backbone`` + ``head`` (fitted linear probe) on the train rows of ``cat``.

    ``work`` holds the checkpoints and, unless ``views_dir`` is given, the pixel store and
    precomputed views; it is removed on success unless ``finetune.keep_work``. A separate
    ``views_dir`` outlives the run, so runs that differ only in optimisation settings (a
    search) decode and precompute once: name it after :func:`views_key`. Returns the new
    backbone and head (the inputs are not modified) and validation probabilities.
    """
    log = log or _logger.info
    from catalens.runtime import set_threads

    f = cfg.finetune
    t_start = time.time()
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    set_threads(cfg.engine.threads or ddp.cpu_threads())
    device = pick_device()
    bf16 = use_bf16(f.bf16, device)
    views = default_views(f, device)
    progress = cfg.engine.progress and ddp.is_main()
    train_rows, val_rows = np.where(is_train)[0], np.where(is_val)[0]
    stamp = _stamp(cfg, backbone, len(train_rows), len(val_rows), tasks)
    resume = getattr(f, "resume", "auto")
    # torchrun: rank 0 decides (and clears the folder), the others follow its decision
    resume_meta = ddp.broadcast_object(_resume_meta(work, stamp, resume, log) if ddp.is_main() else None)
    if resume == "require" and resume_meta is None:
        raise FinetuneError(f"--resume: no checkpoint to resume in {work}")

    # private copies: the caller's backbone/head stay as they were
    extractor = copy.deepcopy(backbone.module).float()
    hnet = copy.deepcopy(head._check_fitted()).float()
    if hasattr(hnet, "temperature"):  # train raw logits; re-calibrated on validation at the end
        hnet.temperature.fill_(1.0)
    if f.mode != "none" and not (f.mode == "blocks" and f.blocks == 0) and hasattr(hnet, "std"):
        # features that were (nearly) constant on the frozen backbone start to move once it trains:
        # divided by a ~0 std they would blow the logits up; floor the std at 10% of the median
        with torch.no_grad():
            hnet.std.clamp_(min=float(hnet.std.median()) * 0.1)
    trunk, tail, bb_params = split_backbone(extractor, f.mode, f.blocks)
    for p in extractor.parameters():
        p.requires_grad_(False)
    for p in bb_params:
        p.requires_grad_(True)
    extractor.to(device).eval()
    hnet.to(device)
    ddp.broadcast_module(extractor)  # torchrun: rank 0's backbone everywhere (random weights differ)
    cl = f.channels_last
    if cl:
        extractor.to(memory_format=torch.channels_last)

    size = backbone.preprocess.size
    views_dir = Path(views_dir) if views_dir is not None else work
    views_dir.mkdir(parents=True, exist_ok=True)
    store_dir = views_dir / "pixels"
    log(f"finetune: mode {f.mode}" + (f" (last {f.blocks} stages)" if f.mode == "blocks" else "")
        + f", {len(train_rows)} train / {len(val_rows)} val images, {f.epochs} epochs, {f.optimizer}, "
        f"lr {f.lr:g} (backbone x{f.backbone_lr_mult:g}), device {device.type}"
        + (", bf16" if bf16 else "") + (f", {views} precomputed views per image" if views else ", online augmentation")
        + (f"; resuming after epoch {resume_meta['epoch']}" if resume_meta else ""))
    with ddp.rank0_first():  # torchrun: rank 0 decodes, the others open its store
        store = decode_store(cat, backbone.preprocess, store_dir, workers=default_workers(),
                             max_pixels=cfg.data.max_pixels, progress=progress, log=log)
    bad = [r for r in np.concatenate([train_rows, val_rows]) if not store.ok[r]]
    if bad:  # the frozen pass decoded them; a failure here means the files changed meanwhile
        raise FinetuneError(f"{len(bad)} images decoded for embedding failed to decode for fine-tuning "
                            f"(e.g. row {bad[0]}): did the data change during training?")
    params = AugmentParams(size=size, width=backbone.preprocess.width, scale=(f.scale_min, 1.0),
                           hflip=0.5 if f.hflip else 0.0,
                           brightness=f.jitter, contrast=f.jitter, saturation=f.jitter)
    workers = f.workers if f.workers is not None else default_workers()
    maker = BatchMaker(store, params, cfg.seed, workers)
    try:
        result = _run(cat, tasks, Y, train_rows, val_rows, backbone, extractor, trunk, tail, bb_params, hnet, cfg,
                      work, views_dir, maker, views, device, bf16, cl, progress, stamp, resume_meta, t_start, log)
    finally:
        maker.close()
    result.head.params = dict(head.params)  # head.json describes the head that was fine-tuned, not defaults
    return result


def views_key(cfg: Config, backbone: Backbone, n_train: int, n_val: int) -> str:
    """A digest of what the pixel store and precomputed views depend on: backbone, trained part,
    views, augmentation, seed and rows (not the optimisation settings)."""
    f = cfg.finetune
    parts = [backbone.fingerprint(), f.mode, f.blocks, f.views, f.scale_min, f.hflip, f.jitter, cfg.seed,
             n_train, n_val, backbone.preprocess.to_dict(), cfg.data.max_pixels]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _resume_meta(work: Path, stamp: dict, resume: str, log) -> dict | None:
    """The checkpoint in ``work`` to resume, or None (clearing ``work`` when it cannot be resumed)."""
    ckpt_json = work / "ckpt.json"
    meta = json.loads(ckpt_json.read_text()) if ckpt_json.exists() else None
    if meta is not None and meta.get("stamp") != stamp:
        log(f"finetune: {work} holds a checkpoint of a different run (settings or data changed); starting over")
        meta = None
    elif meta is not None and resume == "off":
        meta = None
    else:
        return meta
    shutil.rmtree(work)
    work.mkdir(parents=True)
    return None


def _run(cat, tasks, Y, train_rows, val_rows, backbone, extractor, trunk, tail, bb_params, hnet, cfg, work,
         views_dir, maker, views, device, bf16, cl, progress, stamp, resume_meta, t_start, log) -> FinetuneResult:
    f = cfg.finetune
    bs = f.batch_size
    # ---- frozen part: validation activations (always) and training views (when precomputing)
    val_items = [(int(r), -1) for r in val_rows]
    with ddp.rank0_first():  # torchrun: rank 0 computes them, the others map its files
        val_act = _compute_views(views_dir, "val", trunk, maker, val_items, 64, device, bf16, cl, progress, log) \
            if len(val_rows) else None
        train_act = None
        if views > 0:
            items = [(int(r), v) for r in train_rows for v in range(views)]
            train_act = _compute_views(views_dir, f"train-x{views}", trunk, maker, items, 64, device, bf16, cl,
                                       progress, log)
    # ---- optimizer, schedule
    head_params = list(hnet.parameters())
    groups = [{"params": head_params, "lr_mult": 1.0}]
    if bb_params:
        groups.append({"params": bb_params, "lr_mult": f.backbone_lr_mult})
    opt = _optimizer(f, groups)
    n_local = len(ddp.shard(np.arange(len(train_rows))))  # torchrun: this rank's rows per epoch
    steps_per_epoch = max(1, -(-n_local // bs))
    total = steps_per_epoch * f.epochs
    warmup = int(round(f.warmup_epochs * steps_per_epoch))
    weights = {t.name: class_weights(Y[t.name][train_rows], t.n_outputs, cfg.head.class_weighting)
               for t in tasks if t.kind == "class"}
    weights = {k: (v.to(device) if v is not None else None) for k, v in weights.items()}
    torch.manual_seed(cfg.seed)
    history: list[dict] = []
    start_epoch, step = 0, 0
    if resume_meta is not None:
        meta = load_checkpoint(work, extractor.net, hnet, opt)
        start_epoch, step, history = int(meta["epoch"]), int(meta["step"]), list(meta["history"])
        log(f"  resumed from {work / meta['file']} (epoch {start_epoch} of {f.epochs})")
    net = ddp.wrap(_Joint(tail, hnet), device)  # torchrun: DDP averages the gradients over the ranks
    if f.compile == "on" or (f.compile == "auto" and device.type == "cuda"):
        try:
            net = torch.compile(net)
        except Exception as e:  # pragma: no cover - depends on the toolchain
            log(f"  torch.compile unavailable ({type(e).__name__}: {e}); running eager")
    if ddp.is_distributed():
        print(f"[rank {ddp.rank()}/{ddp.world_size()}] fine-tuning on {n_local} of {len(train_rows)} training "
              f"images per epoch ({ddp.backend()}, device {device})", flush=True)
    rows_per_rank: list[int] = []
    offsets = np.random.default_rng([cfg.seed, 11]).integers(0, max(views, 1), size=len(train_rows))
    t_train = time.time()
    for epoch in range(start_epoch, f.epochs):
        te = time.time()
        drops = plateau_drops([h["val_loss"] for h in history if "val_loss" in h], f.plateau_patience) \
            if f.schedule == "plateau" else 0  # a function of the history: a resumed run gets the same
        lrf = 0.0
        rng = np.random.default_rng([cfg.seed, 13, epoch])
        order = ddp.shard(rng.permutation(len(train_rows)))  # torchrun: this rank's shard
        tail.train()
        hnet.train()
        _freeze_bn(extractor)
        total_loss, seen = 0.0, 0
        hits = AccuracyCounter(tasks)  # running train accuracy per class task (as train_loss)
        bar = _bar(len(order), progress, f"epoch {epoch + 1}/{f.epochs}")
        if train_act is not None:
            batches = ((order[s:s + bs], None) for s in range(0, len(order), bs))
        else:
            items = [(int(train_rows[i]), 0) for i in order]
            batches = ((order[s:s + bs], px) for s, px in
                       zip(range(0, len(order), bs), maker.batches(epoch + 1, items, bs)))
        for idx, px in batches:
            if px is None:
                vi = idx * views + (offsets[idx] + epoch) % views
                sel = np.sort(vi)  # memmap reads in file order; keep the pairing with labels
                x = _act_input(train_act[sel], device, cl)
                rows = train_rows[idx[np.argsort(vi)]]
            else:
                with torch.no_grad(), _autocast(device, bf16):
                    x = trunk(_to_input(px, device, cl))
                x = x.float() if x.dtype != torch.float32 else x
                rows = train_rows[idx]
            x, mix = _regularise(x, f, cfg.seed, epoch, step)
            lrf = schedule_factor(f.schedule, step, total, warmup, steps_per_epoch, f.step_epochs, f.gamma, drops,
                                  f.plateau_factor)
            for g in opt.param_groups:
                g["lr"] = f.lr * g["lr_mult"] * lrf
            with _autocast(device, bf16):
                logits = net(x)
            tgt = {k: v.to(device) for k, v in _targets(Y, tasks, rows).items()}
            loss = mixed_loss(lambda lg, tg: multitask_loss(lg, tg, tasks, cfg.head.loss_weights, weights,
                                                            f.label_smoothing, cfg.head.focal_gamma),
                              {k: v.float() for k, v in logits.items()}, tgt, mix)
            if ddp.is_distributed():  # a task without labels in this batch still gets (zero) gradients:
                loss = loss + 0.0 * sum(v.float().sum() for v in logits.values())  # DDP expects all
            lv = float(loss.detach())
            if not math.isfinite(lv) and not ddp.is_distributed():  # torchrun: decided on the epoch's sum
                raise _diverged(lv, epoch + 1, step + 1, f)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            hits.add(logits, tgt)
            total_loss += lv * len(idx)
            seen += len(idx)
            bar.update(len(idx))
        bar.close()
        if ddp.is_distributed():  # the epoch's loss over every rank; what each rank trained on
            rows_per_rank = [int(n) for n in ddp.all_gather(seen)]
            total_loss, seen = ddp.all_sum([total_loss, seen])
            sums = ddp.all_sum([*hits.right.values(), *hits.seen.values()])  # every rank's train accuracy
            k = len(hits.right)
            hits.right, hits.seen = dict(zip(hits.right, sums[:k])), dict(zip(hits.seen, sums[k:]))
            if not math.isfinite(total_loss):  # every rank sees the same sum: all stop together
                raise _diverged(total_loss, epoch + 1, step, f)
        row = {"epoch": epoch + 1, "train_loss": total_loss / max(seen, 1), "seconds": round(time.time() - te, 1),
               "lr": f.lr * lrf,  # the heads' learning rate at the epoch's last step (backbone: x backbone_lr_mult)
               **hits.row("train")}
        history.append(row)
        if ddp.is_main():  # torchrun: rank 0 evaluates, checkpoints and reports
            if val_act is not None:
                probs, vloss = _evaluate(tail, hnet, val_act, Y, tasks, val_rows, device, bf16, cl, weights, cfg)
                row["val_loss"] = vloss
                accs = _class_accuracies(probs, Y, tasks, val_rows)
                if accs:  # the finest task's, and every task's
                    row["val_accuracy"] = next(iter(accs.values()))
                    row["val_accuracy_by_task"] = accs
            save_checkpoint(work, epoch + 1, step, extractor.net, hnet, opt, history, stamp)
            done = epoch + 1 - start_epoch
            eta = (time.time() - t_train) / done * (f.epochs - epoch - 1)
            log(f"  epoch {epoch + 1}/{f.epochs}: train loss {row['train_loss']:.4f}"
                + (f", val loss {row['val_loss']:.4f}" if "val_loss" in row else "")
                + ("".join(f", val {k} {v:.4f}" for k, v in row.get("val_accuracy_by_task", {}).items()))
                + f" ({row['seconds']:.0f}s; ETA {_fmt_time(eta)})")
        _after_epoch(epoch + 1)
    # ---- result: CPU, contiguous, eval
    extractor = extractor.to("cpu").to(memory_format=torch.contiguous_format).eval()
    for p in extractor.parameters():
        p.requires_grad_(False)
    hnet = hnet.to("cpu").eval()
    new_head = MultiTaskHead(tasks, **_head_params(cfg))  # same TaskInfo objects: thresholds tuned later land here
    new_head.net_ = hnet
    new_head.history_ = history
    new_head.best_epoch_ = len(history)
    probs_val = {t.name: np.zeros((0, t.n_outputs), np.float32) for t in tasks}
    if val_act is not None and ddp.is_main():  # the other ranks' results are not used
        feats_val = _features(tail.to("cpu"), val_act)
        if hasattr(hnet, "temperature") and hasattr(new_head, "calibrate"):
            new_head.calibrate(feats_val, {k: v[val_rows] for k, v in Y.items()})
        probs_val = new_head.predict_proba(feats_val)
    what = "heads only" if not bb_params else (f"last {f.blocks} stages" if f.mode == "blocks" else "all")
    new_bb = replace(backbone, module=extractor,
                     weights_origin=f"{backbone.weights_origin} + catalens fine-tune ({what}, {f.epochs} epochs)")
    meta = {"mode": f.mode, "blocks": f.blocks, "trained": what, "views": views, "device": device.type,
            "bf16": bf16, "epochs": f.epochs, "seconds": round(time.time() - t_start, 1), "history": history,
            "settings": stamp["finetune"]}
    if ddp.is_distributed():
        meta["distributed"] = {"world_size": ddp.world_size(), "backend": ddp.backend(),
                               "rows_per_rank": rows_per_rank}  # of the last epoch trained
    if not f.keep_work:
        ddp.barrier()  # every rank is done with the work folder
        if ddp.is_main():
            shutil.rmtree(work, ignore_errors=True)
    return FinetuneResult(new_bb, new_head, probs_val, history, meta)


def _head_params(cfg: Config) -> dict:
    h = cfg.head
    return dict(hidden=h.hidden, dropout=h.dropout, epochs=h.epochs, batch_size=h.batch_size, lr=h.lr,
                weight_decay=h.weight_decay, patience=h.patience, loss_weights=h.loss_weights,
                class_weighting=h.class_weighting, label_smoothing=h.label_smoothing,
                focal_gamma=h.focal_gamma, seed=cfg.seed, **schedule_params(h))


def _features(tail, act) -> np.ndarray:
    """Backbone features of precomputed activations (CPU, float32)."""
    tail.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(act), 128):
            out.append(tail(torch.from_numpy(np.asarray(act[s:s + 128], dtype=np.float32))).flatten(1).numpy())
    return np.concatenate(out)


def _evaluate(tail, hnet, val_act, Y, tasks, val_rows, device, bf16, cl, weights, cfg):
    """Probabilities and loss of the clean validation views."""
    tail.eval()
    hnet.eval()
    outs: dict[str, list[torch.Tensor]] = {t.name: [] for t in tasks}
    with torch.inference_mode():
        for s in range(0, len(val_rows), 128):
            x = _act_input(val_act[s:s + 128], device, cl)
            with _autocast(device, bf16):
                logits = hnet(tail(x).flatten(1))
            for k, v in logits.items():
                outs[k].append(v.float().cpu())
        logits = {k: torch.cat(v) for k, v in outs.items()}
        tgt = _targets(Y, tasks, val_rows)
        w_cpu = {k: (v.cpu() if v is not None else None) for k, v in weights.items()}
        vloss = float(multitask_loss(logits, tgt, tasks, cfg.head.loss_weights, w_cpu))
    return _probs(logits, tasks), vloss


def config_digest(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(cfg.finetune.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]
