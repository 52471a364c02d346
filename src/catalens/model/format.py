"""The model folder format, written down once.

::

    MODEL/
      model.json            the typed description (:class:`ModelDescription`): format, backbone
                            (name, arch, preprocess, weights origin), tasks (kind, class order,
                            parent, thresholds), hierarchy paths seen in training, decoding
                            options, validation metrics, package versions, creation time
      backbone.safetensors  the backbone's weights (the folder needs no download to load)
      head.safetensors      the heads' weights;  head.json  their hyper-parameters and history
      history.json          the typed per-epoch training history (:class:`TrainingHistory`) of the
                            stage that produced the weights: loss, accuracy per class task, lr
                            (optional: folders written before it load without it)
      config.yaml           the resolved run configuration
      text/                 optional title model (catalens train --text): vectorizer.json,
                            title_model.safetensors, title_model.json, fusion.json
      members/N/            ensembles only: each member a complete model folder
      ingest/               problems.csv, class_counts.json, split.csv

This module imports neither torch nor the heads: the server, the ONNX predictor and the
decoder read descriptions through it without paying for torch.
"""
from __future__ import annotations

import json
import math
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from catalens.tasks import TaskInfo, hierarchy_levels

FORMAT = "catalens-model/1"
DESCRIPTION_FILE = "model.json"
BACKBONE_FILE = "backbone.safetensors"
HEAD_FILE = "head.safetensors"
HEAD_JSON = "head.json"
TEXT_DIR = "text"
FUSION_FILE = "fusion.json"
MEMBERS_DIR = "members"
HISTORY_FILE = "history.json"
HISTORY_FORMAT = "catalens-history/1"
#: what :meth:`CatalensModel.save` owns in a folder (anything else there is kept on re-save)
WEIGHT_FILES = frozenset({DESCRIPTION_FILE, BACKBONE_FILE, HEAD_FILE, HEAD_JSON, TEXT_DIR, HISTORY_FILE})
#: bound on a class list (a tampered model.json fails at load, not at predict; the folder's other
#: checks, preprocess sizes included, are in catalens.model.validate)
MAX_CLASSES = 100_000


class ModelError(ValueError):
    """A folder that is not a usable catalens model (missing, tampered, inconsistent)."""


class TaskDescription(BaseModel):
    """One task as model.json stores it (see :class:`catalens.tasks.TaskInfo`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    kind: str
    classes: list[str] = Field(min_length=1, max_length=MAX_CLASSES)
    parent: str | None = None
    thresholds: list[float] | None = None
    extra: dict = Field(default_factory=dict)

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        if v not in ("class", "tags"):
            raise ValueError(f"kind must be 'class' or 'tags', got {v!r}")
        return v

    def info(self) -> TaskInfo:
        return TaskInfo(self.name, self.kind, list(self.classes), self.parent,
                        None if self.thresholds is None else list(self.thresholds), dict(self.extra))


class EnsembleDescription(BaseModel):
    """The ``ensemble`` entry of an ensemble's model.json."""

    members: list[str] = Field(min_length=1)
    weights: list[float]
    member_backbones: list[str] = Field(default_factory=list)
    sources: list[str] | None = None


class AcceptDescription(BaseModel):
    """The ``accept`` entry: per class task, the probability from which its answer is
    auto-accepted (``<task>_accept``), chosen to reach ``target_precision`` with a one-sided
    Clopper-Pearson bound at ``bound_confidence`` and never under ``1 - (1 - target) /
    shift_margin`` (:mod:`catalens.evaluate.selective`). A task
    whose threshold is None accepts nothing (no threshold reached the target)."""

    model_config = ConfigDict(extra="allow")

    target_precision: float = Field(gt=0, lt=1)
    bound_confidence: float = Field(gt=0, lt=1)
    shift_margin: float = Field(0.0, ge=0)
    source: str                                      # "val", or "val + out-of-fold train (K folds)"
    thresholds: dict[str, float | None]
    chosen_on: dict[str, dict] = Field(default_factory=dict)  # per task: coverage, precision, lower_bound, n


class UnknownDescription(BaseModel):
    """The ``unknown`` entry: how ``unknown_score`` is computed from the probabilities
    (:mod:`catalens.model.unknown`) and the score above which a photo is flagged ``unknown``
    (the ``keep`` quantile of validation photos)."""

    model_config = ConfigDict(extra="allow")

    method: str
    tasks: list[str] = Field(min_length=1)
    threshold: float
    keep: float = Field(gt=0, le=1)


def _known_format(v: str, expected: str) -> str:
    """A file's ``format`` field, refused unless it is the one this catalens reads."""
    if v != expected:
        raise ValueError(f"format {v!r} is not one this catalens reads ({expected})")
    return v


