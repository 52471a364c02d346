"""The recipes a preset tries (:func:`candidate_recipes`) and what scoring one gives (:class:`Scored`).

A recipe is one way to train that ``catalens train`` already knows: a backbone spec, its crop and
pooling, a head, optional TTA, or the features of other recipes side by side (``+``). Its
:meth:`Recipe.config` is the run configuration that trains it, so a chosen recipe's model folder
is an ordinary one (its ``config.yaml`` trains it again).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from catalens.config import Config

#: the head of the frozen recipes but the plain one: logistic regression by L-BFGS (benchmarks/bench_heads.py),
#: its class tasks' targets smoothed by 0.1. 5-fold CV over train + val, the three backbones' features
#: (benchmarks/bench_logreg_smoothing.py): clothing-small 0.9229 against 0.9185 unsmoothed; fashion-products
#: articleType 0.9004 against 0.8958 (the mean over its tasks 0.9019 against 0.9022: the pattern tags' L-BFGS
#: stops a little earlier)
LOGREG = {"type": "logreg", "C": 0.1, "label_smoothing": 0.1}
#: relative cost per image of the offline backbones at their own side (Lite0 at 224 = 1)
_REL_COST = {"efficientnet_lite0": (224, 1.0), "efficientnet_lite1": (240, 1.5), "efficientnet_lite2": (260, 2.1)}
#: photos looked at to tell whether a data set's photos are all square (:func:`all_square`)
SQUARE_SAMPLE = 64
SEARCHED = "searched head"
#: the plain ``catalens train`` (``--preset fast``) as a recipe
PLAIN = "lite0 (plain catalens train)"
#: a head the search's second part found better than its first part's: a recipe of its own beside it
SEARCHED_MORE = "searched head, continued"
#: heads the preset's search tries first, after the best recipe's own; then Optuna's sampler proposes (the search
#: keeps the better; docs/presets.md). 5-fold CV over train + val on the three backbones' features: ``logreg`` at
#: a smaller C, seconds on clothing-small (0.9278 against :data:`LOGREG`'s 0.9229; fashion-products 0.8974 against
#: 0.9019); the mlp, minutes (clothing-small 0.9243 against unsmoothed ``logreg``'s 0.9185, fashion-products 0.8893
#: against 0.9022)
SEARCH_FIRST: tuple[dict, ...] = (
    {"type": "logreg", "C": 0.03, "label_smoothing": 0.1},
    {"type": "mlp", "hidden": 256, "lr": 3e-4, "weight_decay": 0.0146, "dropout": 0.478, "label_smoothing": 0.174},
)


@dataclass
class Recipe:
    """One way to train: a backbone spec, crop, optional TTA, head overrides, or ``+`` of others."""

    name: str
    backbone: str = "efficientnet_lite0"
    crop_pct: float | None = None
    crop: str = "center"
    pool: str = "avg"                 # backbone.pool (catalens.embed.backbones.POOLS)
    tta: tuple[str, ...] = ()
    members: tuple[str, ...] = ()     # names of recipes whose features go side by side
    head: dict | None = None          # head settings (from a search)
    kind: str = "frozen"              # frozen | concat | search | tta | finetune
    name_detail: str | None = None    # search / tta: the recipe it was built on

    def config(self, base: Config, recipes: dict[str, "Recipe"]) -> Config:
        """The run configuration that trains this recipe as ``catalens train`` does."""
        c = base.model_copy(deep=True)
        if self.members:
            parts = [recipes[m] for m in self.members]
            c.backbone.name = "+".join(p.backbone for p in parts)
            c.backbone.crop_pct, c.backbone.crop, c.backbone.pool = parts[0].crop_pct, parts[0].crop, parts[0].pool
        else:
            c.backbone.name, c.backbone.crop_pct, c.backbone.crop = self.backbone, self.crop_pct, self.crop
            c.backbone.pool = self.pool
        c.backbone.image_size = None
        c.finetune.tta = list(self.tta)
        if self.kind == "finetune":  # the measured fast recipe: last stage, 3 views, 6 epochs (docs/finetune.md)
            c.finetune.mode = "blocks"
        if self.head:
            c.head = type(c.head).model_validate({**c.head.model_dump(), **self.head})
        return c


def candidate_recipes(preset: str) -> list[Recipe]:
    """The recipes a preset tries, in order (cheap and promising first; the three backbones side by side
    before the cheaper pair, which is there for when the three do not fit; the plain model after them).
    Every frozen recipe but the plain one pools its features multilevel (measured, docs/recipes.md
    "Pooling": +0.3 to +1.4 points of CV accuracy per backbone at no extra embedding cost) and fits
    logistic regression (``head.type logreg``; ``bench_heads``); the fine-tuned one trains through the net's own
    average pooling and the AdamW head, as ``catalens train --finetune blocks`` does."""
    ml, logreg = "multilevel", dict(LOGREG)
    out = [Recipe("lite1@272 crop 1 multilevel", "efficientnet_lite1@272", 1.0, pool=ml, head=logreg),
           Recipe("lite0@256 crop 1 multilevel", "efficientnet_lite0@256", 1.0, pool=ml, head=logreg),
           Recipe("lite2@300 crop 1 multilevel", "efficientnet_lite2@300", 1.0, pool=ml, head=logreg),
           Recipe("lite0@256+lite1@272+lite2@300 crop 1 multilevel",
                  members=("lite0@256 crop 1 multilevel", "lite1@272 crop 1 multilevel",
                           "lite2@300 crop 1 multilevel"), kind="concat", head=logreg),
           # the pair after the three: the three beat it on both benchmark sets, and a scored pair's refit
           # (its own multi-backbone embedding) in the refit reserve crowded the three out on a slower machine
           Recipe("lite0@256+lite1@272 crop 1 multilevel",
                  members=("lite0@256 crop 1 multilevel", "lite1@272 crop 1 multilevel"), kind="concat", head=logreg),
           # the plain model last of the frozen recipes: the leaderboard's reference for ``--preset fast``, and a
           # blend member when there is time; first, it took 32 s of a 3-minute budget (CV 0.874, below every
           # other recipe) and Lite2@300 was then skipped (clothing-small, 2026-12-02 16:15, docs/presets.md)
           Recipe(PLAIN, "efficientnet_lite0")]
    if preset == "best":
        out += [Recipe(SEARCHED, kind="search"),   # its first heads now; at the end, more with what is left
                Recipe("lite0 last stage fine-tuned", "efficientnet_lite0", kind="finetune"),
                Recipe("best single + tta hflip", tta=("hflip",), kind="tta"),
                Recipe("lite1@272 padded whole multilevel", "efficientnet_lite1@272", 1.0, "pad", pool=ml, head=logreg)]
    return out


def features_key(r: Recipe) -> tuple:
    """What a recipe's predict-time features depend on: recipes with the same key (a searched head
    and the recipe it was searched on) embed a photo once in an ensemble."""
    return (r.backbone, tuple(r.members or ()), r.crop_pct, r.crop, r.pool, tuple(r.tta or ()),
            r.kind == "finetune")   # a fine-tuned backbone has weights of its own


def ensemble_units(chosen: list["Scored"], results: dict[str, "Scored"]) -> list["Scored"]:
    """The recipes whose backbones an ensemble of ``chosen`` runs at predict time, each once (by
    :func:`features_key`): a ``+`` recipe (or a head searched on one) counts as its members, whose backbones
    :mod:`catalens.model.ensemble` shares with single members on the same ones."""
    units: dict[tuple, "Scored"] = {}
    for s in chosen:
        r = s.recipe
        parts = [results[m] for m in r.members] if r.members and r.kind != "finetune" and all(
            m in results for m in r.members) else [s]
        for u in parts:
            units.setdefault(features_key(u.recipe), u)
    return list(units.values())


def rel_cost(spec: str) -> float:
    """Relative embedding cost of a backbone spec (``a@s+b@t``), Lite0 at 224 = 1."""
    total = 0.0
    for part in spec.split("+"):
        name, _, size = part.partition("@")
        native, rel = _REL_COST.get(name, (224, 2.0))
        side = int(size) if size else native
        total += rel * (side / native) ** 2
    return total


def all_square(cat, sample: int = SQUARE_SAMPLE) -> bool:
    """Whether a sample of ``cat``'s photos (spread over its rows) are all square: padding a square
    photo to a square changes nothing, so a padded recipe would repeat its centre-cropped twin."""
    import io

    from PIL import Image

    if len(cat) == 0:
        return False
    for i in np.unique(np.linspace(0, len(cat) - 1, min(sample, len(cat))).astype(int)):
        try:
            w, h = Image.open(io.BytesIO(cat.read_bytes(int(i)))).size   # the header only
        except Exception:   # unreadable: not known to be square
            return False
        if w != h:
            return False
    return True


@dataclass
class Scored:
    """A recipe and what its K-fold CV gave: out-of-fold probabilities, score, seconds, status."""

    recipe: Recipe
    score: float = float("nan")
    scores: dict = field(default_factory=dict)   # per task
    seconds: float = 0.0
    img_s: float | None = None
    status: str = "not run"
    oof: dict | None = None
    prep: object = None
    cfg: Config | None = None
    scored: np.ndarray | None = None   # rows with out-of-fold probabilities
    fit_each: float | None = None      # seconds of one of its head fits, as measured by its CV
    trials: int = 0                    # the searched head: trials of its search so far


def crop_mode(s: Scored) -> tuple:
    """``s``'s crop mode and box: an ensemble decodes each photo once, so its members share one."""
    b = s.cfg.backbone
    return b.crop, tuple(b.box) if b.box else None
