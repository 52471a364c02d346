"""``catalens train DATA --out M --preset fast|medium|best [--time-limit 20m]``: the best model in a budget.

``fast`` is the plain ``catalens train``. ``medium`` and ``best`` spend the time limit (default
10 and 20 minutes) on recipes catalens already has, cheapest and most promising first:

- frozen backbones Lite0/1/2 at their own side and at ~15 % above it with the whole short side
  (``@256/@272/@300``, crop 1, features pooled ``multilevel``), and for ``best`` the same photos
  padded whole (``crop pad``);
- their ``+`` combinations (features side by side, one head);
- ``best``: a head searched by cross-validation (:mod:`catalens.train.search`) on the best
  features, and flipped test-time augmentation (``tta hflip``) of the best single backbone;
- titles, when the data has them (``preset.titles: auto``).

Every recipe is scored by K-fold cross-validation over train + val (split by product, as
``catalens train --folds``; the test split is never read): its out-of-fold probabilities give the
objective (mean over class tasks of accuracy, over tags tasks of mean average precision). A
``+`` recipe is scored on its members' cached features side by side (each at its own
preprocessing); when chosen it is refitted as ``catalens train --backbone A+B`` (embedded through the
multi-backbone's shared decode, the features predict computes: a head fitted on the members'
separately decoded features lost 2 of 341 clothing-small val photos to that skew). The best recipes are then
combined by greedy forward selection with replacement on the out-of-fold probabilities (Caruana
et al. 2004: integer weights; selected by log-loss, which over-fits those rows less than accuracy),
each chosen recipe is refitted on train (early stopping on val, as
``catalens train``) and the result is one model folder: the single model, or a ``catalens
ensemble`` folder of the chosen ones with those weights. Once val has decided the thresholds (of the
ensemble, for an ensemble), each chosen ``logreg`` recipe is fitted again on train + val
(``data.refit_full``, :mod:`catalens.train.refit`; off with ``--set preset.refit_full=false``).

**The time limit is kept.** Before a recipe starts, its cost (embedding the photos not in the
cache, K head fits, and the refit it would need if chosen) is estimated from what was measured
so far in this run; a recipe that would not leave time for the final refit is skipped and listed
as such. A budget too short for anything but the plain model gives the plain model.

``OUT/leaderboard.csv``: every recipe with its CV score, seconds spent, estimated prediction
speed (images per second on this machine, from the embedding speed measured here), and its
status (chosen with its weight, scored, skipped and why). The same table is in ``model.json``
(``preset``) and reaches MLflow with the run (``catalens runs`` lists the preset and its CV score).

The package, in the order a run goes: :mod:`~catalens.train.presets.recipes` (what is tried),
:mod:`~catalens.train.presets.budget` (the clock and its estimates), :mod:`~catalens.train.presets.run`
(scoring, searching, refitting), :mod:`~catalens.train.presets.blend` (the greedy blend),
:mod:`~catalens.train.presets.decoding` (hierarchy decoding's decision) and
:mod:`~catalens.train.presets.leaderboard` (what the folder keeps).
"""
from catalens.train.presets.budget import DEFAULT_LIMIT, PRESETS, parse_duration
from catalens.train.presets.decoding import decoding_raises, decoding_scores, decoding_summary
from catalens.train.presets.recipes import LOGREG, PLAIN, SEARCH_FIRST, SEARCHED, Recipe, candidate_recipes
from catalens.train.presets.run import train_preset

__all__ = ["DEFAULT_LIMIT", "LOGREG", "PLAIN", "PRESETS", "SEARCHED", "SEARCH_FIRST", "Recipe", "candidate_recipes",
           "decoding_raises", "decoding_scores", "decoding_summary", "parse_duration", "train_preset"]
