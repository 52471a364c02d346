"""The self-describing model folder every later stage reads.

::

    MODEL/
      model.json          format, backbone (name, arch, preprocess, weights origin), tasks
                          (kind, class order, parent, thresholds), hierarchy paths seen in
                          training, validation metrics, package versions, creation time
      backbone.safetensors  the backbone's weights (the folder needs no download to load)
      head.safetensors    the heads' weights;  head.json  their hyper-parameters and history
      history.json        the typed per-epoch training history (loss, accuracy per task, lr)
      config.yaml         the resolved run configuration
      text/               optional title model (catalens train --text): vectorizer.json (vocabulary,
                          idf), title_model.safetensors (weights), title_model.json, fusion.json
      ingest/             problems.csv, class_counts.json, split.csv (when catalens made the split)

Predictor, evaluator, exporter and server read this; none of them re-declares any of it.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from catalens.embed.backbones import Backbone, materialize
from catalens.embed.factory import backbone_from_description
from catalens.files import apply_umask_mode
from catalens.heads.estimator import MultiTaskHead
from catalens.heads.net import ProbabilityNet
from catalens.model.decode import Decoder, load_text
from catalens.model.format import (BACKBONE_FILE, FORMAT, HISTORY_FILE, TEXT_DIR, WEIGHT_FILES, ModelDescription,
                                   ModelError, TrainingHistory, package_versions, parse_description,
                                   read_description)
from catalens.tasks import TaskInfo


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

    @property
    def description(self) -> ModelDescription:
        """model.json, typed (validated; see :mod:`catalens.model.format`)."""
        return parse_description({**self.meta, "format": FORMAT, "backbone": self.backbone.describe(),
                                  "tasks": [t.to_dict() for t in self.tasks]})

    @property
    def decoder(self) -> Decoder:
        """Probabilities (+ titles) → answers, as every entry point decodes them."""
        return Decoder.from_meta(self.tasks, self.meta, self.text)

    def predict_proba_features(self, features: np.ndarray, texts=None) -> dict[str, np.ndarray]:
        """Task probabilities from backbone features ``(n, D)``; with a title model and ``texts``
        (one title or None per row), fused with the titles (rows without one: image only)."""
        return self.decoder.fuse(self.head.predict_proba(features), texts)

    def probability_net(self) -> ProbabilityNet:
        """The heads as one torch module: backbone features ``(n, D)`` → ``{task: probabilities}``."""
        return ProbabilityNet(self.head._check_fitted(), {t.name: t.kind for t in self.tasks})

    def pixel_module(self) -> PixelModel:
        """One torch module from pixels to probabilities (for export and serving)."""
        return PixelModel(materialize(self.backbone.module), self.probability_net()).eval()

    def save(self, folder: str | Path) -> Path:
        """Write the folder atomically (into a temporary sibling, then renamed)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        state = {k: v.contiguous() for k, v in self.backbone.module.net.state_dict().items()}
        save_file(state, str(tmp / BACKBONE_FILE))
        apply_umask_mode(tmp / BACKBONE_FILE)  # safetensors writes 0600 whatever the umask
        self.head.save(tmp)
        self._save_history(tmp)
        if self.text is not None:
            self.text.save(tmp / TEXT_DIR)
        meta = dict(self.meta)
        meta.update(format=FORMAT, backbone=self.backbone.describe(),
                    tasks=[t.to_dict() for t in self.tasks], versions=package_versions(),
                    created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        (tmp / "model.json").write_text(json.dumps(meta, indent=1, default=_jsonable))
        if folder.exists():
            keep = [p for p in folder.iterdir() if p.name not in WEIGHT_FILES]
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

    def _save_history(self, folder: Path) -> None:
        """``history.json`` from the head's per-epoch history (none when the head has no history)."""
        rows = getattr(self.head, "history_", None) or []
        if not rows:
            return
        stage = "finetune" if self.meta.get("finetune") else "heads"
        history = TrainingHistory.from_rows(rows, stage, getattr(self.head, "best_epoch_", None))
        (folder / HISTORY_FILE).write_text(history.model_dump_json(indent=1))

    @classmethod
    def load(cls, folder: str | Path, description: ModelDescription | None = None,
             lazy: bool = False) -> "CatalensModel":
        """Read a single-model folder written by :meth:`save` (safetensors, no pickle); the
        description is validated against the weights. :func:`catalens.model.load` also reads
        ensembles. ``lazy``: the backbone network is built only when something needs it (not
        when a remembered ONNX/OpenVINO runtime answers; its fingerprint is remembered per
        folder, weights file size and time, and model.json)."""
        from catalens.model.check import check_weights

        folder = Path(folder)
        desc = description or read_description(folder)
        if desc.is_ensemble:
            raise ModelError(f"'{folder}' holds an ensemble; load it with catalens.model.load()")
        meta = desc.model_dump(mode="json")
        backbone_state, head = check_weights(folder, desc)
        key = None
        if lazy and not desc.tta:   # test-time augmentation wraps the network at once
            import hashlib

            st = (folder / BACKBONE_FILE).stat()
            key = (f"{folder.resolve()}|{st.st_size}|{st.st_mtime_ns}|"
                   f"{hashlib.sha256((folder / 'model.json').read_bytes()).hexdigest()[:16]}")
        backbone = backbone_from_description(meta["backbone"], backbone_state, lazy_key=key)
        backbone.preprocess.decoder(source=f"model '{folder}'")  # warns once if its JPEG decoder is missing
        head.tasks = desc.task_infos()  # thresholds and classes in model.json are authoritative
        model = cls(backbone, head, meta)
        model.text = load_text(folder)
        if desc.tta:  # test-time augmentation: the backbone averages features over views
            from catalens.model.tta import apply_model_tta

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
