"""The self-describing model folder every later stage reads.

::

    MODEL/
      model.json          format, backbone (name, arch, preprocess, weights origin), tasks
                          (kind, class order, parent, thresholds), hierarchy paths seen in
                          training, validation metrics, package versions, creation time
      backbone.safetensors  the backbone's weights (the folder needs no download to load)
      head.safetensors    the heads' weights;  head.json  their hyper-parameters and history
      config.yaml         the resolved run configuration
      text/               optional title model (catalens train --text): vectorizer.json (vocabulary,
                          idf), title_model.safetensors (weights), title_model.json, fusion.json
      ingest/             problems.csv, class_counts.json, split.csv (when catalens made the split)

Predictor, evaluator, exporter and server read this; none of them re-declares any of it.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from torch import nn

from catalens.embed.backbones import Backbone, backbone_from_description
from catalens.heads.estimator import MultiTaskHead
from catalens.heads.net import ProbabilityNet
from catalens.tasks import TaskInfo

FORMAT = "catalens-model/1"


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("catalens", "torch", "timm", "numpy", "pillow", "onnxruntime", "scikit-learn"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


class PixelModel(nn.Module):
    """Pixels ``(n, 3, S, S)`` in 0..255 → ``{task: probabilities}``: backbone + heads in one graph."""

    def __init__(self, backbone: nn.Module, head: ProbabilityNet) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(self.backbone(x))


@dataclass
class CatalensModel:
    """A trained model: backbone + multi-task head + everything that describes them."""

    backbone: Backbone
    head: MultiTaskHead
    meta: dict = field(default_factory=dict)
    text: object = None  # catalens.text.TextFusion: title model fused with the head (None = image only)

    @property
    def tasks(self) -> list[TaskInfo]:
        return self.head.tasks

    @property
    def preprocess(self):
        return self.backbone.preprocess

    def predict_proba_features(self, features: np.ndarray, texts=None) -> dict[str, np.ndarray]:
        """Task probabilities from backbone features ``(n, D)``; with a title model and ``texts``
        (one title or None per row), fused with the titles (rows without one: image only)."""
        probs = self.head.predict_proba(features)
        if self.text is not None and texts is not None:
            probs = self.text.fuse(probs, texts)
        return probs

    def pixel_module(self) -> PixelModel:
        """One torch module from pixels to probabilities (for export and serving)."""
        kinds = {t.name: t.kind for t in self.tasks}
        return PixelModel(self.backbone.module, ProbabilityNet(self.head._check_fitted(), kinds)).eval()

    def save(self, folder: str | Path) -> Path:
        """Write the folder atomically (into a temporary sibling, then renamed)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        state = {k: v.contiguous() for k, v in self.backbone.module.net.state_dict().items()}
        save_file(state, str(tmp / "backbone.safetensors"))
        self.head.save(tmp)
        if self.text is not None:
            self.text.save(tmp / "text")
        meta = dict(self.meta)
        meta.update(format=FORMAT, backbone=self.backbone.describe(),
                    tasks=[t.to_dict() for t in self.tasks], versions=package_versions(),
                    created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        (tmp / "model.json").write_text(json.dumps(meta, indent=1, default=_jsonable))
        if folder.exists():
            keep = [p for p in folder.iterdir() if p.name not in {"model.json", "backbone.safetensors",
                                                                 "head.safetensors", "head.json", "text"}]
            for p in keep:  # reports, ingest files, config written earlier stay
                if not (tmp / p.name).exists():
                    shutil.move(str(p), tmp / p.name)
            old = folder.with_name(folder.name + f".old{os.getpid()}")
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old)
        else:
            tmp.rename(folder)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "CatalensModel":
        """Read a model folder written by :meth:`save` (weights via safetensors, no pickle)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        path = folder / "model.json"
        if not path.exists():
            raise FileNotFoundError(f"'{folder}' is not a catalens model folder (no model.json); "
                                    f"create one with 'catalens train DATA --out {folder}'")
        meta = json.loads(path.read_text())
        if meta.get("ensemble"):  # several member folders acting as one (catalens.ensemble)
            from catalens.ensemble import EnsembleModel

            return EnsembleModel.load(folder)
        if meta.get("format") != FORMAT:
            raise ValueError(f"'{path}' has format {meta.get('format')!r}; this catalens reads {FORMAT}")
        backbone = backbone_from_description(meta["backbone"], load_file(str(folder / "backbone.safetensors")))
        head = MultiTaskHead.load(folder)
        # thresholds and classes in model.json are authoritative (tuned after fitting)
        head.tasks = [TaskInfo.from_dict(t) for t in meta["tasks"]]
        model = cls(backbone, head, meta)
        if (folder / "text" / "fusion.json").exists():
            from catalens.text.fusion import TextFusion

            model.text = TextFusion.load(folder / "text")
        if meta.get("tta"):  # test-time augmentation: the backbone averages features over views
            from catalens.tta import apply_model_tta

            apply_model_tta(model)
        return model


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