class ModelDescription(BaseModel):
    """model.json, typed. Unknown keys (training notes such as ``ingest`` or ``finetune``) are
    kept as they are; the keys every reader relies on are checked here, once."""

    model_config = ConfigDict(extra="allow")

    format: str
    backbone: dict
    tasks: list[TaskDescription] = Field(min_length=1)
    hierarchy_paths: dict[str, list[list[str]]] = Field(default_factory=dict)
    hierarchy_decoding: bool = False
    tta: list[str] = Field(default_factory=list)
    ensemble: EnsembleDescription | None = None
    metrics: dict = Field(default_factory=dict)
    data: str | None = None
    created: str | None = None
    versions: dict = Field(default_factory=dict)
    accept: AcceptDescription | None = None
    unknown: UnknownDescription | None = None

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        return _known_format(v, FORMAT)

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[TaskDescription]) -> list[TaskDescription]:
        names = [t.name for t in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"task names repeat: {dup}")
        for t in v:
            if t.kind == "tags" and t.thresholds is not None and len(t.thresholds) != len(t.classes):
                raise ValueError(f"task '{t.name}': {len(t.thresholds)} thresholds for {len(t.classes)} tags")
            if len(set(t.classes)) != len(t.classes):
                raise ValueError(f"task '{t.name}': class names repeat")
        hierarchy_levels([t.info() for t in v])  # a parent that is missing or a cycle raises here
        return v

    @model_validator(mode="after")
    def _flags_name_class_tasks(self) -> "ModelDescription":
        kinds = {t.name: t.kind for t in self.tasks}
        named = list((self.accept.thresholds if self.accept else {}).keys()) + (self.unknown.tasks if self.unknown else [])
        bad = sorted({n for n in named if kinds.get(n) != "class"})
        if bad:
            raise ValueError(f"accept/unknown name {bad}, which are not class tasks of this model")
        if self.unknown is not None:
            from catalens.model.unknown import METHODS

            if self.unknown.method not in METHODS:
                raise ValueError(f"unknown.method {self.unknown.method!r} is not one of {sorted(METHODS)}")
        return self

    def task_infos(self) -> list[TaskInfo]:
        return [t.info() for t in self.tasks]

    @property
    def is_ensemble(self) -> bool:
        return self.ensemble is not None

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=False), indent=1)


class EpochRecord(BaseModel):
    """One epoch of training. Train numbers are running means over the epoch's batches (training
    mode: dropout, augmentation); val numbers are measured on the validation split after the epoch.
    ``lr``: the heads' learning rate at the epoch's last step. Accuracies: per class task."""

    model_config = ConfigDict(extra="forbid")

    epoch: int = Field(ge=1)
    train_loss: float | None = None
    val_loss: float | None = None
    lr: float | None = Field(None, ge=0)
    train_accuracy: dict[str, float] = Field(default_factory=dict)
    val_accuracy: dict[str, float] = Field(default_factory=dict)
    seconds: float | None = None


class TrainingHistory(BaseModel):
    """history.json: the per-epoch history of the stage whose weights the folder holds
    (``heads``: the heads on cached features; ``finetune``: ``catalens train --finetune``)."""

    model_config = ConfigDict(extra="forbid")

    format: str = HISTORY_FORMAT
    stage: str
    best_epoch: int | None = None
    epochs: list[EpochRecord]

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        return _known_format(v, HISTORY_FORMAT)

    @field_validator("stage")
    @classmethod
    def _stage(cls, v: str) -> str:
        if v not in ("heads", "finetune"):
            raise ValueError(f"stage must be 'heads' or 'finetune', got {v!r}")
        return v

    @model_validator(mode="after")
    def _ordered(self) -> "TrainingHistory":
        numbers = [e.epoch for e in self.epochs]
        if numbers != sorted(set(numbers)):
            raise ValueError(f"epochs must be increasing and unique, got {numbers[:10]}")
        return self

    @classmethod
    def from_rows(cls, rows: list[dict], stage: str, best_epoch: int | None = None) -> "TrainingHistory":
        """From the heads' (or fine-tuning's) ``history_`` rows; non-finite numbers become None."""
        def num(v):
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None

        def accs(v):
            return {str(k): float(a) for k, a in (v or {}).items() if num(a) is not None}

        epochs = [EpochRecord(epoch=int(r["epoch"]), train_loss=num(r.get("train_loss")),
                              val_loss=num(r.get("val_loss")), lr=num(r.get("lr")),
                              train_accuracy=accs(r.get("train_accuracy_by_task")),
                              val_accuracy=accs(r.get("val_accuracy_by_task")), seconds=num(r.get("seconds")))
                  for r in rows]
        return cls(stage=stage, best_epoch=best_epoch, epochs=epochs)


def read_history(folder: str | Path) -> TrainingHistory | None:
    """The training history of a model folder; None when it has no history.json (older folders,
    ensembles); :class:`ModelError` naming the file and the field when it is broken."""
    from pydantic import ValidationError

    path = Path(folder) / HISTORY_FILE
    if not path.is_file():
        return None
    try:
        return TrainingHistory.model_validate_json(path.read_bytes())
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(x) for x in first["loc"]) or "(top level)"
        raise ModelError(f"'{path}': field '{field}': {first['msg']} ({e.error_count()} problem(s)); "
                         f"delete the file (the model still loads without it) or train again") from None


def description_path(folder: str | Path) -> Path:
    return Path(folder) / DESCRIPTION_FILE


def read_description(folder: str | Path) -> ModelDescription:
    """The validated description of a model folder; :class:`FileNotFoundError` when ``folder``
    is not a model folder, :class:`ModelError` naming the file and the field when it is broken."""
    folder = Path(folder)
    path = description_path(folder)
    if not path.is_file():
        what = "does not exist" if not folder.exists() else "is not a catalens model folder (no model.json)"
        raise FileNotFoundError(f"'{folder}' {what}; create a model with 'catalens train DATA --out {folder}'")
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"'{path}' is not valid JSON ({e}); the model folder is damaged: train it again") from None
    if not isinstance(raw, dict):
        raise ModelError(f"'{path}' holds {type(raw).__name__}, not a model description")
    return parse_description(raw, path)


def parse_description(raw: dict, where: str | Path = "model.json") -> ModelDescription:
    from pydantic import ValidationError

    try:
        return ModelDescription.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(x) for x in first["loc"]) or "(top level)"
        raise ModelError(f"'{where}': field '{field}': {first['msg']} ({e.error_count()} problem(s)); "
                         f"the model folder is damaged or from another tool: train it again") from None


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("catalens", "torch", "timm", "numpy", "pillow", "onnxruntime", "scikit-learn"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
