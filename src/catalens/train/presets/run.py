"""The run of ``--preset medium|best``: score the recipes by K-fold CV within the time limit, blend the
best, refit, and write one model folder with its leaderboard (the package docstring,
:mod:`catalens.train.presets`, tells the whole story; docs/presets.md the measurements)."""
from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np

from catalens.config import Config
from catalens.train.kfold import TitleModels
from catalens.train.presets.blend import greedy_blend
from catalens.train.presets.budget import (DEFAULT_LIMIT, FIRST_GUESS_TITLE, TTA_GRAPH_VIEW_COST,
                                            TTA_VIEW_COST, Clock, calibrate_embed, uncached_share)
from catalens.train.presets.decoding import decoding_raises, decoding_scores, decoding_summary
from catalens.train.presets.leaderboard import annotate, ensemble_row, leaderboard_rows, write_leaderboard
from catalens.train.presets.recipes import (SEARCH_FIRST, SEARCHED, SEARCHED_MORE, SQUARE_SAMPLE, Recipe, Scored,
                                            all_square, candidate_recipes, ensemble_units, features_key)

_logger = logging.getLogger(__name__)


def train_preset(data, out: str | Path, cfg: Config, log=None):
    """Run ``cfg.preset`` on ``data`` within ``cfg.preset.time_limit`` and write the model folder ``out``."""
    from catalens.train.pipeline import TrainResult, train

    log = log or _logger.info
    p = cfg.preset
    if p.name == "fast":
        return train(data, out, cfg, log=log)
    if cfg.finetune.mode != "none":
        raise ValueError(f"--preset {p.name} chooses its own recipes (best includes a last-stage fine-tuning when "
                         f"it fits the time limit); drop --finetune, or train with --finetune without --preset "
                         f"(docs/presets.md)")
    limit = float(p.time_limit or DEFAULT_LIMIT[p.name])
    runner = _PresetRun(data, Path(out), cfg, limit, log)
    return runner.run(TrainResult)


#: photos to embed from which the first such recipe's estimate measures the embedding speed first
#: (:func:`~catalens.train.presets.budget.calibrate_embed`); fewer: the first guess, a few seconds off at most
CALIBRATE_FROM = 400


