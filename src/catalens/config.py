"""One typed configuration for a run; defaults live here and nowhere else.

Precedence: defaults < ``--config FILE`` (YAML) < command-line flags and ``--set a.b=v``.
Unknown keys are rejected with the list of valid ones; the resolved config is saved in
every model folder as ``config.yaml``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


def default_cache_dir() -> str:
    base = os.environ.get("CATALENS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "catalens")
    return os.path.join(base, "embeddings")


def check_box(box) -> tuple[float, float, float, float]:
    """A crop box ``(x0, y0, x1, y1)`` as fractions, ``0 <= x0 < x1 <= 1`` (same for y); else ValueError."""
    ok = (box is not None and len(box) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                     for v in box))
    if ok:
        x0, y0, x1, y1 = (float(v) for v in box)
        ok = 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    if not ok:
        raise ValueError(f"crop box {box!r} must be 4 fractions [x0, y0, x1, y1] of the photo's width and "
                         f"height with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, e.g. [0.1, 0.0, 0.9, 1.0]")
    return x0, y0, x1, y1


def parse_input_size(value) -> int | tuple[int, int]:
    """An input size: ``224`` (a square side) or ``"256x192"`` / ``[256, 192]`` (height x width, as
    torch's ``(n, 3, H, W)``), each side a whole number of pixels from 32 to 1024; else ValueError."""
    given = value
    if isinstance(value, str):
        parts = value.lower().replace("×", "x").split("x")
        value = [int(p) for p in parts] if all(p.strip().isdigit() for p in parts) else None
        value = value[0] if value is not None and len(value) == 1 else value
    sides = [value] if isinstance(value, int) else list(value) if isinstance(value, (list, tuple)) else []
    ok = len(sides) in (1, 2) and all(isinstance(v, int) and not isinstance(v, bool) and 32 <= v <= 1024
                                        for v in sides)
    if not ok:
        raise ValueError(f"input size {given!r}: expected a side (e.g. 256) or HEIGHTxWIDTH (e.g. 256x192), "
                         f"whole pixels from 32 to 1024")
    return sides[0] if len(sides) == 1 or sides[0] == sides[1] else (sides[0], sides[1])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class BackboneConfig(_Strict):
    name: str = "efficientnet_lite0"
    weights: str | None = None          # a checkpoint file, "random", or None (registry/hub weights)
    image_size: int | str | None = None  # input side or "HEIGHTxWIDTH"; None = the backbone's own (lite0 224)
    crop_pct: float | None = Field(None, gt=0, le=1)      # centre crop share of the resized short side;
    #                                                       None = the backbone's own (0.875); 1.0 = no crop
    crop: Literal["center", "pad", "squish", "box"] = "center"  # how the square input is cut (docs/recipes.md)
    box: list[float] | None = None     # crop box: [x0, y0, x1, y1] fractions of width/height
    pool: Literal["avg", "gem", "multilevel"] = "avg"  # feature map -> vector (docs/recipes.md "Pooling")

    @field_validator("image_size", mode="before")
    @classmethod
    def _image_size(cls, v):
        if v is None:
            return None
        size = parse_input_size(v)
        return size if isinstance(size, int) else f"{size[0]}x{size[1]}"

    @model_validator(mode="after")
    def _box_with_crop(self):
        if self.crop == "box":
            if self.box is None:
                raise ValueError("crop 'box' needs box: [x0, y0, x1, y1] (fractions), e.g. box=[0.1,0,0.9,1]")
            check_box(self.box)
        elif self.box is not None:
            raise ValueError(f"box is only used with crop 'box' (crop is '{self.crop}'): set backbone.crop=box")
        return self


class EngineSettings(_Strict):
    batch_size: int = Field(64, ge=1, le=65536)
    workers: int | None = Field(None, ge=0, le=4096)   # decode threads / processes; None = sized from the cores
    decode: Literal["auto", "threads", "processes"] = "auto"  # auto: threads up to 4 cores (docs/engine.md)
    runtime: str = "auto"                     # auto | eager | onnx | compile | bf16 | cuda | cuda-bf16
    threads: int | None = Field(None, ge=1, le=4096)
    progress: bool = True


class HeadConfig(_Strict):
    type: str = "linear"                # see catalens.heads.HEADS
    hidden: int = Field(0, ge=0, le=65536)  # >0: one hidden layer of this width (type mlp)
    dropout: float = Field(0.0, ge=0, lt=1)
    epochs: int = Field(300, ge=1)
    batch_size: int = Field(256, ge=1, le=1 << 20)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    patience: int = Field(25, ge=1)     # epochs without validation improvement before stopping
    loss_weights: dict[str, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)  # per task; default 1.0
    class_weighting: Literal["none", "balanced", "sqrt"] = "none"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    focal_gamma: float = Field(0.0, ge=0)  # >0: focal loss for class tasks
    scaling: Literal["global", "feature", "none"] = "global"  # input scaling learnt from training features
    sampler: Literal["none", "balanced", "sqrt"] = "none"  # per-epoch class-balanced sampling (leaf class task)
    max_per_class: int = Field(0, ge=0)  # >0: each epoch draws at most this many rows of any class (down-sampling)
    schedule: Literal["onecycle", "cosine", "step", "plateau"] = "onecycle"  # learning-rate schedule
    step_epochs: int = Field(0, ge=0)   # schedule step: lr x gamma every this many epochs (0 = a third of them)
    gamma: float = Field(0.1, gt=0, le=1)
    plateau_patience: int = Field(5, ge=0)  # schedule plateau: epochs without val improvement before lr x factor
    plateau_factor: float = Field(0.5, gt=0, lt=1)
    C: float = Field(0.1, gt=0)         # type logreg: inverse L2 strength (scikit-learn's C; penalty |W|^2/(2 C n))


class FinetuneConfig(_Strict):
    """Fine-tuning the backbone (``catalens train --finetune blocks|all``); see docs/finetune.md."""

    mode: Literal["none", "blocks", "all"] = "none"
    blocks: int = Field(1, ge=0)        # mode blocks: last N stages (+ conv head) trained; 0 = head only
    epochs: int = Field(6, ge=1)        # 1 stage x 3 views x 6 epochs: the measured fast recipe (docs/finetune.md)
    lr: float = Field(0.01, gt=0)       # head learning rate; the backbone gets lr * backbone_lr_mult
    backbone_lr_mult: float = Field(0.1, gt=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-5, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    schedule: Literal["onecycle", "cosine", "step", "plateau"] = "cosine"  # learning-rate schedule
    step_epochs: int = Field(0, ge=0)   # schedule step: lr x gamma every this many epochs (0 = a third of them)
    gamma: float = Field(0.1, gt=0, le=1)
    plateau_patience: int = Field(1, ge=0)  # schedule plateau: epochs without val improvement before lr x factor
    plateau_factor: float = Field(0.5, gt=0, lt=1)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    batch_size: int = Field(32, ge=1, le=65536)
    views: int | None = Field(None, ge=0)   # augmented views precomputed through the frozen part;
    #                                         0 = augment online every epoch; None = 3 on CPU, 0 on GPU
    scale_min: float = Field(0.5, gt=0, le=1)  # random resized crop: smallest area fraction
    hflip: bool = True
    jitter: float = Field(0.2, ge=0, lt=1)     # brightness / contrast / saturation jitter
    mixup: float = Field(0.0, ge=0)     # mixup alpha of the trained part's input (0 = off); catalens/train/mixing.py
    cutmix: float = Field(0.0, ge=0)    # CutMix alpha (0 = off); both on: half of the batches each
    progressive: float = Field(0.0, ge=0, lt=1)  # progressive resizing: input scale of epoch 1, growing to 1 (0 = off)
    channels_last: bool = True
    compile: Literal["auto", "on", "off"] = "auto"   # auto: on GPU only (measured slower on small CPUs)
    bf16: Literal["auto", "on", "off"] = "auto"      # auto: GPU, or CPUs with native bf16 (avx512_bf16/amx)
    workers: int | None = Field(None, ge=0)          # augmentation processes; None = spare cores
    tta: list[str] = Field(default_factory=list)     # stored in the model: e.g. [hflip] (see catalens.model.tta)
    keep_work: bool = False             # keep the checkpoint / view folder after success
    resume: Literal["auto", "require", "off"] = "auto"  # auto: resume a matching checkpoint in OUT/.finetune


class ClassSelection(_Strict):
    """Which classes of one class task to train on (catalens/train/classes.py); counts on the train split."""

    include: list[str] | None = None    # only these classes
    exclude: list[str] = Field(default_factory=list)  # never these (e.g. "Not sure", "Others")
    min_count: int = Field(0, ge=0)     # only classes with at least this many training photos
    top_n: int = Field(0, ge=0)         # only the N classes with most training photos (0 = all)


class DataConfig(_Strict):
    val_fraction: float = Field(0.15, gt=0, lt=1)   # carved from train when no val split exists
    test_fraction: float = Field(0.15, ge=0, lt=1)  # only when the data has no split at all
    min_class_count: int = Field(3, ge=1)           # fewer training images: reported as too small
    strict: bool = False                            # any image problem is fatal
    max_pixels: int = Field(89_478_485, ge=1)       # decompression-bomb limit
    classes: dict[str, ClassSelection] = Field(default_factory=dict)  # per class task: include/exclude/min_count/top_n
    refit_full: bool = False  # once val decided everything, fit the head (+ title model) again on train + val


class TextConfig(_Strict):
    """Product titles (``catalens train --text``): a title model fused with the image head; see docs/recipes.md."""

    enabled: bool = False
    model: Literal["logreg", "nb"] = "logreg"   # TF-IDF + logistic regression, or word counts + Naive Bayes
    ngram: list[int] = Field(default_factory=lambda: [1, 2], min_length=2, max_length=2)  # word n-grams
    char_ngram: list[int] | None = Field(default_factory=lambda: [2, 5])  # character n-grams; null = none
    max_features: int | None = Field(50_000, ge=1)  # per analyzer (words, characters)
    min_df: int = Field(1, ge=1)
    C: float = Field(30.0, gt=0)                 # inverse L2 strength of the logistic regression
    alpha: float = Field(0.1, gt=0)              # Naive Bayes smoothing
    max_iter: int = Field(100, ge=1)             # L-BFGS iterations

    @field_validator("ngram", "char_ngram")
    @classmethod
    def _ngram_range(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) != 2 or v[0] < 1 or v[0] > v[1]):
            raise ValueError("an n-gram range is [lo, hi] with 1 <= lo <= hi, e.g. [1, 2]")
        return v


class KFoldConfig(_Strict):
    """``catalens train --folds K``: cross-validation over train+val, split by product."""

    folds: int = Field(0, ge=0)                  # 0 = off; otherwise >= 2
    inner_val_fraction: float = Field(0.1, gt=0, lt=1)  # of each fold's training products, for early stopping

    @field_validator("folds")
    @classmethod
    def _not_one(cls, v: int) -> int:
        if v == 1:
            raise ValueError("1 fold is no cross-validation: use 0 (off) or K >= 2, e.g. --folds 5")
        return v


class SelectiveConfig(_Strict):
    """Decisions stored in the model at training: auto-accept thresholds per class task
    (``<task>_accept``, ``catalens train --target-precision``) and the unknown-product flag."""

    target_precision: float = Field(0.98, gt=0, lt=1)
    bound_confidence: float = Field(0.95, gt=0, lt=1)  # one-sided Clopper-Pearson confidence
    shift_margin: float = Field(2.0, ge=0)  # threshold >= 1 - (1 - target) / margin (0 = no floor)
    oof_below: int = Field(1000, ge=0)   # val has fewer labelled photos: add out-of-fold train photos (0 = never)
    folds: int = Field(5, ge=2)          # folds of those out-of-fold probabilities
    unknown_method: Literal["msp", "entropy", "margin"] = "entropy"  # see catalens.model.unknown
    unknown_keep: float = Field(0.95, gt=0, le=1)  # share of validation photos not flagged unknown


class PresetConfig(_Strict):
    """``catalens train --preset fast|medium|best [--time-limit 20m]`` (catalens/train/presets/)."""

    name: Literal["fast", "medium", "best"] = "fast"   # fast: the plain catalens train
    time_limit: float | None = Field(None, gt=0)        # seconds; None = 600 (medium) / 1200 (best)
    folds: int = Field(5, ge=2)                          # K of the cross-validation that scores each recipe
    titles: Literal["auto", "on", "off"] = "auto"        # auto: learn from titles when the data has them
    finetune: bool = True                                # best: score a last-stage fine-tuned Lite0 when it fits
    finetune_folds: int = Field(2, ge=2)                 # K of the CV that scores the fine-tuned recipe (K fine-tunings)
    refit_full: bool = True                              # the chosen frozen recipes end with data.refit_full
    # auto: decode label paths (hierarchy_decoding) when it raises the chosen blend's out-of-fold score
    hierarchy_decoding: Literal["auto", "on", "off"] = "auto"

    @field_validator("titles", "hierarchy_decoding", mode="before")
    @classmethod
    def _yaml_on_off(cls, v):
        """``--set preset.titles=off`` (and ``titles: off`` in YAML) reads as a boolean: take it as meant."""
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class Config(_Strict):
    """The whole run configuration."""

    seed: int = Field(0, ge=0)
    cache_dir: str = Field(default_factory=default_cache_dir)
    top_k: int = Field(5, ge=1)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    head: HeadConfig = Field(default_factory=HeadConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    kfold: KFoldConfig = Field(default_factory=KFoldConfig)
    selective: SelectiveConfig = Field(default_factory=SelectiveConfig)
    preset: PresetConfig = Field(default_factory=PresetConfig)
    hierarchy_decoding: bool = False               # predict the most probable path seen in training
    tracking: bool = True                           # log runs to MLflow when it is installed

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _errors_text(e: ValidationError, origin: str) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            parent = _section(err["loc"][:-1])
            lines.append(f"  {loc}: unknown key; valid keys here: {', '.join(parent.model_fields)}")
        else:
            lines.append(f"  {loc}: {err['msg']} (got {err.get('input')!r}{_default_hint(err['loc'])})")
    return f"invalid configuration from {origin}:\n" + "\n".join(lines)


def _default_hint(loc: tuple) -> str:
    """``"; default 0.003"`` for a key with a plain default: the value to go back to."""
    field = _section(loc[:-1]).model_fields.get(str(loc[-1])) if loc else None
    if field is None or field.default_factory is not None or isinstance(field.default, BaseModel):
        return ""
    return f"; default {field.default!r}"


def _section(loc: tuple) -> type[BaseModel]:
    model: type[BaseModel] = Config
    for key in loc:
        field = model.model_fields.get(str(key))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return model
        model = field.annotation
    return model


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict:
    """``"head.lr=0.01"`` → ``{"head": {"lr": 0.01}}`` (the value parsed as YAML)."""
    if "=" not in text:
        raise ValueError(f"--set expects KEY=VALUE such as head.lr=0.01; got '{text}'")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ValueError(f"--set {text}: the value is not valid YAML ({_yaml_problem(e)}); quote it, "
                         f"e.g. --set 'KEY=\"...\"'") from None
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line, with the position when known."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or type(e).__name__}{where}"


def load_config(path: str | Path | None = None, overrides: list[dict] | None = None) -> Config:
    """Defaults < file < overrides (each a nested dict); raises ValueError naming bad keys."""
    data: dict = {}
    origin = "defaults"
    if path:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"config file '{p}' does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file '{p}' is not valid YAML: {_yaml_problem(e)}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"config file '{p}' must hold a mapping of keys (seed, backbone, head, ...)")
        data, origin = raw, f"'{p}'"
    for o in overrides or []:
        data = _deep_merge(data, o)
        origin = f"{origin} + command line" if "command line" not in origin else origin
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ValueError(_errors_text(e, origin)) from None
