"""Ensembles: several model folders acting as one (``catalens ensemble MODEL... --out DIR``).

::

    DIR/
      model.json        format, "ensemble": {members, weights, sources}, tasks (shared class
                        orders, averaged tag thresholds), the composite backbone description
      members/0/ ...    each member a complete model folder (copied), loadable on its own

:func:`catalens.model.load` returns an :class:`EnsembleModel` for such a folder. It has the interface the predictor, evaluator, exporter and server use —
``tasks``, ``meta``, ``backbone`` (``module``, ``preprocess``, ``fingerprint()``,
``feature_dim``), ``predict_proba_features``, ``pixel_module`` — so none of them needs to
know about ensembles:

- ``backbone.module`` runs every distinct backbone of the members on the same decoded pixels and
  returns their features side by side: members with the same backbone (the same fingerprint:
  weights, input handling, pooling, TTA), e.g. a preset's searched head next to the recipe it was
  searched on, share one embedding, so such an ensemble costs what one of them costs. A member
  whose backbone is several side by side (``a+b+c``, :mod:`catalens.embed.multi`) counts as its
  parts: next to single members on the same backbones (a preset's blend of Lite0, Lite1, Lite2
  and the three side by side) each backbone still runs once;
- ``predict_proba_features`` splits that row back per member (its parts' blocks side by side),
  runs each member's heads and
  returns the weighted mean of the member probabilities; given titles (``texts``), members
  trained with ``--text`` fuse them with their own image probabilities first (predict and
  evaluate do this; the server's one-graph ensemble is image-only and says so).

Members must share task names, kinds and class orders (a clear error names the first
difference). The engine decodes each photo once, wide and sharp enough for every member, and
each member gets its own crop and side from it (:func:`catalens.embed.multi.shared_preprocess`).
A member's own test-time augmentation (``"tta"`` in its model.json) is kept.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from catalens.embed.backbones import Backbone
from catalens.embed.multi import MemberInput, MultiBackbone, multi_backbone
from catalens.ingest.images import Preprocess
from catalens.model.decode import Decoder
from catalens.model.format import (FORMAT, MEMBERS_DIR, ModelDescription, ModelError, package_versions,
                                   read_description)
from catalens.model.single import CatalensModel
from catalens.tasks import TaskInfo

logger = logging.getLogger(__name__)


class EnsembleError(ValueError):
    """Models that cannot be combined (different tasks or class orders, bad weights)."""


def check_compatible(models: list, names: list[str] | None = None) -> None:
    """Raise :class:`EnsembleError` naming the first task / class-order difference."""
    names = names or [f"model {i}" for i in range(len(models))]
    ref = models[0].tasks
    ref_desc = {t.name: t for t in ref}
    for m, name in zip(models[1:], names[1:]):
        tasks = {t.name: t for t in m.tasks}
        if set(tasks) != set(ref_desc):
            raise EnsembleError(f"{name} has tasks {sorted(tasks)} but {names[0]} has {sorted(ref_desc)}: "
                                f"ensemble members must predict the same tasks")
        for t0 in ref:
            t = tasks[t0.name]
            if t.kind != t0.kind:
                raise EnsembleError(f"task '{t0.name}' is a {t.kind} task in {name} but a {t0.kind} task in "
                                    f"{names[0]}")
            if list(t.classes) != list(t0.classes):
                diff = next((i for i, (a, b) in enumerate(zip(t.classes, t0.classes)) if a != b),
                            min(len(t.classes), len(t0.classes)))
                a = t0.classes[diff] if diff < len(t0.classes) else "(none)"
                b = t.classes[diff] if diff < len(t.classes) else "(none)"
                raise EnsembleError(
                    f"task '{t0.name}': class order of {name} differs from {names[0]} at position {diff} "
                    f"('{b}' vs '{a}'; {len(t.classes)} vs {len(t0.classes)} classes). Ensemble members must "
                    f"be trained on the same classes (same class folders / labels)")


def normalise_weights(weights, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise EnsembleError(f"{len(w)} weights for {n} models; give one weight per model")
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise EnsembleError(f"weights must be >= 0 with a positive sum; got {w}")
    s = sum(w)
    return [x / s for x in w]


# ------------------------------------------------------------------ composite backbone
@dataclass
class EnsembleBackbone(Backbone):
    """The composite backbone; its cache key combines the distinct backbones' keys and input handling."""

    member_fingerprints: tuple[str, ...] = ()      # the distinct backbones', in feature order
    member_parts: tuple[tuple[int, ...], ...] = ()  # member i reads the blocks member_parts[i], side by side

    def fingerprint(self) -> str:
        h = hashlib.sha256(repr((self.member_fingerprints, sorted(self.preprocess.to_dict(decoder=False).items()))).encode())
        return f"ensemble{len(self.member_fingerprints)}-{h.hexdigest()[:16]}"

    def describe(self) -> dict:
        return {"name": self.name, "arch": "ensemble", "feature_dim": self.feature_dim,
                "weights_origin": self.weights_origin, "preprocess": self.preprocess.pinned().to_dict(),
                "member_fingerprints": list(self.member_fingerprints),
                "member_parts": [list(p) for p in self.member_parts]}


