"""``catalens search DATA --trials N | --minutes M --out DIR``: Optuna over head (or fine-tune) settings.

Every trial fits the task heads on the cached embeddings of the train split with early
stopping on val (as ``catalens train`` does) and is scored on val; the test split is never
read. Searched: hidden width (0 = no hidden layer), how a head without one is fitted (AdamW, or
L-BFGS as ``logreg`` with its ``C``), learning rate, weight decay, dropout, label smoothing,
class weighting and the loss weight of every class task. The first trial
is the starting configuration itself, so the best found is never worse than it on val.

With ``--cv K`` a trial is scored on the pooled out-of-fold predictions of K folds over
train + val (split by product, as ``catalens train --folds``; each fold stops early on an inner
part of its training products) instead of on val: K times the fitting, and a score on every
train + val image instead of the val split alone. On clothing-small val holds 341 photos, one
photo is 0.3 points, and head settings differ by less than that (docs/recipes.md).

Objective (``--objective``): ``mean`` (default) = mean over class tasks of val accuracy
and over tags tasks of val mean average precision (threshold-free); or a task name = that
task's accuracy (class) / mAP (tags).

**Fine-tune settings** (``--finetune blocks|all``, i.e. ``finetune.mode`` set): each trial
instead fine-tunes the backbone from one linear probe (fitted once, as ``catalens train``
does) with the trial's learning rate, backbone learning-rate multiplier, weight decay, label
smoothing and epochs, and is scored on val. The pixel store and the precomputed views are
made by the first trial and reused by the others (``DIR/finetune-views/KEY``, KEY a digest of
what they depend on), so a trial of ``--finetune blocks`` costs its epochs only; they are
removed when the search ends unless ``finetune.keep_work``. A trial whose fine-tuning
diverges is a failed trial (NaN). Not with ``--cv`` (each fold would fine-tune a backbone).

``--minutes M`` is kept: a trial runs only when the slowest trial so far of its kind (how its head
is fitted and its width) would still end within M minutes of the start (Optuna's own timeout only
stops starting trials, so the one running at the limit would run on past it). A proposal that would
not is dropped unrun, and the next trial is of the best kind so far that still fits, its other
settings from the sampler: a ``logreg`` trial of seconds still runs where an mlp of minutes no longer
fits.

The study is kept in ``DIR/study.db``: the same command again resumes it (``--trials`` counts
every run's trials; a trial cut off by an interrupt runs again).

Written to ``DIR``: ``best_config.yaml`` (the whole run configuration with the best head
section: ``catalens train DATA --config DIR/best_config.yaml``), ``trials.csv`` and
``search.json``. The title model is not part of the search (its settings do not depend on
the head's); ``text`` and ``hierarchy_decoding`` are copied from the starting config.
"""
from __future__ import annotations

import logging
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from catalens.config import Config
from catalens.train.kfold import Prepared, fit_on, predict_rows, prepare

_logger = logging.getLogger(__name__)

HIDDEN_CHOICES = (0, 256, 512, 1024)
#: how a head without a hidden layer is fitted: AdamW (``linear``) or L-BFGS (``logreg``)
LINEAR_FITS = ("adamw", "lbfgs")
C_RANGE = (1e-3, 10.0)   # logreg's C, log scale


@dataclass
class SearchResult:
    best_value: float
    best_head: dict
    trials: int
    config_path: Path
    baseline_value: float
    seconds: float
    best_finetune: dict | None = None
    #: with ``cv`` and no title model: the best trial's out-of-fold probabilities ``{task: (n, C)}``
    #: (NaN where never held out, as :func:`catalens.train.kfold.out_of_fold`) and the scored rows
    #: ``(n,)``: what cross-validating the best config again would give. ``None`` when titles are on
    #: (trials leave the title model out) or the best trial ran in an earlier call.
    best_oof: dict | None = None
    scored: np.ndarray | None = None
    #: seconds the best trial took (None when unknown)
    best_seconds: float | None = None