class _PresetRun:
    """One ``--preset medium|best`` run: :meth:`run` tries the recipes in order within the clock, continues the
    search, blends, decides hierarchy decoding, refits the chosen and writes the folder and its leaderboard."""

    def __init__(self, data, out: Path, cfg: Config, limit: float, log) -> None:
        self.data, self.out, self.log = data, out, log
        self.clock = Clock(limit)
        self.work = out.parent / f".{out.name}.preset"
        self.base = cfg.model_copy(deep=True)
        self.base.kfold.folds = 0
        self.base.data.refit_full = False  # the chosen recipes' refit decides it (preset.refit_full)
        self.k = cfg.preset.folds
        self.recipes = {r.name: r for r in candidate_recipes(cfg.preset.name)
                        if r.kind != "finetune" or cfg.preset.finetune}
        self.results: dict[str, Scored] = {}
        self.pool = None
        self.refit_seconds = 0.0
        self.refit_parts: dict[str, float] = {}   # seconds of an ensemble's refit steps, logged
        self.decoding: dict | None = None   # the hierarchy decoding decision (:meth:`_decide_decoding`)
        self.titles = TitleModels()   # each fold's title model, fitted once for all recipes

    # ------------------------------------------------------------------ steps
    def run(self, result_type):
        from catalens.ingest.open import open_catalogue
        from catalens.train.splits import ensure_splits

        t0 = time.time()
        self.work.mkdir(parents=True, exist_ok=True)
        cat = self.data if hasattr(self.data, "frame") else open_catalogue(self.data)
        cat, _ = ensure_splits(cat, self.base.data.val_fraction, self.base.data.test_fraction, self.base.seed)
        self.pool = cat.subset(cat.frame["split"].isin(["train", "val"]).to_numpy())
        titles = "text" in self.pool.frame and self.pool.frame["text"].notna().any()
        use_text = self.base.preset.titles == "on" or (self.base.preset.titles == "auto" and titles)
        self.base.text.enabled = bool(use_text)
        self.log(f"preset {self.base.preset.name}: time limit {self.clock.limit:.0f}s, {len(self.recipes)} recipes, "
                 f"{self.k}-fold CV over {len(self.pool)} train+val photos"
                 + (", with titles" if use_text else ""))
        for recipe in self.recipes.values():
            self._try(recipe)
        self._search_more()
        chosen, weights, blend = self._combine()
        blend = self._decide_decoding(chosen, weights, blend)
        t = time.time()
        model_result = self._refit(chosen, weights, blend)
        parts = "; ".join(f"{k} {v:.0f}s" for k, v in self.refit_parts.items())
        self.log(f"  refit: {time.time() - t:.0f}s" + (f" ({parts})" if parts else ""))
        self._write_leaderboard(chosen, weights, blend)
        shutil.rmtree(self.work, ignore_errors=True)
        seconds = time.time() - t0
        self.log(f"preset {self.base.preset.name}: model written to {self.out} in {seconds:.0f}s "
                 f"(limit {self.clock.limit:.0f}s); leaderboard: {self.out / 'leaderboard.csv'}")
        return result_type(model_result.model, self.out, model_result.metrics, seconds)

    def _reserve(self, best: int = 3) -> float:
        """Seconds to keep for the final refit while recipes are scored: the refits of the ``best`` best so far
        (three: an ensemble rarely has more; two beside a recipe whose own refit is counted with it).
        Keeping only the refit of what would be chosen now (:meth:`_search_reserve`) was tried and changed
        no chosen model on the benchmarks (docs/presets.md)."""
        done = sorted((s for s in self.results.values() if s.oof is not None), key=lambda s: -s.score)[:best]
        return self._refit_total(done)   # features two of them share: embedded once

    def _search_reserve(self) -> float:
        """Seconds to keep from the searched head's budget: the refit of what would be chosen without it
        (:meth:`_pick`, a dry run of the blend; the searched head shares the features of the recipe it is
        searched on, so its own refit is one head fit more, which the search keeps free itself:
        ``search(keep=)``)."""
        return self._refit_total(self._pick()[0])

    def _best(self) -> Scored | None:
        done = [s for s in self.results.values() if s.oof is not None]
        return max(done, key=lambda s: s.score) if done else None

    def _refit_cost(self, s: Scored) -> float:
        """Seconds to refit ``s`` with ``catalens train``: its fits (:meth:`_refit_fits`) and, for a ``+``
        recipe, the embedding through the multi-backbone (:meth:`_refit_embed`)."""
        return self._refit_fits(s) + self._refit_embed(s)[1]

    def _refit_fits(self, s: Scored) -> float:
        """Seconds of ``s``'s fits in its refit: its head fitted on train (+ once more on train + val with
        ``refit_full``), at the cost of one of its CV's fits when measured; the auto-accept thresholds
        reuse its out-of-fold probabilities (:meth:`_heldout`), no fits. A fine-tuned recipe: the
        fine-tuning on the train split."""
        n = len(self.pool)
        if s.recipe.kind == "finetune":  # catalens train --finetune blocks on the train split
            return self.clock.finetune_cost(int(n * 0.9), s.recipe.backbone) + 5.0
        dim = s.prep.features.shape[1] if s.prep is not None else 1280 * max(1, len(s.recipe.members))
        head = s.recipe.head or {}
        refit = self.base.preset.refit_full and head.get("type") == "logreg"
        one = s.fit_each if s.fit_each is not None else self.clock.fit_cost(n, dim)
        if self.base.text.enabled:  # the refit fits its own title model (the CV's are shared by the recipes)
            one += self._title_fit()
        return one * 1.3 * (2 if refit else 1) + 3.0  # on 0.9 n rows (the CV's on ~0.8 n), with a margin

    def _title_fit(self) -> float:
        """Seconds of one title model fit on a fold's training photos: measured, else a first guess."""
        if self.titles.fits:
            return self.titles.seconds / self.titles.fits
        return FIRST_GUESS_TITLE * len(self.pool)

    def _refit_embed(self, s: Scored) -> tuple[tuple | None, float]:
        """``(features key, seconds)`` of embedding the photos again for ``s``'s refit: a ``+`` recipe goes
        through the multi-backbone's shared decode, as predict computes (cached under its own key, so
        recipes with the same key, a searched head and the recipe it was searched on, embed once);
        single backbones are in the cache already: ``(None, 0)``."""
        if not s.recipe.members or s.recipe.kind == "finetune":
            return None, 0.0
        spec = "+".join(self.recipes[m].backbone for m in s.recipe.members)
        return features_key(s.recipe), self.clock.embed_cost(len(self.pool), spec)

    def _try(self, recipe: Recipe, last: bool = False) -> None:
        """Estimate ``recipe``, score it when it fits in what is left before the refit reserve (``last``:
        nothing comes after it but the refit, :meth:`_search_reserve`), and log the outcome."""
        s = Scored(recipe)
        self.results[recipe.name] = s
        name = f"{recipe.name}, at the end" if last else recipe.name   # the searched head's second try
        try:
            est = self._estimate(recipe)
        except _Skip as e:
            s.status = f"skipped: {e}"
            self.log(f"  {name}: {s.status}")
            return
        except _FAILURES as e:
            s.status = f"failed: {type(e).__name__}: {str(e)[:300]}"
            self.log(f"  {name}: {s.status}")
            return
        own = recipe.kind in ("frozen", "concat", "finetune")   # its own refit, should it be chosen, must fit as well
        left = self.clock.left() - (self._search_reserve() if last else self._reserve(2 if own else 3))
        if own:   # it and the two best so far: the three refits :meth:`_reserve` keeps
            est += self._refit_cost(Scored(recipe))
        if est > left:
            s.status = f"skipped: needs ~{est:.0f}s, {max(0, left):.0f}s left before the refit"
            self.log(f"  {name}: {s.status}")
            return
        t = time.time()
        try:
            self._score(s, left, last)
        except _Skip as e:
            s.status = f"skipped: {e}"
            self.log(f"  {name}: {s.status}")
            return
        except _FAILURES as e:  # one recipe failing costs that recipe only
            s.oof, s.status = None, f"failed: {type(e).__name__}: {str(e)[:300]}"
            s.seconds = round(time.time() - t, 1)
            self.log(f"  {name}: {s.status}")
            return
        s.seconds = round(time.time() - t, 1)
        s.status = "scored"
        self.log(f"  {name}: CV {s.score:.4f} ({s.seconds:.0f}s; estimated {est:.0f}s; "
                 f"{self.clock.left():.0f}s left)")

    def _estimate(self, recipe: Recipe) -> float:
        n = len(self.pool)
        fits = self.k
        if recipe.kind == "concat":
            missing = [m for m in recipe.members if self.results.get(m) is None or self.results[m].oof is None]
            if missing:
                raise _Skip(f"member {missing[0]} was not scored")
            dim = sum(self.results[m].prep.features.shape[1] for m in recipe.members)
            return self.clock.fit_cost(n, dim) * fits
        if recipe.kind == "finetune":
            base = self._finetune_base(recipe)
            kf = self.base.preset.finetune_folds
            return kf * self.clock.finetune_cost(int(len(base.prep.cat) * (kf - 1) / kf), recipe.backbone)
        if recipe.kind == "search":
            best = self._best()
            if best is None:
                raise _Skip("nothing scored to search a head for")
            # at least one head of SEARCH_FIRST (the starting one is known); with titles a better head is
            # cross-validated once more with the title model (:meth:`_search` keeps that CV aside)
            return self._trial_guess(best) + (self._one_cv_cost(best) if best.cfg.text.enabled else 0.0)
        cfg = self._recipe_config(recipe)
        if recipe.crop == "pad":
            self._check_padding_matters(recipe)
        from catalens.embed.factory import backbone_from_config

        backbone = backbone_from_config(cfg.backbone)
        recipe._uncached = int(round(n * uncached_share(self.pool, backbone, cfg)))  # the plain features
        if not self.clock.measured_embed and recipe._uncached >= CALIBRATE_FROM:
            speed, timed, warm = calibrate_embed(self.clock, self.pool, backbone, cfg, cfg.backbone.name)
            self.log(f"  embedding speed: {speed:.0f} img/s for {recipe.backbone} (a sample of "
                     f"{timed} photos, after {warm} to start)")
        embed = self.clock.embed_cost(recipe._uncached, cfg.backbone.name)
        if recipe.tta:  # the TTA features: one pass per view more, cached under their own key
            from catalens.model.tta import with_tta

            recipe._uncached_tta = int(round(n * uncached_share(self.pool, with_tta(backbone, list(recipe.tta)), cfg)))
            embed += recipe._uncached_tta * self._pass_cost(cfg.backbone.name, recipe.tta)
        titles = fits * self._title_fit() if self.base.text.enabled and not self.titles.fits else 0.0
        return embed + self.clock.fit_cost(n, backbone.feature_dim) * fits + titles   # the folds' title models once

    def _check_padding_matters(self, recipe: Recipe) -> None:
        """Skip a padded recipe whose centre-cropped twin (same backbone, side, crop 1, pooling) was scored
        when the photos are square: both would see the same pixels (fashion-products' are 224 x 224)."""
        twin = next((s for s in self.results.values() if s.oof is not None and s.recipe.kind == "frozen"
                     and s.recipe.crop == "center" and (s.recipe.backbone, s.recipe.crop_pct, s.recipe.pool)
                     == (recipe.backbone, recipe.crop_pct, recipe.pool)), None)
        if twin is not None and recipe.crop_pct == 1.0 and all_square(self.pool):
            raise _Skip(f"the photos are square (a sample of {min(SQUARE_SAMPLE, len(self.pool))}): padded, they give the "
                        f"pixels of {twin.recipe.name}")

    def _one_cv_cost(self, s: Scored) -> float:
        """Seconds of one K-fold CV of a head on ``s``'s features (a search trial, as estimated)."""
        return self.clock.fit_cost(len(self.pool), s.prep.features.shape[1]) * self.k

    def _refit_total(self, chosen: list[Scored]) -> float:
        """Seconds to refit ``chosen``: each recipe's refit (:meth:`_refit_cost`), and for an ensemble
        its val photos predicted through it for its own thresholds (``ensemble_flags``); each distinct
        set of features is embedded once."""
        embeds = dict(self._refit_embed(x) for x in chosen)   # one embedding per set of features
        cost = sum(self._refit_fits(x) for x in chosen) + sum(embeds.values()) + 5.0
        if len(chosen) > 1:
            n_val = int((self.pool.frame["split"] == "val").sum())
            units = ensemble_units(chosen, self.results)   # each backbone once
            cost += n_val * sum(self._pass_cost(u.cfg.backbone.name, u.recipe.tta) for u in units)
        return cost

    def _pass_cost(self, spec: str, tta=()) -> float:
        """Seconds per image of one predict-time pass through backbone ``spec`` with ``tta`` views."""
        from catalens.embed.engine import per_view

        each = TTA_VIEW_COST if per_view(tta) else TTA_GRAPH_VIEW_COST
        return self.clock.per_image(spec) * ((1 + len(tta)) * each if tta else 1.0)

    def _recipe_config(self, recipe: Recipe) -> Config:
        if recipe.kind == "tta":  # the best single backbone so far, with flipped views at predict time
            singles = [s for s in self.results.values() if s.oof is not None and s.recipe.kind == "frozen"]
            if not singles:
                raise _Skip("no single backbone scored")
            best = max(singles, key=lambda s: s.score)
            recipe.backbone, recipe.crop_pct, recipe.crop = best.recipe.backbone, best.recipe.crop_pct, best.recipe.crop
            recipe.pool, recipe.head = best.recipe.pool, best.recipe.head
            recipe.name_detail = best.recipe.name
        return recipe.config(self.base, self.recipes)

    def _score(self, s: Scored, left: float, last: bool = False) -> None:
        """Score ``s`` by K-fold CV (``left``: the seconds it may take, for the searched head)."""
        from catalens.train.kfold import Prepared, prepare

        r = s.recipe
        quiet = lambda *a: None  # noqa: E731
        if r.kind == "concat":
            parts = [self.results[m].prep for m in r.members]
            first = parts[0]
            s.prep = Prepared(first.cat, first.tasks, first.Y, np.hstack([q.features for q in parts]),
                              np.logical_and.reduce([q.usable for q in parts]), first.titles)
            s.cfg = r.config(self.base, self.recipes)
            speeds = [self.results[m].img_s for m in r.members]
            s.img_s = round(1.0 / sum(1.0 / v for v in speeds), 1) if all(speeds) else None
            self._cv(s, s.prep)
            return
        if r.kind == "search":
            self._search(s, left, first_only=not last)
            return
        if r.kind == "finetune":
            self._score_finetune(s)
            return
        s.cfg = self._recipe_config(r)
        plain = s.cfg.model_copy(deep=True)
        plain.finetune.tta = []
        t = time.time()
        s.prep = prepare(self.data, plain, log=quiet, classes_from="pool")
        took = time.time() - t
        fresh = getattr(r, "_uncached", 0)
        if fresh >= max(8, 0.5 * len(s.prep.cat)):  # mostly embedded now, not read from the cache: a speed
            self.clock.learn_embed(took, fresh, plain.backbone.name)
            s.img_s = round(fresh / took, 1)
        s.img_s = None if r.tta else s.img_s  # with TTA: the TTA pass's speed, below
        pred = None
        if r.tta:
            from catalens.embed.factory import backbone_from_config
            from catalens.embed.features import catalogue_features
            from catalens.model.tta import with_tta

            t = time.time()
            tb = with_tta(backbone_from_config(plain.backbone), list(r.tta))
            pred = catalogue_features(s.prep.cat, tb, plain).features
            fresh = getattr(r, "_uncached_tta", 0)
            if fresh >= max(8, 0.5 * len(s.prep.cat)):
                s.img_s = round(fresh / (time.time() - t), 1)
        if s.img_s is None:
            s.img_s = round(1.0 / self._pass_cost(plain.backbone.name, r.tta), 1)
        self._cv(s, s.prep, pred)

    def _cv(self, s: Scored, prep, pred_features=None) -> None:
        """K-fold out-of-fold probabilities and score of ``s`` (``pred_features``: what held-out rows are
        predicted from, e.g. TTA features; the fit always uses ``prep.features``)."""
        from dataclasses import replace as dc_replace

        from catalens.train.kfold import out_of_fold

        cfg = s.cfg
        parts = self._fold_parts(prep, cfg)
        t = time.time()
        pp = dc_replace(prep, features=pred_features) if pred_features is not None else None
        on_titles = self.titles.seconds
        s.oof, s.scored = out_of_fold(prep, parts, cfg, pp, titles=self.titles if cfg.text.enabled else None)
        heads = time.time() - t - (self.titles.seconds - on_titles)   # title models: once per fold, not per recipe
        s.fit_each = heads / len(parts)
        self.clock.learn_fit(heads, len(parts), len(prep.cat), prep.features.shape[1])
        self._set_score(s, prep)

    def _fold_parts(self, prep, cfg: Config) -> list:
        """The K folds every recipe is scored on (:func:`catalens.train.kfold.fold_parts`)."""
        from catalens.train.kfold import fold_parts, product_folds

        return fold_parts(prep, product_folds(prep.cat, self.k, cfg.seed), self.k, cfg)

    def _finetune_base(self, recipe: Recipe) -> Scored:
        """A scored frozen recipe to start from (its rows, labels, titles): the one on ``recipe``'s backbone
        when scored, else the first scored."""
        done = [x for x in self.results.values() if x.oof is not None and x.recipe.kind == "frozen"]
        same = [x for x in done if x.recipe.backbone == recipe.backbone]
        if not done:
            raise _Skip("no frozen recipe was scored to start from")
        return (same or done)[0]

    def _score_finetune(self, s: Scored) -> None:
        """K' fine-tunings (``preset.finetune_folds``, fewer than the frozen recipes' K: each one is a
        ``catalens train --finetune blocks``), each on the other folds' photos (early stopping on their
        val rows), predicting its held-out fold through the fine-tuned backbone."""
        from dataclasses import replace as dc_replace

        from catalens.embed.features import catalogue_features
        from catalens.train.kfold import product_folds
        from catalens.train.pipeline import train

        base = self._finetune_base(s.recipe)
        prep = base.prep
        s.cfg = self._recipe_config(s.recipe)
        kf = self.base.preset.finetune_folds
        fold = product_folds(prep.cat, kf, s.cfg.seed)
        n = len(prep.cat)
        oof = {t.name: np.full((n, t.n_outputs), np.nan, np.float32) for t in prep.tasks}
        scored = np.zeros(n, bool)
        private = s.cfg.model_copy(deep=True)
        private.cache_dir = str(self.work / "finetune-cache")  # fine-tuned features: not for the user's cache
        for f in range(kf):
            held = fold == f
            n_fit = int((~held).sum())
            if f:  # measured on the first fold: does the next one still fit?
                need = self.clock.finetune_cost(n_fit, s.recipe.backbone) + self._reserve()
                if need > self.clock.left():
                    raise _Skip(f"fold {f + 1} of {kf} needs ~{need:.0f}s with the refit reserve, "
                                f"{self.clock.left():.0f}s left")
            t = time.time()
            frame = prep.cat.frame.copy()
            frame["split"] = np.where(held, "test", frame["split"].to_numpy())
            fold_cat = dc_replace(prep.cat, frame=frame)
            res = train(fold_cat, self.work / f"finetune-{f}", s.cfg, log=lambda *a: None)
            heldout = prep.cat.subset(held)
            feats = catalogue_features(heldout, res.model.backbone, private)
            probs = res.model.predict_proba_features(feats.features, prep.titles[held])
            for task in prep.tasks:
                oof[task.name][held] = _in_class_order(probs[task.name], res.model.tasks, task)
            ok = np.zeros(n, bool)
            ok[np.flatnonzero(held)[feats.ok]] = True  # a held-out photo that failed to decode has no answer
            scored |= ok & prep.usable
            shutil.rmtree(self.work / f"finetune-{f}", ignore_errors=True)
            self.clock.learn_finetune(time.time() - t, n_fit)
        s.prep, s.img_s = prep, base.img_s
        s.oof, s.scored = oof, scored
        self._set_score(s, prep)

    def _set_score(self, s: Scored, prep) -> None:
        from catalens.train.search import objective_value

        Y = prep.select(s.scored)
        probs = {k: v[s.scored] for k, v in s.oof.items()}
        s.score = objective_value(prep.tasks, Y, probs)
        s.scores = {tk.name: objective_value(prep.tasks, Y, probs, tk.name) for tk in prep.tasks}

    def _trial_guess(self, best: Scored) -> float:
        """Seconds of the search's first paid trial on ``best``'s features, before it has measured one:
        with titles its trial 0 (``best``'s head without them, a CV like ``best``'s); then the first head of
        :data:`SEARCH_FIRST`: with a hidden layer, the search's own first guess of K AdamW fits
        (:func:`catalens.train.search.adamw_prior`, the same rows, epochs and features); without one, a CV
        like ``best``'s."""
        from catalens.train.search import adamw_prior

        like_best = best.fit_each * self.k if best.fit_each else self._one_cv_cost(best)
        hidden = (SEARCH_FIRST[0].get("hidden", 0) if SEARCH_FIRST else 0)
        first = adamw_prior(best.prep, None, self.k, best.cfg)(("adamw", hidden)) if hidden else like_best
        return first + (like_best if best.cfg.text.enabled else 0.0)

    def _search(self, s: Scored, budget: float, first_only: bool = True, more: bool = False) -> Scored | None:
        """Search a head on the best recipe's features by the same K folds (:func:`catalens.train.search.search`)
        within ``budget`` seconds. Trial 0 is that recipe's own head, whose out-of-fold predictions are
        known (no fits; with titles the trials leave the title model out, so it is fitted); then the heads
        of :data:`SEARCH_FIRST` (``first_only``: no more), then the sampler's. ``more``: continue the study
        of an earlier call with the sampler's heads: when one of them beats ``s``'s head it becomes a recipe of
        its own (:data:`SEARCHED_MORE`, returned), ``s`` stays, and the blend may take both."""
        from catalens.train.search import OutOfTime, search

        best = self.results[s.recipe.name_detail] if more else self._best()
        base = best.cfg.model_copy(deep=True)
        titles = base.text.enabled
        # With titles a better head is cross-validated once more with the title model: keep one CV for it.
        # (Whether the first heads fit in ``budget`` at all, :meth:`_try` checked by :meth:`_estimate`.)
        spend = budget - (self._one_cv_cost(best) if titles else 0.0)
        known = None if titles else (best.score, best.oof, (best.fit_each or 0.0) * self.k)
        try:
            res = search(self.data, self.work / "search", base, minutes=max(0.05, spend / 60.0),
                         trials=1 + len(SEARCH_FIRST) if first_only else None, log=lambda *a: None,
                         prep=best.prep, cv=self.k, keep=1.3 / self.k,   # its own refit
                         first=SEARCH_FIRST, start_result=known)
        except RuntimeError as e:  # Optuna not installed
            raise _Skip(str(e)) from None
        except OutOfTime:   # a budget skip like the others (a first part's is tried again at the end)
            raise _Skip(f"no trial finished within its {spend:.0f}s") from None
        s.trials = res.trials
        if more:
            if res.best_head == s.recipe.head:   # the study's best trial is still the first part's (compared by
                return None   # head: with titles the trials' scores leave the title model out, s.score does not)
            s = self.results[SEARCHED_MORE] = Scored(Recipe(SEARCHED_MORE, kind="search"), trials=res.trials)
        s.recipe.members, s.recipe.backbone = best.recipe.members, best.recipe.backbone
        s.recipe.crop_pct, s.recipe.crop, s.recipe.tta = best.recipe.crop_pct, best.recipe.crop, best.recipe.tta
        s.recipe.pool = best.recipe.pool
        s.recipe.head = {k: v for k, v in res.best_head.items()}
        s.recipe.name_detail = best.recipe.name
        s.cfg = base.model_copy(deep=True)
        s.cfg.head = type(base.head).model_validate(res.best_head)
        s.prep = best.prep
        s.img_s = best.img_s
        s.fit_each = res.best_seconds / self.k if res.best_seconds else None
        if res.best_oof is not None:   # the best trial's out-of-fold predictions: the same folds as _cv's
            s.oof, s.scored = res.best_oof, res.scored
            self._set_score(s, s.prep)
        elif titles and not more and not res.best_value > res.baseline_value:
            # with titles no trial beat the starting head, ``best``'s own (its settings as the study holds them,
            # so a continued search compares heads alike): its CV with titles is known
            s.oof, s.scored, s.score, s.scores = best.oof, best.scored, best.score, dict(best.scores)
            s.fit_each = best.fit_each
        else:
            self._cv(s, s.prep)
        return s

    def _search_more(self) -> None:
        """The searched head's second part, after every other recipe: the sampler's heads with all that
        is left after the refit of what would be chosen (:meth:`_search_reserve`). When its first part
        did not run (too little time then), the whole search runs now."""
        s = self.results.get(SEARCHED)
        if s is None:
            return
        if s.oof is None:
            if s.status.startswith("skipped"):
                self._try(s.recipe, last=True)
            return
        budget = self.clock.left() - self._search_reserve()
        t = time.time()
        try:
            found = self._search(s, budget, first_only=False, more=True)
        except _Skip as e:   # the first part's result stands
            self.log(f"  {SEARCHED_MORE}: skipped: {e}")
            return
        except _FAILURES as e:
            self.log(f"  {SEARCHED_MORE}: failed: {type(e).__name__}: {str(e)[:300]}")
            return
        took = time.time() - t
        if found is None:
            s.seconds = round(s.seconds + took, 1)
            self.log(f"  {SEARCHED_MORE}: no head better than the first part's CV {s.score:.4f} ({took:.0f}s, "
                     f"{s.trials} trials in all; {self.clock.left():.0f}s left)")
            return
        found.seconds, found.status = round(took, 1), "scored"
        self.log(f"  {SEARCHED_MORE}: CV {found.score:.4f} (the first part's {s.score:.4f}, kept beside it; "
                 f"{took:.0f}s, {found.trials} trials in all; {self.clock.left():.0f}s left)")

    # ------------------------------------------------------------------ combining and refitting
    def _combine(self) -> tuple[list[Scored], list[float], float]:
        """The recipes to refit, their weights and the blend's CV score (:meth:`_pick`), logged."""
        chosen, weights, best_val = self._pick()
        if chosen:
            self.log(f"  combined: {' + '.join(f'{w:g} x {s.recipe.name}' for s, w in zip(chosen, weights))}: "
                     f"CV {best_val:.4f} (out-of-fold; members and weights chosen by log-loss on the same "
                     f"predictions); its refit estimated {self._refit_total(chosen):.0f}s, "
                     f"{self.clock.left():.0f}s left")
        return chosen, weights, best_val

    def _pick(self, rounds: int = 10) -> tuple[list[Scored], list[float], float]:
        """Greedy forward selection with replacement by log-loss on the out-of-fold probabilities
        (:func:`greedy_blend`) among the recipes whose blend can still be refitted in the time left."""
        done = [s for s in self.results.values() if s.oof is not None]
        return greedy_blend(done, self._refit_total, self.clock.left, rounds)

    def _decide_decoding(self, chosen: list[Scored], weights: list[float], blend: float) -> float:
        """Whether the model decodes label paths (``hierarchy_decoding``), set in ``self.decoding``; returns the
        blend's CV score with that choice. ``preset.hierarchy_decoding`` on / off (``hierarchy_decoding: true``
        counts as on) decides; ``auto``: on when decoding each fold's out-of-fold blend with the paths of that
        fold's training rows (:func:`catalens.train.kfold.decoded_out_of_fold`) raises the objective. 5-fold CV
        on fashion-products, Lite2@300 with titles: subCategory 62 -> 56 wrong of 5,289, masterCategory 7 -> 9,
        articleType 132 either way (on); image only: 746 -> 748 wrong over the three levels (off)."""
        from catalens.tasks import hierarchy_levels

        mode = self.base.preset.hierarchy_decoding
        mode = "on" if mode == "auto" and self.base.hierarchy_decoding else mode
        if not chosen or not hierarchy_levels(chosen[0].prep.tasks):
            self.decoding = None
            return blend
        if mode == "off":
            self.decoding = {"chosen": False, "mode": mode}
            return blend
        prep, cfg = chosen[0].prep, chosen[0].cfg
        rows = np.logical_and.reduce([s.scored for s in chosen])
        argmax, score, _ = decoding_scores(prep, _blended(chosen, weights), rows, self._fold_parts(prep, cfg))
        on = mode == "on" or decoding_raises(argmax, score)
        self.decoding = {"chosen": on, "mode": mode, "cv_argmax": round(float(argmax), 6),
                         "cv_decoded": round(float(score), 6)}
        self.log(f"  hierarchy decoding {decoding_summary(self.decoding)}")
        return score if on else blend

    def _decodes(self) -> bool:
        return bool(self.decoding and self.decoding["chosen"])

    def _refit(self, chosen: list[Scored], weights: list[float], blend: float):
        from catalens.train.pipeline import train

        if not chosen:  # the budget did not allow even one CV: the plain model
            self.log("  nothing could be scored in the time limit: training the plain model (preset fast)")
            res = train(self.data, self.out, self.base, log=self.log)
            self._annotate(self.out, [], [], blend)
            res.model.meta["preset"] = self._preset_meta([], [], blend)
            return res
        dirs, results, cfgs = [], [], []
        t = time.time()
        for i, s in enumerate(chosen):
            cfg = s.cfg.model_copy(deep=True)
            cfg.preset = type(cfg.preset)()  # its config.yaml trains this recipe again (catalens train --config)
            # an ensemble's thresholds are chosen on val with its members as fitted on train: refit after
            cfg.data.refit_full = self._refits(s) and len(chosen) == 1
            cfg.hierarchy_decoding = self._decodes()
            target = self.out if len(chosen) == 1 else self.work / "members" / str(i)
            results.append(train(self.data, target, cfg, log=lambda *a: None, heldout=self._heldout(s)))
            dirs.append(target)
            cfgs.append(cfg)
        if len(chosen) == 1:
            self.refit_seconds = time.time() - t
            self._annotate(self.out, chosen, weights, blend)
            results[0].model.meta["preset"] = self._preset_meta(chosen, weights, blend)
            return results[0]
        self.refit_parts["members trained"] = time.time() - t
        from catalens.model.ensemble import EnsembleModel
        from catalens.model.single import CatalensModel
        from catalens.train.flags import ensemble_flags
        from catalens.train.refit import refit_folder

        models = [CatalensModel.load(d) for d in dirs]
        meta = {"metrics": {}, "preset": self._preset_meta(chosen, weights, blend), "data": str(self.data),
                "hierarchy_decoding": self._decodes()}
        ens = EnsembleModel(models, weights, meta, names=[str(d) for d in dirs])
        split_csv = dirs[0] / "ingest" / "split.csv"  # when catalens made the split
        step = time.time()
        meta.update(ensemble_flags(ens, self.data, self.base, split_csv if split_csv.exists() else None,
                                   log=self.log, heldout=self._blend_heldout(chosen, weights)))  # of the ensemble itself
        self.refit_parts["the ensemble's thresholds"] = time.time() - step
        step = time.time()
        refit = [i for i, s in enumerate(chosen) if self._refits(s)]
        for i in refit:  # then the members learn from train + val (data.refit_full)
            refit_folder(dirs[i], self.data, cfgs[i], log=lambda *a: None)
        if refit:
            from catalens.train.refit import NOTE

            meta["refit_full"] = {"members": refit, "note": NOTE}
            ens = EnsembleModel([CatalensModel.load(d) for d in dirs], weights, meta, names=[str(d) for d in dirs])
            self.log(f"  refit_full: {len(refit)} of {len(chosen)} members fitted again on train + val")
            self.refit_parts["refit_full"] = time.time() - step
        step = time.time()
        self.refit_seconds = time.time() - t
        ens.save(self.out, sources=dirs)
        self.refit_parts["written"] = time.time() - step
        results[0].model = ens
        results[0].metrics = {}
        return results[0]

    def _heldout(self, s: Scored):
        """``s``'s out-of-fold probabilities for the auto-accept thresholds of its refit (instead of
        ``selective.folds`` more head fits: an AdamW mlp's five took 200 s on clothing-small)."""
        if s.oof is None or s.recipe.kind == "finetune":   # its fold models had backbones of their own
            return None
        # s.oof is NaN outside s.scored (kfold.out_of_fold, SearchResult.best_oof)
        return _held_out(s.prep, s.oof, f"the preset's {self.k}-fold CV of this recipe")

    def _blend_heldout(self, chosen: list[Scored], weights: list[float]):
        """The blend's out-of-fold probabilities for the ensemble's auto-accept thresholds, as :meth:`_heldout`
        gives a single recipe's (on clothing-small, val alone, 341 photos, left a 3-minute ensemble no threshold
        reaching precision 0.98 at 95% confidence). None when a member's fold models differ from what it
        answers with: a fine-tuned backbone, or a title model (a single model then uses val alone too)."""
        if any(s.oof is None or s.recipe.kind == "finetune" for s in chosen) or self.base.text.enabled:
            return None
        return _held_out(chosen[0].prep, _blended(chosen, weights), f"the preset's {self.k}-fold CV of the blend")

    def _refits(self, s: Scored) -> bool:
        """Whether the chosen ``s`` ends with ``data.refit_full``: with ``preset.refit_full``, a frozen recipe
        whose head is ``logreg`` (5-fold CV on clothing-small: +0.2 / +0.3 points for Lite2@300 and the three
        backbones side by side; the searched AdamW head, refitted for its early-stopped epoch count, -0.1)."""
        return (bool(self.base.preset.refit_full) and s.recipe.kind != "finetune" and s.cfg is not None
                and s.cfg.head.type == "logreg")

    def _preset_meta(self, chosen, weights, blend) -> dict:
        return {"name": self.base.preset.name, "time_limit": self.clock.limit, "folds": self.k,
                "cv_score": None if math.isnan(blend) else round(float(blend), 6),
                "chosen": [{"recipe": s.recipe.name, "weight": w} for s, w in zip(chosen, weights)],
                "hierarchy_decoding": self.decoding,
                "leaderboard": leaderboard_rows(self.results.values(), chosen, weights)}

    def _annotate(self, folder: Path, chosen, weights, blend) -> None:
        """Add the preset's summary to a single model's model.json (atomically)."""
        annotate(folder, self._preset_meta(chosen, weights, blend))

    def _write_leaderboard(self, chosen, weights, blend) -> None:
        rows = leaderboard_rows(self.results.values(), chosen, weights)
        if len(chosen) > 1:
            rows.insert(0, ensemble_row(chosen, weights, blend, self.refit_seconds, self.results))
        write_leaderboard(self.out, rows, self.log)