def backbone_parts(backbone: Backbone) -> list[Backbone]:
    """The backbones a member's features are made of: the parts of several side by side (whose
    features are the parts' features concatenated), else the backbone itself (TTA included)."""
    return list(backbone.members) if type(backbone) is MultiBackbone else [backbone]


def distinct_backbones(members: list) -> tuple[list[Backbone], list[tuple[int, ...]]]:
    """The members' distinct backbones (by fingerprint, in order of first use; a side-by-side
    backbone counts as its parts) and, per member, the indices of the ones its features are made of."""
    first: dict[str, int] = {}
    distinct, parts = [], []
    for m in members:
        own = []
        for b in backbone_parts(m.backbone):
            fp = b.fingerprint()
            if fp not in first:
                first[fp] = len(distinct)
                distinct.append(b)
            own.append(first[fp])
        parts.append(tuple(own))
    return distinct, parts


def composite_backbone(members: list) -> EnsembleBackbone:
    """One backbone over the members' distinct backbones: decode once, each its own crop
    (catalens.embed.multi), each computed once however many members use it."""
    distinct, parts = distinct_backbones(members)
    joint = multi_backbone(distinct)
    name = "ensemble(" + "+".join(b.name + (f" tta:{','.join(b.views)}" if getattr(b, "views", None) else "")
                                  for b in distinct) + ")"   # a TTA member is named apart from its plain backbone
    return EnsembleBackbone(name, "ensemble", joint.module, joint.preprocess, "members",
                            tuple(b.fingerprint() for b in distinct), tuple(parts))


# ----------------------------------------------------------------------------- heads
class EnsembleHead:
    """Weighted mean of the member heads' probabilities over side-by-side features: ``dims`` the
    widths of the distinct backbones' blocks, ``parts`` the blocks each member reads (default: its own)."""

    def __init__(self, heads: list, dims: list[int], weights: list[float], tasks: list[TaskInfo],
                 parts: list[tuple[int, ...]] | None = None) -> None:
        self.heads, self.dims, self.weights, self.tasks = heads, dims, weights, tasks
        self.parts = [(i,) for i in range(len(heads))] if parts is None else [tuple(p) for p in parts]

    @property
    def classes_(self) -> dict[str, list[str]]:
        return {t.name: list(t.classes) for t in self.tasks}

    def split(self, X: np.ndarray) -> list[np.ndarray]:
        """Per member, its features ``(n, D_member)`` out of the side-by-side row ``(n, sum dims)``."""
        if X.shape[1] != sum(self.dims):
            raise ValueError(f"ensemble features have {X.shape[1]} columns, expected {sum(self.dims)} "
                             f"({' + '.join(map(str, self.dims))})")
        blocks = np.split(X, np.cumsum(self.dims)[:-1], axis=1)
        return [blocks[p[0]] if len(p) == 1 else np.hstack([blocks[i] for i in p]) for p in self.parts]

    def predict_proba(self, X: np.ndarray) -> dict[str, np.ndarray]:
        parts = [h.predict_proba(x) for h, x in zip(self.heads, self.split(X))]
        return average_probabilities(parts, self.weights, self.tasks)

    def predict(self, X: np.ndarray) -> dict[str, np.ndarray]:
        """Class tasks: label array ``(n,)``; tags: boolean decisions ``(n, T)`` (the decoder's)."""
        ans = Decoder(self.tasks).decode(self.predict_proba(X), top_k=1)
        return {**{k: np.asarray(v, dtype=object) for k, v in Decoder(self.tasks).labels(ans).items()},
                **ans.present}