def objective_value(tasks, Y: dict, probs: dict, objective: str = "mean", pred_index: dict | None = None) -> float:
    """The search objective of validation outputs (higher is better). ``pred_index``: decided classes
    that replace the argmax of some class tasks (hierarchy decoding), as in
    :func:`catalens.evaluate.metrics.compute_metrics`."""
    from catalens.evaluate.metrics import compute_metrics

    m = compute_metrics(tasks, Y, probs, pred_index=pred_index)
    scores = {}
    for t in tasks:
        v = m[t.name]["accuracy"] if t.kind == "class" else m[t.name]["mean_average_precision"]
        if v is not None:
            scores[t.name] = float(v)
    if objective == "mean":
        return float(np.mean(list(scores.values()))) if scores else float("nan")
    if objective not in {t.name for t in tasks}:
        raise ValueError(f"--objective '{objective}': expected 'mean' or a task name "
                         f"({', '.join(t.name for t in tasks)})")
    return scores.get(objective, float("nan"))


def head_from_trial(trial, cfg: Config, class_tasks: list[str]) -> dict:
    """The head section proposed by an Optuna trial (over ``cfg.head``). A head without a hidden
    layer is fitted either by AdamW (``linear``: learning rate, weight decay, dropout) or by L-BFGS
    to convergence (``logreg``: its penalty ``C`` instead); both share label smoothing, class
    weighting and the loss weights."""
    hidden = trial.suggest_categorical("hidden", list(HIDDEN_CHOICES))
    head = cfg.head.model_dump()
    # lbfgs fits every row at once: not offered when the start samples rows per epoch (logreg refuses it)
    fits = LINEAR_FITS if head["sampler"] == "none" and not head["max_per_class"] else ("adamw",)
    if not hidden and trial.suggest_categorical("fit", list(fits)) == "lbfgs":
        head.update(type="logreg", hidden=0, dropout=0.0, C=trial.suggest_float("C", *C_RANGE, log=True))
    else:
        head.update(
            type="mlp" if hidden else "linear", hidden=hidden,
            lr=trial.suggest_float("lr", 3e-4, 3e-2, log=True),
            weight_decay=trial.suggest_float("weight_decay", 1e-6, 1e-1, log=True),
            dropout=trial.suggest_float("dropout", 0.05 if hidden else 0.0, 0.6))
    head.update(
        label_smoothing=trial.suggest_float("label_smoothing", 0.0, 0.2),
        class_weighting=trial.suggest_categorical("class_weighting", ["none", "sqrt", "balanced"]),
        loss_weights={name: trial.suggest_float(f"loss_weight.{name}", 0.25, 4.0, log=True) for name in class_tasks},
    )
    return head


#: the fine-tuning's searched settings: config key -> (low, high, log scale); epochs: E/2 to 2E
FINETUNE_RANGES = {"lr": (2e-3, 5e-2, True), "backbone_lr_mult": (0.05, 1.0, True),
                   "weight_decay": (1e-6, 1e-3, True), "label_smoothing": (0.0, 0.2, False)}