def _held_out(prep, probs: dict[str, np.ndarray], source: str):
    """Out-of-fold ``probs`` of the pool's photos (``prep``'s rows and class order) as a
    :class:`catalens.train.flags.HeldOut` for a refit's auto-accept thresholds."""
    from catalens.train.flags import HeldOut

    return HeldOut(prep.cat.frame["id"].to_numpy(), probs, {t.name: list(t.classes) for t in prep.tasks}, source)


def _blended(chosen: list[Scored], weights: list[float]) -> dict[str, np.ndarray]:
    """The weighted mean of ``chosen``'s out-of-fold probabilities ``{task: (n, C)}`` (NaN where one has none)."""
    return {k: sum(w * s.oof[k] for s, w in zip(chosen, weights)) / sum(weights) for k in chosen[0].oof}


def _in_class_order(probs: np.ndarray, model_tasks, task) -> np.ndarray:
    """``probs`` ``(n, C_model)`` of a model trained on part of the data, as ``(n, C)`` columns in
    ``task``'s class order (a class that part never saw gets 0)."""
    from catalens.tasks import in_class_order

    mine = next(t for t in model_tasks if t.name == task.name)
    return in_class_order(probs, list(mine.classes), list(task.classes))


#: errors that fail one recipe (listed in the leaderboard) rather than the run
_FAILURES = (ValueError, RuntimeError, OSError, MemoryError, KeyError)


class _Skip(Exception):
    """A recipe that cannot run (its reason is the message)."""