def average_probabilities(parts: list[dict[str, np.ndarray]], weights: list[float],
                          tasks: list[TaskInfo]) -> dict[str, np.ndarray]:
    """``sum_i w_i * p_i`` per task (float32)."""
    out = {}
    for t in tasks:
        acc = np.zeros_like(parts[0][t.name], dtype=np.float32)
        for w, p in zip(weights, parts):
            acc += np.float32(w) * p[t.name].astype(np.float32)
        out[t.name] = acc
    return out


class EnsemblePixelModule(nn.Module):
    """Pixels → ``{task: weighted mean probabilities}`` in one graph (export, serving): each distinct
    backbone runs once on its input, each member's heads read its parts' features side by side."""

    def __init__(self, inputs: list[MemberInput], backbones: list[nn.Module], heads: list[nn.Module],
                 parts: list[tuple[int, ...]], weights: list[float]) -> None:
        super().__init__()
        self.inputs = nn.ModuleList(inputs)         # per distinct backbone
        self.backbones = nn.ModuleList(backbones)   # per distinct backbone
        self.heads = nn.ModuleList(heads)           # per member: features -> {task: probabilities}
        self.parts = [tuple(int(i) for i in p) for p in parts]
        self.weights = [float(w) for w in weights]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = [b(f(x)) for f, b in zip(self.inputs, self.backbones)]   # [(n, D_j)]
        out: dict[str, torch.Tensor] = {}
        for w, p, h in zip(self.weights, self.parts, self.heads):
            x_m = feats[p[0]] if len(p) == 1 else torch.cat([feats[i] for i in p], dim=1)   # (n, D_member)
            for k, v in h(x_m).items():
                out[k] = out[k] + w * v if k in out else w * v
        return out