def finetune_from_trial(trial, cfg: Config) -> dict:
    """The finetune section proposed by an Optuna trial (optimisation settings over ``cfg.finetune``;
    the trained part, views and augmentation stay: the stored views depend on them)."""
    f = cfg.finetune.model_dump()
    for key, (lo, hi, log) in FINETUNE_RANGES.items():
        f[key] = trial.suggest_float(f"ft.{key}", lo, hi, log=log)
    e = cfg.finetune.epochs
    f["epochs"] = trial.suggest_int("ft.epochs", max(1, e // 2), max(2, 2 * e))
    return f


def _start_finetune_params(cfg: Config) -> dict:
    """The starting fine-tuning settings as Optuna parameters, clipped into the ranges (trial 0)."""
    f = cfg.finetune
    p = {f"ft.{key}": min(max(getattr(f, key), lo), hi) for key, (lo, hi, _) in FINETUNE_RANGES.items()}
    p["ft.epochs"] = f.epochs  # always inside E/2..2E
    return p


def finetune_scorer(prep: Prepared, train: np.ndarray, val: np.ndarray, cfg: Config, out: Path, objective: str,
                    log=None):
    """``score(config) -> (objective on val, epochs)`` of fine-tuning from one linear probe."""
    log = log or _logger.info
    from catalens.embed.factory import backbone_from_config
    from catalens.train.finetune import DivergedError, check_finetunable, finetune, views_key

    backbone = backbone_from_config(cfg.backbone)
    check_finetunable(backbone)
    probe = fit_on(prep, train, val, cfg)  # the linear probe every trial starts from (LP-FT)
    tr, va = train & prep.usable, val & prep.usable
    Yv = prep.select(va)
    views_dir = out / "finetune-views" / views_key(cfg, backbone, int(tr.sum()), int(va.sum()))

    def score(c: Config) -> tuple[float, int]:
        c = c.model_copy(deep=True)
        c.finetune.resume, c.finetune.keep_work = "off", False
        try:
            res = finetune(prep.cat, probe.tasks, prep.Y, tr, va, backbone, probe.head, c, out / "finetune-trial",
                           log=lambda m: log(f"    {m}") if " views (" in m else None, views_dir=views_dir)
        except DivergedError as e:  # a failed trial (Optuna skips NaN), not a failed search
            log(f"    {str(e).split(';')[0]}")
            shutil.rmtree(out / "finetune-trial", ignore_errors=True)
            return float("nan"), c.finetune.epochs
        return objective_value(probe.tasks, Yv, res.probs_val, objective), c.finetune.epochs

    return score


def _start_params(cfg: Config, class_tasks: list[str]) -> dict:
    """The starting head as Optuna parameters (enqueued as trial 0): a ``logreg`` start stays
    ``logreg`` (its ``C``), so the best found is never worse than it."""
    return _head_params(cfg.head, class_tasks)


def _head_params(h, class_tasks: list[str]) -> dict:
    """A head section (``HeadConfig`` or its dict) as Optuna parameters, clipped into the ranges."""
    from catalens.config import HeadConfig

    h = h if isinstance(h, HeadConfig) else HeadConfig.model_validate(h)
    hidden = h.hidden if h.hidden in HIDDEN_CHOICES else (512 if h.type == "mlp" else 0)
    if h.type == "logreg":
        p = {"hidden": 0, "fit": "lbfgs", "C": min(max(h.C, C_RANGE[0]), C_RANGE[1])}
    else:
        p = {"hidden": hidden, "lr": min(max(h.lr, 3e-4), 3e-2), "weight_decay": min(max(h.weight_decay, 1e-6), 1e-1),
             "dropout": min(max(h.dropout, 0.05 if hidden else 0.0), 0.6)}
        if not hidden:
            p["fit"] = "adamw"
    p.update(label_smoothing=min(h.label_smoothing, 0.2), class_weighting=h.class_weighting)
    for name in class_tasks:
        p[f"loss_weight.{name}"] = min(max(h.loss_weights.get(name, 1.0), 0.25), 4.0)
    return p


def fold_scorer(prep: Prepared, k: int, cfg: Config, objective: str):
    """``score(config, deadline=None) -> objective`` of the pooled out-of-fold predictions of ``k`` folds; the
    last scored config's probabilities are kept as ``score.last_probs``. ``deadline`` (a ``time.time()``): the
    config's folds stop when the next would end past it (:func:`check_deadline`)."""
    from catalens.train.kfold import fold_parts, product_folds

    if k < 2:
        raise ValueError(f"--cv {k}: cross-validation needs K >= 2 folds, e.g. --cv 5")
    parts = fold_parts(prep, product_folds(prep.cat, k, cfg.seed), k, cfg)   # the folds of train --folds
    scored = np.zeros(len(prep.cat), bool)
    for _, _, rows in parts:
        scored |= rows

    def score(c: Config, deadline: float | None = None) -> tuple[float, int]:
        probs = {t.name: np.zeros((len(prep.cat), t.n_outputs), np.float32) for t in prep.tasks}
        epochs = []
        started = time.time()
        for i, (train, inner, rows) in enumerate(parts):
            check_deadline(started, i, len(parts), deadline)
            fitted = fit_on(prep, train, inner, c)
            for name, p in predict_rows(prep, fitted, rows).items():
                probs[name][rows] = p
            epochs.append(int(getattr(fitted.head, "best_epoch_", 0)))
        value = objective_value(prep.tasks, prep.select(scored), {n: p[scored] for n, p in probs.items()}, objective)
        score.last_probs = probs
        return value, int(round(float(np.mean(epochs))))

    score.last_probs, score.scored = None, scored
    return score, int(scored.sum())


def trial_kind(params: dict) -> tuple[str, int]:
    """What a trial's cost depends on most: how its head is fitted and its hidden width,
    ``("lbfgs", 0)``, ``("adamw", 0)``, ``("adamw", 512)``; a fine-tune trial (no ``hidden``): ``("finetune", 0)``."""
    if "hidden" not in params:
        return ("finetune", 0)
    hidden = int(params["hidden"])
    return ("lbfgs", 0) if not hidden and params.get("fit") == "lbfgs" else ("adamw", hidden)


#: epochs of an AdamW head fit, early stopping's patience (25) included: ~64 measured on clothing-small, ~120
#: (at MLP_FLOPS) on fashion-products' four tasks (the preset's mlp trial: 260 s and 365 s)
MLP_EPOCHS = 100
#: floating-point operations per second of an AdamW head's training, 2 cores (measured)
MLP_FLOPS = 40e9


def adamw_seconds(rows: int, dim: int, width: int, fits: int = 1, epochs: int = MLP_EPOCHS) -> float:
    """A first guess of the seconds of ``fits`` AdamW head fits on ``rows`` x ``dim`` features, before one is
    measured: ``epochs`` epochs of the first layer's multiply-adds (``width``: its hidden units, or the outputs
    of a head without one; x 6: forward and backward) at :data:`MLP_FLOPS`."""
    return fits * epochs * 6.0 * rows * dim * width / MLP_FLOPS


def trial_cost(kind: tuple[str, int], seen: list[tuple], prior=None) -> float | None:
    """Seconds a trial of ``kind`` is expected to take, from the finished trials ``seen`` (``(kind, seconds,
    ...)``): the slowest of its kind; an mlp of a width not tried yet, the slowest mlp scaled by width (its
    first layer dominates); otherwise the slowest trial of any kind, the safe guess, or ``prior(kind)``
    when that is longer (a first mlp after only ``logreg`` trials of seconds: :func:`adamw_seconds`).
    ``None`` before any trial."""
    same = [sec for k, sec, *_ in seen if k == kind]
    if same:
        return max(same)
    if kind[0] == "adamw" and kind[1]:
        wider = [sec * kind[1] / k[1] for k, sec, *_ in seen if k[0] == "adamw" and k[1]]
        if wider:
            return max(wider)
    slowest = max((sec for _, sec, *_ in seen), default=None)
    if slowest is None or prior is None:
        return slowest
    return max(slowest, prior(kind))


def _best_by_kind(seen: list[tuple]) -> dict[tuple[str, int], float]:
    """The best value of each kind among the finished trials ``seen`` (``(kind, seconds, value)``)."""
    best: dict[tuple[str, int], float] = {}
    for kind, _, value in seen:
        if np.isfinite(value) and value > best.get(kind, -np.inf):
            best[kind] = value
    return best


def next_trial_fits(elapsed: float, guess: float | None, limit: float | None, after: float = 0.0) -> bool:
    """Whether a trial expected to take ``guess`` seconds (:func:`trial_cost`) ends within ``limit`` seconds
    of the start, ``elapsed`` seconds in, with ``after`` seconds still free at its end (a caller's refit of
    the best head). The first trial (no guess yet) always runs."""
    if limit is None or guess is None:
        return True
    return elapsed + guess + after <= limit


def adamw_prior(prep: Prepared, train: np.ndarray | None, cv: int, cfg: Config):
    """``kind -> seconds``: :func:`adamw_seconds` of an AdamW trial on ``prep``'s features (K fits on
    (K-1)/K of the usable rows with ``cv``, else one on the usable ``train`` rows), ``cfg.head.epochs``
    but at most :data:`MLP_EPOCHS`; other kinds: 0. The search's guess of a first AdamW trial, and the
    preset's of its search's first mlp."""
    usable = int(prep.usable.sum()) if cv else int((train & prep.usable).sum())
    rows = usable * (cv - 1) // cv if cv else usable
    outputs = sum(t.n_outputs for t in prep.tasks)
    epochs = min(cfg.head.epochs, MLP_EPOCHS)

    def prior(kind: tuple[str, int]) -> float:
        if kind[0] != "adamw":
            return 0.0
        return adamw_seconds(rows, prep.features.shape[1], kind[1] or outputs, max(cv, 1), epochs)
    return prior


def _kind_params(kind: tuple[str, int]) -> dict:
    """The trial parameters that make a head trial of ``kind`` (:func:`trial_kind`)."""
    if kind[1]:
        return {"hidden": kind[1]}
    return {"hidden": 0, "fit": kind[0]}


class TrialOverrun(Exception):
    """A trial stopped between its folds: the next fold would have ended past the deadline. ``seconds``: what
    all its folds would have taken, at the pace of those done."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the trial's folds would take ~{seconds:.0f}s")
        self.seconds = seconds


def check_deadline(started: float, done: int, folds: int, deadline: float | None) -> None:
    """Before fold ``done`` (0-based) of ``folds``: raise :class:`TrialOverrun` when, at the mean pace of the
    ``done`` folds since ``started``, the next one would end past ``deadline`` (the first fold always runs).
    A trial whose time was guessed short (a ``logreg`` of a larger C than any so far: L-BFGS needs more rounds)
    so overruns by at most one fold, not by all of them."""
    if deadline is None or not done:
        return
    now = time.time()
    pace = (now - started) / done
    if now + pace > deadline:
        raise TrialOverrun(pace * folds)


class OutOfTime(ValueError):
    """No trial finished within ``--minutes``: each would have ended past it."""


def _nothing_finished(trials: int, for_time: int, minutes: float | None) -> ValueError:
    """Why no trial has a score: the time limit (``for_time`` trials stopped or not run for it, or none
    could start: :class:`OutOfTime`), else each trial's fine-tuning diverged."""
    if minutes and (for_time or not trials):
        why = (f"{for_time} of the {trials} trials stopped or not run: each would have ended past it" if trials
               else "not even the first trial would have ended within it")
        return OutOfTime(f"catalens search: no trial finished within the {minutes:g}-minute limit ({why}): give "
                         f"it more --minutes")
    return ValueError(f"catalens search: none of the {trials} trials finished with a score (fine-tuning diverged "
                      f"in each, see above): lower finetune.lr and search again")


class _TooSlow(Exception):
    """A proposed trial that would end past ``--minutes``: not run, its sampled settings dropped."""


#: proposals in a row that would overrun before the search stops asking the sampler for more
MAX_SKIPPED_IN_A_ROW = 50


def search(data: str | Path, out: str | Path, cfg: Config, trials: int | None = None, minutes: float | None = None,
           objective: str = "mean", log=None, prep: Prepared | None = None, cv: int = 0,
           keep: float = 0.0, first: tuple[dict, ...] = (),
           start_result: tuple[float, dict, float] | None = None) -> SearchResult:
    """Run the search and write ``best_config.yaml``, ``trials.csv``, ``search.json`` to ``out``.
    With ``minutes``, no trial runs that would end later than ``keep`` times the longer of itself and
    the best trial before the limit (``keep``: time the caller needs afterwards, e.g. the best head's
    refit). A trial's time is guessed from the trials so far of its kind (:func:`trial_cost`): a
    proposal that would overrun is dropped unrun and the next trial is of the best kind so far that
    still fits (its other settings from the sampler), so cheap heads (a ``logreg`` of seconds) still
    run where an mlp of minutes no longer fits; the search stops when even the cheapest kind so far
    would overrun.

    ``first``: head sections (over ``cfg.head``) to try right after the starting one, before the
    sampler proposes any (a new study only). ``start_result``: with ``cv``, the starting head's
    objective and out-of-fold probabilities ``{task: (n, C)}`` on these folds, already known to the
    caller, and the seconds they took: trial 0 takes them instead of fitting K heads again."""
    log = log or _logger.info
    try:
        import optuna
    except ImportError:
        raise RuntimeError("catalens search needs Optuna: pip install 'catalens[search]'") from None
    if not trials and not minutes:
        raise ValueError("give --trials N and/or --minutes M")
    tuning = "fine-tune" if cfg.finetune.mode != "none" else "head"
    if tuning == "fine-tune" and cv:
        raise ValueError("--cv with --finetune: every fold would fine-tune a backbone; fine-tune trials are "
                         "scored on val (drop --cv), or search the head with --cv and no --finetune")
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prep = prep or prepare(data, cfg, log=log, classes_from="pool" if cv else "train")
    split = prep.split
    train, val = split == "train", split == "val"
    if not cv and not (val & prep.usable).any():
        raise ValueError("the search scores trials on the val split, and it has no usable rows; "
                         "score them by cross-validation over train + val instead: --cv 5")
    class_tasks = [t.name for t in prep.tasks if t.kind == "class"]
    base = cfg.model_copy(deep=True)
    base.text.enabled = False  # the title model does not depend on the head: left out of the search
    Yv = prep.select(val & prep.usable)
    cv_score, cv_rows = fold_scorer(prep, cv, base, objective) if cv else (None, 0)
    prior = adamw_prior(prep, train, cv, base) if tuning == "head" else None
    ft_score = finetune_scorer(prep, train, val, base, out, objective, log) if tuning == "fine-tune" else None

    def val_score(c: Config) -> tuple[float, int]:
        fitted = fit_on(prep, train, val, c)
        value = objective_value(fitted.tasks, Yv, predict_rows(prep, fitted, val & prep.usable), objective)
        return value, int(getattr(fitted.head, "best_epoch_", 0))

    best_oof: dict = {}   # the best finished trial's out-of-fold probabilities (with --cv)
    seen: list[tuple[tuple[str, int], float, float]] = []   # (kind, seconds, value) of each finished trial
    skipped = [0, 0]       # proposals dropped (would overrun): in all, in a row

    def after(guess: float | None) -> float:   # ``keep`` times the longer of it and the best trial (its refit)
        done = [(value, sec) for _, sec, value in seen if np.isfinite(value)]
        return keep * max(guess or 0.0, max(done, key=lambda d: d[0])[1] if done else 0.0)

    def fits(guess: float | None) -> bool:
        return next_trial_fits(time.time() - t0, guess, limit, after(guess))

    def deadline(guess: float | None) -> float | None:   # when a running trial's folds must end
        return None if limit is None else t0 + limit - after(guess)

    def run(trial) -> float:
        s = time.time()
        c = base.model_copy(deep=True)
        known = start_result is not None and cv_score is not None and trial.user_attrs.get("start")
        if ft_score is not None:
            c.finetune = type(base.finetune).model_validate(finetune_from_trial(trial, base))
        else:
            c.head = type(base.head).model_validate(head_from_trial(trial, base, class_tasks))  # the trial's params
        kind = trial_kind(trial.params)
        guess = trial_cost(kind, seen, prior)
        if not known and not fits(guess):   # sampled, not run: next, the best kind that still fits
            skipped[0] += 1
            skipped[1] += 1
            trial.set_user_attr("skipped", round(guess, 1))
            kind_value = _best_by_kind(seen)
            instead = max((k for k in kind_value if fits(trial_cost(k, seen, prior))), key=kind_value.get, default=None)
            if instead is not None and instead[0] != "finetune":
                trial.study.enqueue_trial(_kind_params(instead))   # its other settings from the sampler
            raise _TooSlow
        skipped[1] = 0
        if ft_score is not None:
            value, epochs = ft_score(c)
        elif known:   # the caller's result for it: no fits
            value, cv_score.last_probs, epochs = start_result[0], start_result[1], 0
        else:
            try:
                value, epochs = cv_score(c, deadline(guess)) if cv_score is not None else val_score(c)
            except TrialOverrun as e:   # its time was guessed short: what it would take is now known
                seen.append((kind, e.seconds, float("nan")))
                trial.set_user_attr("seconds", round(time.time() - s, 1))
                trial.set_user_attr("projected", round(e.seconds, 1))
                log(f"  trial {trial.number}: stopped after {time.time() - s:.0f}s between its folds: all of them "
                    f"would take ~{e.seconds:.0f}s, past the {minutes:g}-minute limit")
                raise _TooSlow from None
        seen.append((kind, start_result[2] if known else time.time() - s, value))
        trial.set_user_attr("seconds", round(seen[-1][1], 1))
        trial.set_user_attr("best_epoch", epochs)
        if cv_score is not None and np.isfinite(value) and value > best_oof.get("value", -np.inf):
            best_oof.update(value=value, number=trial.number, probs=cv_score.last_probs)
        log(f"  trial {trial.number}: {objective} {value:.4f} ({time.time() - s:.0f}s) "
            + ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items()))
        return value

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failed (diverged) trials are logged by run()
    start = _start_finetune_params(cfg) if ft_score is not None else _start_params(cfg, class_tasks)
    then = [_head_params(h, class_tasks) for h in first] if ft_score is None else []
    study, done = open_study(out, study_key(data, cfg, objective, cv, tuning), cfg.seed, start, log, then)
    todo = None if trials is None else max(0, trials - done)
    scored_on = (f"{cv}-fold out-of-fold predictions over train + val ({cv_rows} images)" if cv else
                 f"val ({int((val & prep.usable).sum())} images), training on {int((train & prep.usable).sum())}")
    log(f"search: {trials or 'unlimited'} trials / {minutes or 'no'} minute limit over {tuning} settings, objective "
        f"'{objective}' on {scored_on}")
    limit = minutes * 60 if minutes else None
    seen += _resumed_trials(study)

    def cheapest() -> float | None:   # the cheapest kind of trial so far
        return min((trial_cost(k, seen, prior) for k, *_ in seen), default=None)

    ran = len(seen)
    if todo != 0 and fits(cheapest()):

        def stop(study, _trial) -> None:  # Optuna's timeout only stops *starting* trials
            if ((todo is not None and len(seen) - ran >= todo) or not fits(cheapest())
                    or skipped[1] >= MAX_SKIPPED_IN_A_ROW):
                study.stop()

        study.optimize(run, timeout=limit, gc_after_trial=False, callbacks=[stop], catch=(_TooSlow,))
    if skipped[0]:
        log(f"search: {skipped[0]} proposed trials not run: each would have ended past the {minutes:g}-minute limit")
    if ft_score is not None and not cfg.finetune.keep_work:  # GBs of pixels and views: kept on request only
        shutil.rmtree(out / "finetune-views", ignore_errors=True)
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        for_time = sum("projected" in t.user_attrs or "skipped" in t.user_attrs for t in study.trials)  # see run()
        raise _nothing_finished(len(study.trials), for_time, minutes)
    best = study.best_trial
    best_cfg = cfg.model_copy(deep=True)
    fixed = optuna.trial.FixedTrial(best.params)
    if ft_score is not None:
        best_cfg.finetune = type(cfg.finetune).model_validate(finetune_from_trial(fixed, cfg))
    else:
        best_cfg.head = type(cfg.head).model_validate(head_from_trial(fixed, cfg, class_tasks))
    config_path = out / "best_config.yaml"
    where = f"{cv}-fold CV over train + val" if cv else "val"
    config_path.write_text(f"# catalens search: best {tuning} settings on {where} "
                           f"({objective} = {best.value:.4f}, trial {best.number} of {len(trial_rows(study))})\n"
                           "# use: catalens train DATA --out MODEL --config " + str(config_path) + "\n"
                           + best_cfg.to_yaml())
    rows = trial_rows(study)
    _write_csv(rows, out / "trials.csv")
    seconds = time.time() - t0
    baseline = next((r["value"] for r in rows if r["start"]), float("nan"))
    (out / "search.json").write_text(json.dumps({
        "objective": objective, "scored_on": where, "searched": tuning, "best_value": best.value, "best_trial": best.number,
        "best_params": best.params,
        "baseline_value": baseline, "trials": len(rows), "seconds": round(seconds, 1), "study": str(out / "study.db"),
        "data": str(data)}, indent=1))
    log(f"best {objective} on {where} {best.value:.4f} (starting config {baseline:.4f}) after {len(rows)} "
        f"trials in {seconds:.0f}s; written {config_path}")
    oof, scored = None, None
    if best_oof.get("number") == best.number and not cfg.text.enabled:
        scored = cv_score.scored
        oof = {n: np.where(scored[:, None], p, np.nan).astype(np.float32) for n, p in best_oof["probs"].items()}
    return SearchResult(best.value, best_cfg.head.model_dump(), len(rows), config_path, baseline, seconds,
                        best_cfg.finetune.model_dump(), oof, scored, best.user_attrs.get("seconds"))


def study_key(data, cfg: Config, objective: str, cv: int, tuning: str) -> str:
    """What makes two searches the same one (resumable): data, objective, scoring and every setting
    that changes a trial's result (not engine, tracking or cache settings)."""
    import hashlib

    conf = cfg.model_dump(mode="json", exclude={"engine", "tracking", "cache_dir"})
    conf["finetune"] = {k: v for k, v in conf["finetune"].items() if k not in ("workers", "keep_work", "resume")}
    blob = json.dumps([str(Path(data).resolve()), objective, cv, tuning, conf], sort_keys=True, default=str)
    return f"{tuning}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def _resumed_trials(study) -> list[tuple[tuple[str, int], float, float]]:
    """A resumed study's finished trials as ``(kind, seconds, value)`` (NaN for a failed one)."""
    return [(trial_kind(t.params), t.user_attrs.get("projected", t.user_attrs["seconds"]),
             t.value if t.value is not None else float("nan")) for t in study.trials if "seconds" in t.user_attrs]


def open_study(out: Path, name: str, seed: int, start: dict, log, then: list[dict] = ()):
    """The Optuna study ``name`` in ``out/study.db``, new or resumed; ``(study, finished trials)``.

    Trials cut off by an interrupt (Ctrl-C, or a killed process) are marked failed and their
    settings queued again, once; a new study starts with the starting configuration (``start``) as its
    first trial, then the parameters in ``then``.
    """
    import optuna

    study = optuna.create_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}", load_if_exists=True,
                                direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    if not study.trials:
        study.enqueue_trial(start, user_attrs={"start": True})
        for params in then:
            study.enqueue_trial(params)
        return study, 0
    state = optuna.trial.TrialState
    requeued = {t.user_attrs.get("interrupted") for t in study.trials}
    for t in study.trials:  # cut off (Ctrl-C: failed by Optuna; killed: still running) before run() ended
        cut = t.state == state.RUNNING or (t.state == state.FAIL and not {"seconds", "skipped"} & set(t.user_attrs))
        if cut and t.number not in requeued:
            if t.state == state.RUNNING:
                study.tell(t.number, state=state.FAIL)
            study.enqueue_trial(t.params, user_attrs={**t.user_attrs, "interrupted": t.number})
    done = len(trial_rows(study))  # trials that ran to the end (scored, or failed by diverging)
    log(f"search: resuming {out / 'study.db'} ({done} trials finished before)")
    return study, done


def trial_rows(study) -> list[dict]:
    """Finished trials in order: ``trial``, ``value`` (NaN for a failed one), ``seconds``,
    ``best_epoch``, ``start`` (the starting configuration), then the trial's parameters."""
    import optuna

    rows = []
    for t in sorted(study.trials, key=lambda t: t.number):
        if t.state == optuna.trial.TrialState.COMPLETE or (t.state == optuna.trial.TrialState.FAIL
                                                           and "seconds" in t.user_attrs):
            rows.append({"trial": t.number, "value": t.value if t.value is not None else float("nan"),
                         "seconds": t.user_attrs.get("seconds"), "best_epoch": t.user_attrs.get("best_epoch"),
                         "start": bool(t.user_attrs.get("start")), **t.params})
    return rows


def _write_csv(rows: list[dict], path: Path) -> None:
    import pandas as pd

    tmp = path.with_suffix(".csv.tmp")
    pd.DataFrame(rows).to_csv(tmp, index=False)
    tmp.replace(path)


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