# ----------------------------------------------------------------------------- model
class EnsembleModel:
    """Several models as one; same interface as :class:`~catalens.model.single.CatalensModel`."""

    def __init__(self, members: list, weights=None, meta: dict | None = None,
                 names: list[str] | None = None) -> None:
        if len(members) < 1:
            raise EnsembleError("an ensemble needs at least one model")
        check_compatible(members, names)
        self.members = members
        self.weights = normalise_weights(weights, len(members))
        self.tasks = _shared_tasks(members)
        self.backbone = composite_backbone(members)
        self.head = EnsembleHead([m.head for m in members], self.backbone.module.dims, self.weights, self.tasks,
                                 list(self.backbone.member_parts))
        self.meta = dict(meta or {})
        self.meta.setdefault("backbone", self.backbone.describe())
        self.meta.setdefault("tasks", [t.to_dict() for t in self.tasks])
        self.meta.setdefault("hierarchy_paths", _union_paths(members))

    @property
    def preprocess(self) -> Preprocess:
        return self.backbone.preprocess

    @property
    def decoder(self) -> Decoder:
        """Probabilities → answers. Titles are fused per member inside
        :meth:`predict_proba_features`, so the decoder itself fuses none."""
        return Decoder.from_meta(self.tasks, self.meta, None)

    @property
    def text(self) -> list | None:
        """The members' title models (``catalens train --text``), or None when no member has one."""
        texts = [getattr(m, "text", None) for m in self.members]
        return texts if any(t is not None for t in texts) else None

    def predict_proba_features(self, features: np.ndarray, texts=None) -> dict[str, np.ndarray]:
        """Weighted mean of the members' probabilities of side-by-side ``features``; with ``texts``
        (a title per row, None where a row has none) each member with a title model first fuses
        the titles with its own image probabilities, as it does on its own."""
        if texts is None or self.text is None:
            return self.head.predict_proba(features)
        parts = [m.predict_proba_features(x, texts=texts) for m, x in zip(self.members, self.head.split(features))]
        return average_probabilities(parts, self.weights, self.tasks)

    def predict_proba_images(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Probabilities of decoded pixels ``(n, S, S, 3)`` uint8 at :attr:`preprocess`."""
        x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float()
        with torch.inference_mode():
            feats = self.backbone.module(x).numpy()
        return self.predict_proba_features(feats)

    def pixel_module(self) -> EnsemblePixelModule:
        joint = self.backbone.module   # ConcatExtractor over the distinct backbones (materialised)
        heads = [m.probability_net() for m in self.members]   # per member: its features -> probabilities
        return EnsemblePixelModule(list(joint.inputs), list(joint.members), heads, list(self.backbone.member_parts),
                                   self.weights).eval()

    # ------------------------------------------------------------ persistence
    def save(self, folder: str | Path, sources: list[str | Path] | None = None) -> Path:
        """Write the ensemble folder: members copied from ``sources`` (their folders) or saved anew."""
        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp-ensemble")
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "members").mkdir(parents=True)
        rel = []
        for i, m in enumerate(self.members):
            dst = tmp / "members" / str(i)
            if sources is not None:
                shutil.copytree(Path(sources[i]), dst, ignore=shutil.ignore_patterns(".finetune", "*.tmp*"))
            else:
                m.save(dst)
            rel.append(f"members/{i}")
        meta = dict(self.meta)
        meta.update(format=FORMAT, backbone=self.backbone.describe(), tasks=[t.to_dict() for t in self.tasks],
                    versions=package_versions(), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        meta["ensemble"] = {"members": rel, "weights": self.weights,
                            "member_backbones": [m.backbone.name for m in self.members],
                            "sources": [str(s) for s in sources] if sources is not None else None}
        (tmp / "model.json").write_text(json.dumps(meta, indent=1, default=str))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
        return folder

    @classmethod
    def load(cls, folder: str | Path, description: ModelDescription | None = None) -> "EnsembleModel":
        """Read an ensemble folder (its members are loaded and checked like any model folder)."""
        folder = Path(folder)
        desc = description or read_description(folder)
        if not desc.is_ensemble:
            raise ModelError(f"'{folder / 'model.json'}' describes no ensemble members")
        meta = desc.model_dump(mode="json")
        root = folder.resolve()
        paths = []
        for p in desc.ensemble.members:
            member = (folder / p).resolve()
            if root not in member.parents or member.parent.name != MEMBERS_DIR:
                raise ModelError(f"'{folder / 'model.json'}': member path {p!r} leaves the ensemble folder; "
                                 f"members live in {MEMBERS_DIR}/N")
            paths.append(folder / p)
        members = [CatalensModel.load(p) for p in paths]
        model = cls(members, desc.ensemble.weights, meta, names=[str(p) for p in paths])
        # tag thresholds saved at the top level are authoritative
        model.tasks = desc.task_infos()
        model.head.tasks = model.tasks
        return model


def _shared_tasks(members: list) -> list[TaskInfo]:
    """Tasks of the first member; tags thresholds averaged over the members."""
    out = []
    for t in members[0].tasks:
        d = TaskInfo.from_dict(t.to_dict())
        if t.kind == "tags":
            ths = [next(x for x in m.tasks if x.name == t.name).threshold_array() for m in members]
            d.thresholds = [float(v) for v in np.mean(ths, axis=0)]
        out.append(d)
    return out


def _union_paths(members: list) -> dict:
    out: dict[str, list] = {}
    for m in members:
        for chain, paths in (m.meta.get("hierarchy_paths") or {}).items():
            seen = {tuple(p) for p in out.get(chain, [])}
            out.setdefault(chain, []).extend(p for p in paths if tuple(p) not in seen)
    return out


def build_ensemble(model_dirs: list[str | Path], out: str | Path, weights=None, log=None,
                   flags=None) -> EnsembleModel:
    """``catalens ensemble``: load, check, and write one ensemble folder. ``flags``: a function of
    the ensemble returning model.json entries to add before it is written (``catalens ensemble``
    passes :func:`catalens.train.flags.ensemble_flags`: accept and unknown thresholds)."""
    log = log or logger.info
    dirs = [Path(d) for d in model_dirs]
    models = [CatalensModel.load(d) for d in dirs]
    ens = EnsembleModel(models, weights, {"metrics": {}}, names=[str(d) for d in dirs])
    if flags is not None:
        ens.meta.update(flags(ens))
    ens.save(out, sources=dirs)
    log(f"ensemble of {len(models)} models ({', '.join(m.backbone.name for m in models)}; weights "
        f"{', '.join(f'{w:.3g}' for w in ens.weights)}) written to {out}")
    return ens
