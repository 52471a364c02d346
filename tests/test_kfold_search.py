"""k-fold cross-validation by product, Optuna search, and the imbalance samplers."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from catalens.cli import main
from catalens.config import load_config
from catalens.heads.sampling import EpochSampler
from catalens.ingest.open import open_catalogue
from catalens.synthetic import make_catalogue
from catalens.tasks import MISSING, TaskInfo
from catalens.train.kfold import carve_products, mean_std, product_folds

FAST = ["--no-progress", "--runtime", "eager", "--set", "head.epochs=30"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("kfold")
    return make_catalogue(root / "data", n_products=45, photos_per_product=2, size=64, seed=3)


def test_folds_never_share_a_product_and_are_stratified(data):
    cat = open_catalogue(data)
    fold = product_folds(cat, 3, seed=0)
    frame = cat.frame.assign(fold=fold)
    assert frame.groupby("product_id")["fold"].nunique().max() == 1
    assert sorted(np.unique(fold)) == [0, 1, 2]
    per_class = frame.groupby("category")["fold"].nunique()
    counts = frame.groupby("category")["product_id"].nunique()
    assert (per_class[counts >= 3] == 3).all()           # every class with 3+ products is in every fold
    np.testing.assert_array_equal(fold, product_folds(cat, 3, seed=0))
    assert not np.array_equal(fold, product_folds(cat, 3, seed=1))
    rows = fold != 0
    inner = carve_products(cat, rows, 0.3, seed=0)
    assert not (inner & ~rows).any() and inner.any()
    assert not set(frame["product_id"][inner]) & set(frame["product_id"][rows & ~inner])


def test_mean_std():
    s = mean_std([{"a": 0.5, "b": 1.0}, {"a": 0.7}])
    assert s["a"]["mean"] == pytest.approx(0.6) and s["a"]["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert s["b"] == {"mean": 1.0, "std": 0.0, "n": 1}


def test_train_with_folds_writes_oof_with_every_row_once(data, tmp_path):
    out = tmp_path / "model"
    assert main(["train", str(data), "--out", str(out), "--folds", "3", "--hierarchical-decoding", *FAST]) == 0
    assert (out / "model.json").exists()                    # the ordinary model is still written
    oof = pd.read_parquet(out / "kfold" / "oof_predictions.parquet")
    cat = open_catalogue(data)
    pool = cat.frame[cat.frame["split"].isin(["train", "val"])]
    assert sorted(oof["id"]) == sorted(pool["id"]) and oof["id"].is_unique
    assert list(oof["id"]) == list(pool["id"])              # the catalogue's order
    assert oof.groupby("product_id")["fold"].nunique().max() == 1
    assert oof["category"].notna().all() and oof["problem"].isna().all()
    report = json.loads((out / "kfold" / "metrics.json").read_text())
    assert report["folds"] == 3 and len(report["per_fold"]) == 3
    acc = [f["metrics"]["category.accuracy"] for f in report["per_fold"]]
    assert report["summary"]["category.accuracy"]["mean"] == pytest.approx(np.mean(acc))
    assert report["summary"]["category.accuracy"]["std"] == pytest.approx(np.std(acc, ddof=1))
    assert report["summary"]["category.accuracy"]["mean"] > 0.5
    # hierarchy decoding: every out-of-fold prediction is a path seen in training
    chain = "hierarchy.department > category.consistent_share"
    assert report["summary"][chain]["mean"] == 1.0
    # OOF accuracy recomputed from the parquet matches the pooled metric
    pooled = (oof["category"] == pool.set_index("id").loc[oof["id"], "category"].to_numpy()).mean()
    assert report["pooled_oof"]["category.accuracy"] == pytest.approx(pooled)


def test_search_writes_a_config_train_accepts(data, tmp_path):
    pytest.importorskip("optuna")
    out = tmp_path / "search"
    assert main(["search", str(data), "--trials", "3", "--out", str(out), *FAST]) == 0
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 3
    first = trials.iloc[0]
    assert first["hidden"] == 0 and first["lr"] == pytest.approx(3e-3) and first["class_weighting"] == "none"
    info = json.loads((out / "search.json").read_text())
    assert info["best_value"] == pytest.approx(trials["value"].max())
    assert info["best_value"] >= info["baseline_value"]
    cfg = load_config(out / "best_config.yaml")
    best = trials.loc[trials["value"].idxmax()]
    assert cfg.head.lr == pytest.approx(best["lr"]) and cfg.head.hidden == best["hidden"]
    assert cfg.head.type == ("mlp" if best["hidden"] else "linear")
    assert cfg.head.epochs == 30                            # the starting config's other keys are kept
    assert main(["search", str(data), "--out", str(out), *FAST]) == 2   # neither --trials nor --minutes


# ---------------------------------------------------------------- imbalance samplers
def _imbalanced():
    y = np.r_[np.zeros(900), np.ones(90), np.full(10, 2), np.full(20, MISSING)].astype(np.int64)
    return {"k": y}, [TaskInfo("k", "class", ["a", "b", "c"])]


def test_no_sampling_is_a_plain_permutation():
    Y, tasks = _imbalanced()
    s = EpochSampler(Y, tasks)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(s.order(len(Y["k"]), g1), torch.randperm(len(Y["k"]), generator=g2))
    assert s.epoch_size(1020) == 1020


def test_balanced_sampler_evens_out_classes_and_down_sampling_caps_them():
    Y, tasks = _imbalanced()
    y = Y["k"]
    gen = torch.Generator().manual_seed(0)
    order = EpochSampler(Y, tasks, "balanced").order(len(y), gen).numpy()
    counts = np.bincount(y[order][y[order] != MISSING], minlength=3)
    assert len(order) == len(y)
    assert counts.min() > 0.7 * counts.max()                # ~equal instead of 900:90:10
    sq = np.bincount(y[EpochSampler(Y, tasks, "sqrt").order(len(y), gen).numpy()] + 1, minlength=4)[1:]
    assert sq[0] > sq[1] > sq[2] and sq[0] < 900            # between none and balanced
    s = EpochSampler(Y, tasks, max_per_class=50)
    assert s.epoch_size(len(y)) == 50 + 50 + 10 + 20
    a, b = s.order(len(y), gen).numpy(), s.order(len(y), gen).numpy()
    assert np.bincount(y[a] + 1, minlength=4).tolist() == [20, 50, 50, 10]
    assert len(set(a)) == len(a)                            # without replacement
    assert set(a[y[a] == 0]) != set(b[y[b] == 0])           # a fresh choice every epoch


def test_head_trains_with_sampler_and_down_sampling():
    from catalens.heads import create_head

    rng = np.random.default_rng(0)
    Y, tasks = _imbalanced()
    y = Y["k"]
    X = (np.eye(3)[np.where(y < 0, 0, y)] * 3 + rng.normal(0, 1, (len(y), 3))).astype(np.float32)
    keep = y != MISSING

    def recalls(**kw):
        head = create_head("linear", tasks, epochs=60, seed=0, **kw).fit(X, Y)
        assert head.params["sampler"] == kw.get("sampler", "none")
        pred = head.predict_proba(X)["k"].argmax(1)
        return [(pred[keep][y[keep] == c] == c).mean() for c in range(3)]

    assert min(recalls()) < 0.7                             # plain: the rare classes are swallowed
    assert min(recalls(sampler="balanced")) > 0.85
    assert min(recalls(max_per_class=40)) > 0.85


def test_search_cv_scores_trials_on_pooled_out_of_fold_predictions(data, tmp_path):
    """--cv K: trial 0 (the starting config) scores exactly what 'train --folds K' pools."""
    pytest.importorskip("optuna")
    from catalens.train.kfold import cross_validate

    out = tmp_path / "search"
    assert main(["search", str(data), "--trials", "2", "--cv", "3", "--out", str(out), *FAST]) == 0
    info = json.loads((out / "search.json").read_text())
    assert info["scored_on"] == "3-fold CV over train + val"
    assert "3-fold CV over train + val" in (out / "best_config.yaml").read_text().splitlines()[0]
    first = pd.read_csv(out / "trials.csv").iloc[0]
    cfg = load_config(overrides=[{"head": {"epochs": 30}, "engine": {"runtime": "eager", "progress": False}}])
    pooled = cross_validate(data, tmp_path / "cv", cfg, folds=3, log=lambda *a: None).pooled
    tasks = [k for k, v in pooled.items() if isinstance(v, dict) and v.get("kind") in ("class", "tags")]
    expected = np.mean([pooled[t]["accuracy"] if pooled[t]["kind"] == "class" else pooled[t]["mean_average_precision"]
                        for t in tasks])
    assert first["value"] == pytest.approx(expected, abs=1e-9)
    assert main(["search", str(data), "--trials", "1", "--cv", "1", "--out", str(out), *FAST]) == 2


def test_search_returns_the_best_trials_out_of_fold_predictions(data, tmp_path):
    """With --cv the best trial's pooled out-of-fold probabilities come back: exactly what
    cross-validating the best head again gives (the presets use them instead of a second CV)."""
    pytest.importorskip("optuna")
    from catalens.train.kfold import fold_parts, out_of_fold, prepare, product_folds
    from catalens.train.search import search

    cfg = load_config(overrides=[{"head": {"epochs": 30}, "engine": {"runtime": "eager", "progress": False}}])
    prep = prepare(data, cfg, log=lambda *a: None, classes_from="pool")
    res = search(data, tmp_path / "s", cfg, trials=3, log=lambda *a: None, prep=prep, cv=3)
    best = cfg.model_copy(deep=True)
    best.head = type(cfg.head).model_validate(res.best_head)
    oof, scored = out_of_fold(prep, fold_parts(prep, product_folds(prep.cat, 3, cfg.seed), 3, best), best)
    np.testing.assert_array_equal(res.scored, scored)
    assert set(res.best_oof) == set(oof)
    for name, p in oof.items():
        np.testing.assert_allclose(res.best_oof[name], p, atol=1e-6)   # NaN where never held out, as out_of_fold
    cfg.text.enabled = True   # trials leave the title model out: their predictions are not the model's
    again = search(data, tmp_path / "t", cfg, trials=1, log=lambda *a: None, prep=prep, cv=3)
    assert again.best_oof is None and again.scored is None


def test_a_logreg_start_stays_logreg_and_a_known_start_costs_no_fits(data, tmp_path, monkeypatch):
    """Trial 0 of a ``logreg`` start is that ``logreg`` (before, it became an AdamW ``linear`` head, so
    the search could end below where it started); given its result, trial 0 fits nothing; the heads
    of ``first`` come next, before the sampler's."""
    pytest.importorskip("optuna")
    from catalens.train import search as search_mod
    from catalens.train.kfold import fold_parts, out_of_fold, prepare, product_folds

    cfg = load_config(overrides=[{"head": {"type": "logreg", "C": 0.3, "epochs": 8},
                                  "engine": {"runtime": "eager", "progress": False}}])
    prep = prepare(data, cfg, log=lambda *a: None, classes_from="pool")
    oof, scored = out_of_fold(prep, fold_parts(prep, product_folds(prep.cat, 3, cfg.seed), 3, cfg), cfg)
    plain = search_mod.search(data, tmp_path / "a", cfg, trials=1, log=lambda *a: None, prep=prep, cv=3)
    assert plain.best_head["type"] == "logreg" and plain.best_head["C"] == 0.3
    for name, p in oof.items():
        np.testing.assert_allclose(plain.best_oof[name], p, atol=1e-6)   # trial 0 is the start, refitted
    assert pd.read_csv(tmp_path / "a" / "trials.csv").loc[0, ["hidden", "fit", "C"]].tolist() == [0, "lbfgs", 0.3]

    fits = []
    real = search_mod.fit_on
    monkeypatch.setattr(search_mod, "fit_on", lambda *a, **k: fits.append(a[3].head.type) or real(*a, **k))
    mlp = {"type": "mlp", "hidden": 256, "lr": 1e-3, "dropout": 0.4, "label_smoothing": 0.1}
    res = search_mod.search(data, tmp_path / "b", cfg, trials=2, log=lambda *a: None, prep=prep, cv=3,
                            first=(mlp,), start_result=(0.5, oof, 7.0))
    assert fits == ["mlp"] * 3                       # trial 0 known (no fits), trial 1 the given mlp, 3 folds
    rows = pd.read_csv(tmp_path / "b" / "trials.csv")
    assert rows["value"].iloc[0] == 0.5 and rows["seconds"].iloc[0] == 7.0
    assert rows.loc[1, ["hidden", "lr", "dropout", "label_smoothing"]].tolist() == [256, 1e-3, 0.4, 0.1]
    assert res.best_value == rows["value"].max() and res.trials == 2


def test_the_search_offers_logreg_only_where_it_can_fit():
    """logreg fits every row at once: a start that samples rows per epoch is never offered it."""
    optuna = pytest.importorskip("optuna")
    from catalens.train.search import head_from_trial

    def types(head: dict) -> set:
        cfg = load_config(overrides=[{"head": head}])
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        return {head_from_trial(study.ask(), cfg, ["category"])["type"] for _ in range(40)}

    assert types({}) == {"linear", "logreg", "mlp"}
    assert types({"sampler": "balanced"}) == {"linear", "mlp"}


def test_a_resumed_search_starts_no_trial_its_slowest_says_would_overrun(data, tmp_path):
    """--minutes on a resumed study: the trials it ran before tell how slow a trial is."""
    pytest.importorskip("optuna")
    from catalens.train.search import search

    cfg = load_config(overrides=[{"head": {"epochs": 30}, "engine": {"runtime": "eager", "progress": False}}])
    search(data, tmp_path / "s", cfg, trials=1, log=lambda *a: None)
    slowest = pd.read_csv(tmp_path / "s" / "trials.csv")["seconds"].max()
    lines = []
    res = search(data, tmp_path / "s", cfg, minutes=slowest / 60 / 2, log=lines.append)
    assert res.trials == 1 and not any("  trial " in m for m in lines)


def test_a_trials_time_is_guessed_from_the_trials_of_its_kind():
    from catalens.train.search import adamw_seconds, next_trial_fits, trial_cost, trial_kind

    assert trial_kind({"hidden": 0, "fit": "lbfgs", "C": 0.1}) == ("lbfgs", 0)
    assert trial_kind({"hidden": 0, "fit": "adamw", "lr": 0.01}) == ("adamw", 0)
    assert trial_kind({"hidden": 512, "lr": 0.01}) == ("adamw", 512)
    assert trial_kind({"lr": 0.01, "epochs": 4}) == ("finetune", 0)
    seen = [(("lbfgs", 0), 17.0), (("adamw", 256), 260.0), (("lbfgs", 0), 21.0)]
    assert trial_cost(("lbfgs", 0), seen) == 21.0        # the slowest of its kind
    assert trial_cost(("adamw", 1024), seen) == 1040.0   # an mlp of another width: by width
    assert trial_cost(("adamw", 0), seen) == 260.0       # a kind not run yet: the slowest of all
    assert trial_cost(("lbfgs", 0), []) is None          # nothing run yet: no guess
    # with a prior (the search's: adamw_seconds on its features), an unseen kind takes the longer guess
    prior = {("adamw", 256): 300.0, ("adamw", 0): 5.0}.get
    only_logreg = [(("lbfgs", 0), 17.0)]
    assert trial_cost(("adamw", 256), only_logreg, prior) == 300.0   # a first mlp after only logreg trials
    assert trial_cost(("adamw", 0), only_logreg, prior) == 17.0      # never below the slowest of all
    assert trial_cost(("adamw", 256), seen, prior) == 260.0          # measured beats the prior
    assert trial_cost(("adamw", 256), [], prior) is None
    # 5 fits x 100 epochs x 6 x 1,000 rows x 1,280 features x 256 hidden units at 40 GFLOP/s
    assert adamw_seconds(1000, 1280, 256, fits=5, epochs=100) == pytest.approx(24.576)
    assert next_trial_fits(0.0, None, 10.0)               # the first trial always runs
    assert next_trial_fits(50.0, 40.0, None)              # no limit
    assert next_trial_fits(50.0, 40.0, 90.0)              # 50 + 40 = 90: ends on time
    assert not next_trial_fits(51.0, 40.0, 90.0)
    assert not next_trial_fits(40.0, 40.0, 90.0, after=10.5)   # the caller's refit afterwards counts


def test_the_first_adamw_guess_is_one_function_for_the_search_and_the_preset(monkeypatch):
    """adamw_prior: K fits on (K-1)/K of the usable rows (one fit on the usable train rows without
    --cv), at most 100 epochs (fewer when head.epochs says so), the hidden units or else the outputs;
    the preset's guess of its search's first mlp is that same number."""
    from types import SimpleNamespace

    from catalens.train.presets import run as P
    from catalens.train.presets.run import _PresetRun
    from catalens.train.search import adamw_prior

    usable = np.arange(1010) < 1000                       # 10 photos without usable features
    prep = SimpleNamespace(usable=usable, features=np.zeros((1010, 1280), np.float32),
                           tasks=[SimpleNamespace(n_outputs=12), SimpleNamespace(n_outputs=5)])
    cfg = load_config()
    prior = adamw_prior(prep, None, 5, cfg)
    assert prior(("adamw", 256)) == pytest.approx(5 * 100 * 6 * 800 * 1280 * 256 / 40e9)   # 19.6608 s
    assert prior(("adamw", 0)) == pytest.approx(5 * 100 * 6 * 800 * 1280 * 17 / 40e9)     # 12 + 5 outputs
    assert prior(("lbfgs", 0)) == 0.0
    cfg.head.epochs = 40
    assert adamw_prior(prep, None, 5, cfg)(("adamw", 256)) == pytest.approx(19.6608 * 40 / 100)
    train = np.arange(1010) % 2 == 0                      # 500 usable train rows, one fit
    assert adamw_prior(prep, train, 0, cfg)(("adamw", 256)) == pytest.approx(40 * 6 * 500 * 1280 * 256 / 40e9)

    run = object.__new__(_PresetRun)
    run.k = 5
    best = SimpleNamespace(fit_each=2.0, cfg=load_config(), prep=prep)
    assert P.SEARCH_FIRST[0] == {"type": "logreg", "C": 0.03, "label_smoothing": 0.1}
    assert run._trial_guess(best) == pytest.approx(10.0)      # a logreg first: K fits like best's (2 s each)
    monkeypatch.setattr(P, "SEARCH_FIRST", P.SEARCH_FIRST[1:])
    assert P.SEARCH_FIRST[0]["hidden"] == 256
    assert run._trial_guess(best) == pytest.approx(19.6608)   # an mlp first, no titles: its K fits alone


def _stand_in_clock(monkeypatch, seconds) -> list[float]:
    """``[now]``: the search's clock, moved on only by each trial's fits, ``seconds(head, outputs)`` (a fold
    scorer stands in for the K fits: an mlp scores 0.6, any other head 0.5)."""
    from types import SimpleNamespace

    from catalens.train import search as search_mod

    clock = [0.0]

    def fake_fold_scorer(prep, cv, base, objective):
        outputs = sum(t.n_outputs for t in prep.tasks)

        def score(c, deadline=None):
            clock[0] += seconds(c.head, outputs)
            return (0.6 if c.head.type == "mlp" else 0.5), 1
        score.last_probs, score.scored = {}, np.ones(len(prep.cat), bool)
        return score, len(prep.cat)

    monkeypatch.setattr(search_mod, "fold_scorer", fake_fold_scorer)
    monkeypatch.setattr(search_mod, "time", SimpleNamespace(time=lambda: clock[0]))
    return clock


def test_a_search_runs_cheap_trials_where_an_mlp_no_longer_fits(data, tmp_path, monkeypatch):
    """--minutes: once an mlp trial has taken 100 s, the sampler's mlp proposals that would overrun are
    dropped unrun, while logreg trials of 2 s go on until they too would end past the limit, keeping
    ``keep`` times the best trial (the mlp) free for its refit. A clock stands in for the fits' time."""
    pytest.importorskip("optuna")
    from catalens.train import search as search_mod

    clock = _stand_in_clock(monkeypatch, lambda head, _: {"mlp": 100.0, "linear": 20.0, "logreg": 2.0}[head.type])
    cfg = load_config(overrides=[{"head": {"type": "logreg", "C": 0.1},
                                  "engine": {"runtime": "eager", "progress": False}}])
    mlp = {"type": "mlp", "hidden": 256, "lr": 1e-3, "dropout": 0.4}
    lines = []
    search_mod.search(data, tmp_path / "s", cfg, minutes=150 / 60, cv=3, first=(mlp,), keep=0.25,
                      log=lines.append)
    rows = pd.read_csv(tmp_path / "s" / "trials.csv")
    # trial 0 the logreg start (2 s), trial 1 the mlp (ends at 102 s); then logreg trials while
    # now + 2 + 0.25 x 100 (the mlp's refit) <= 150: starting at 102, 104, ..., 122
    assert rows["hidden"].tolist()[:2] == [0, 256] and rows["seconds"].tolist()[:2] == [2.0, 100.0]
    later = rows.iloc[2:]
    assert len(later) == 11 and (later["fit"] == "lbfgs").all() and (later["seconds"] == 2.0).all()
    assert clock[0] == 124.0
    assert any(m.startswith("search: ") and "proposed trials not run: each would have ended past the 2.5-minute "
               "limit" in m for m in lines)
    # resumed (as the preset's second part is), past the sampler's 10 random trials: its TPE proposes the
    # mlp (the best value) again and again; each dropped proposal is followed by a logreg trial, so the
    # minute goes on logreg trials while now + 2 + 25 <= 60: starting at 0, 2, ..., 32
    search_mod.search(data, tmp_path / "s", cfg, minutes=1.0, cv=3, first=(mlp,), keep=0.25, log=lines.append)
    rows = pd.read_csv(tmp_path / "s" / "trials.csv")
    assert len(rows) == 13 + 17 and (rows.iloc[13:]["fit"] == "lbfgs").all() and clock[0] == 124.0 + 34.0


def test_a_first_mlp_that_would_overrun_the_minutes_is_not_run(data, tmp_path, monkeypatch):
    """--minutes from a logreg start: the first mlp's time is guessed before it runs (adamw_seconds on the
    features; here 0.4 s per hidden unit, or per output without one, as the stand-in clock takes), so in a
    minute the mlp (102 s) is dropped and the other trials run; guessed at the slowest trial so far (2 s),
    it ran from 2 s to 104 s."""
    pytest.importorskip("optuna")
    from catalens.train import search as search_mod

    clock = _stand_in_clock(monkeypatch, lambda head, outputs: 2.0 if head.type == "logreg"
                            else 0.4 * (head.hidden or outputs))
    widths = []

    def guess(rows, dim, width, fits=1, epochs=100):
        widths.append((rows, dim, width, fits, epochs))
        return 0.4 * width

    monkeypatch.setattr(search_mod, "adamw_seconds", guess)
    cfg = load_config(overrides=[{"head": {"type": "logreg", "C": 0.1, "epochs": 40},
                                  "engine": {"runtime": "eager", "progress": False}}])
    mlp = {"type": "mlp", "hidden": 256, "lr": 1e-3, "dropout": 0.4}
    search_mod.search(data, tmp_path / "s", cfg, minutes=1.0, cv=3, first=(mlp,), log=lambda *a: None)
    rows = pd.read_csv(tmp_path / "s" / "trials.csv")
    assert (rows["hidden"] == 0).all() and (rows["fit"] == "lbfgs").sum() >= 10
    assert 58.0 <= clock[0] <= 60.0
    # the guess's terms: 3 folds fit on 50 of the 75 usable photos, 1,280 features, the mlp's 256 units,
    # the head's 40 epochs (fewer than MLP_EPOCHS); a head without a hidden layer: its 17 outputs
    assert widths[0] == (50, 1280, 256, 3, 40) and (50, 1280, 17, 3, 40) in widths


def test_a_trial_guessed_short_stops_between_its_folds(data, tmp_path, monkeypatch):
    """--minutes with --cv: a logreg of a larger C than any so far (L-BFGS needs more rounds) is guessed at
    the slowest trial so far; when its folds prove slower, it stops before the fold that would end past the
    limit, and its kind is then guessed at what all its folds would have taken. A clock stands in for the
    fits' time (the real fold scorer, each fold's fit moving the clock by 2 s, or 30 s at C 10)."""
    pytest.importorskip("optuna")
    from types import SimpleNamespace

    from catalens.train import search as search_mod

    clock = [0.0]
    real_fit = search_mod.fit_on

    def fit_on(prep, train, inner, c, **kw):
        clock[0] += 30.0 if c.head.C >= 10 else 2.0
        return real_fit(prep, train, inner, c, **kw)

    monkeypatch.setattr(search_mod, "fit_on", fit_on)
    monkeypatch.setattr(search_mod, "time", SimpleNamespace(time=lambda: clock[0]))
    cfg = load_config(overrides=[{"head": {"type": "logreg", "C": 0.1, "epochs": 5},
                                  "engine": {"runtime": "eager", "progress": False}}])
    lines = []
    search_mod.search(data, tmp_path / "s", cfg, minutes=1.0, cv=3, first=({"type": "logreg", "C": 10.0},),
                      log=lines.append)
    rows = pd.read_csv(tmp_path / "s" / "trials.csv")
    # trial 0 (C 0.1): 3 folds of 2 s; trial 1 (C 10), guessed 6 s, starts at 6: its second fold would end
    # at 66 > 60, so it stops at 36 (without the stop: 96); then every logreg is guessed at 90 s: no more trials
    assert rows["seconds"].tolist() == [6.0, 30.0] and np.isnan(rows["value"].iloc[1])
    assert rows["C"].tolist() == [pytest.approx(0.1), pytest.approx(10.0)]
    assert clock[0] == 36.0
    assert "  trial 1: stopped after 30s between its folds: all of them would take ~90s, past the 1-minute limit" \
        in lines
    info = json.loads((tmp_path / "s" / "search.json").read_text())
    assert info["best_value"] == pytest.approx(rows["value"].iloc[0])
    # resumed, the stopped trial counts at its projected 90 s: a minute more runs only what fits
    assert search_mod._resumed_trials(search_mod.open_study(tmp_path / "s", search_mod.study_key(
        data, cfg, "mean", 3, "head"), cfg.seed, {}, lambda *a: None)[0])[1][1] == 90.0


def test_a_search_whose_trials_all_overrun_says_the_time_limit_not_divergence(data, tmp_path, monkeypatch):
    """When no trial finishes because each would end past --minutes, the error names the limit and the fix
    (it used to blame diverged fine-tuning, which a head search never runs)."""
    from types import SimpleNamespace

    from catalens.train import search as search_mod

    clock = [0.0]
    real_fit = search_mod.fit_on

    def fit_on(prep, train, inner, c, **kw):
        clock[0] += 30.0   # every fold 30 s: the first trial's 3 folds would take 90 s of the 60
        return real_fit(prep, train, inner, c, **kw)

    monkeypatch.setattr(search_mod, "fit_on", fit_on)
    monkeypatch.setattr(search_mod, "time", SimpleNamespace(time=lambda: clock[0]))
    cfg = load_config(overrides=[{"head": {"type": "logreg", "C": 0.1, "epochs": 5},
                                  "engine": {"runtime": "eager", "progress": False}}])
    with pytest.raises(search_mod.OutOfTime) as e:   # a ValueError, as before, for callers that catch those
        search_mod.search(data, tmp_path / "s", cfg, minutes=1.0, cv=3, log=lambda *a: None)
    assert str(e.value) == ("catalens search: no trial finished within the 1-minute limit (1 of the 1 trials "
                            "stopped or not run: each would have ended past it): give it more --minutes")
    assert str(search_mod._nothing_finished(2, 0, None)) == (
        "catalens search: none of the 2 trials finished with a score (fine-tuning diverged in each, see above): "
        "lower finetune.lr and search again")


def test_search_over_finetune_settings_reuses_the_views(data, tmp_path, capsys):
    """--finetune: each trial fine-tunes from one linear probe with its own optimisation settings;
    the pixels and views are made by trial 0 and reused, then removed; the best finetune section
    is written."""
    pytest.importorskip("optuna")
    out = tmp_path / "ft-search"
    ft = ["--finetune", "blocks", "--set", "finetune.blocks=1", "--set", "finetune.epochs=2",
          "--set", "finetune.views=1", "--set", "finetune.workers=0", "--set", "finetune.lr=0.01"]
    assert main(["search", str(data), "--trials", "2", "--out", str(out), *FAST, *ft]) == 0
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 2
    first = trials.iloc[0]  # trial 0 is the starting configuration
    assert first["ft.lr"] == pytest.approx(0.01) and first["ft.epochs"] == 2
    assert {"ft.backbone_lr_mult", "ft.weight_decay", "ft.label_smoothing"} <= set(trials.columns)
    assert "hidden" not in trials.columns                  # the head is not searched here
    info = json.loads((out / "search.json").read_text())
    assert info["searched"] == "fine-tune" and info["best_value"] == pytest.approx(trials["value"].max())
    printed = capsys.readouterr().err  # progress is logged to stderr
    assert printed.count(" views (") == 2 and "train-x1: " in printed and "val: " in printed  # made once
    assert printed.count("  trial ") == 2
    assert not (out / "finetune-views").exists()           # GBs on real data: removed after the search
    assert not (out / "finetune-trial").exists()           # each trial's checkpoints are removed
    cfg = load_config(out / "best_config.yaml")
    best = trials.loc[trials["value"].idxmax()]
    assert cfg.finetune.mode == "blocks" and cfg.finetune.blocks == 1 and cfg.finetune.views == 1
    assert cfg.finetune.lr == pytest.approx(best["ft.lr"]) and cfg.finetune.epochs == best["ft.epochs"]
    assert cfg.head.epochs == 30                            # the head section is the starting one


def test_search_finetune_with_cv_is_refused_before_any_work(data, tmp_path, capsys):
    assert main(["search", str(data), "--trials", "2", "--cv", "3", "--out", str(tmp_path / "s"),
                 *FAST, "--finetune", "blocks"]) == 2
    assert "--cv with --finetune: every fold would fine-tune a backbone" in capsys.readouterr().err


def test_a_diverged_finetune_trial_fails_alone(data, tmp_path, monkeypatch):
    """A trial whose fine-tuning diverges is a failed trial (NaN), not a failed search; when every
    trial diverges the search says so."""
    pytest.importorskip("optuna")
    from catalens.train import finetune as ft

    real, calls = ft.finetune, []

    def every_other(*a, **k):
        calls.append(1)
        if len(calls) % 2 == 0:
            raise ft.DivergedError("fine-tuning diverged: the training loss became nan in epoch 1 (step 3); lower ...")
        return real(*a, **k)

    monkeypatch.setattr(ft, "finetune", every_other)
    out = tmp_path / "s"
    args = ["search", str(data), "--trials", "3", "--out", str(out), *FAST, "--finetune", "blocks",
            "--set", "finetune.blocks=1", "--set", "finetune.epochs=1", "--set", "finetune.views=1",
            "--set", "finetune.workers=0"]
    assert main(args) == 0
    trials = pd.read_csv(out / "trials.csv")
    assert trials["value"].isna().tolist() == [False, True, False]
    assert json.loads((out / "search.json").read_text())["best_value"] == pytest.approx(trials["value"].max())
    monkeypatch.setattr(ft, "finetune", lambda *a, **k: (_ for _ in ()).throw(ft.DivergedError("diverged; x")))
    args[5] = str(tmp_path / "s2")  # a new search (the same --out would resume the finished one)
    assert main(args[:3] + ["1"] + args[4:]) == 2


def test_search_resumes_after_an_interrupt_and_counts_trials_in_total(data, tmp_path, monkeypatch):
    """The study lives in OUT/study.db: a rerun continues it; --trials N is the total; a trial cut
    off by Ctrl-C is run again with the same settings."""
    pytest.importorskip("optuna")
    from catalens.train import search as search_mod

    out = tmp_path / "s"
    cfg = load_config(None, [{"engine": {"progress": False, "runtime": "eager"}, "head": {"epochs": 30},
                              "tracking": False}])
    real_fit, calls = search_mod.fit_on, []

    def interrupted_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_fit(*a, **k)

    monkeypatch.setattr(search_mod, "fit_on", interrupted_second)
    with pytest.raises(KeyboardInterrupt):
        search_mod.search(data, out, cfg, trials=3, log=lambda m: None)
    monkeypatch.setattr(search_mod, "fit_on", real_fit)
    lines = []
    res = search_mod.search(data, out, cfg, trials=3, log=lines.append)
    assert any("resuming" in m and "(1 trials finished before)" in m for m in lines), lines
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 3 and res.trials == 3
    assert trials["start"].tolist() == [True, False, False]       # the starting config is trial 0
    assert trials["trial"].tolist() == [0, 2, 3]                   # 1 was cut off, and ran again as 2
    import optuna

    [study] = [optuna.load_study(study_name=s.study_name, storage=f"sqlite:///{out / 'study.db'}")
               for s in optuna.get_all_study_summaries(f"sqlite:///{out / 'study.db'}")]
    cut, rerun = study.trials[1], study.trials[2]
    assert cut.state == optuna.trial.TrialState.FAIL and rerun.user_attrs["interrupted"] == 1
    assert rerun.params == cut.params
    again = []
    search_mod.search(data, out, cfg, trials=3, log=again.append)  # all done: nothing runs
    assert not any("  trial " in m for m in again)
    assert len(pd.read_csv(out / "trials.csv")) == 3
    search_mod.search(data, out, cfg, trials=4, log=again.append)  # one more
    assert sum("  trial " in m for m in again) == 1
    assert len(pd.read_csv(out / "trials.csv")) == 4


def test_title_models_are_fitted_once_per_fold_and_reused_exactly(data, monkeypatch):
    """Two cross-validations over the same folds (two recipes of a preset) share each fold's title
    model: the second fits none and its out-of-fold probabilities are those of fitting them again."""
    from catalens.text.model import TitleModel
    from catalens.train.kfold import TitleModels, fold_parts, out_of_fold, prepare

    cfg = load_config(overrides=[{"head": {"epochs": 30}, "text": {"enabled": True},
                                  "engine": {"runtime": "eager", "progress": False}}])
    prep = prepare(data, cfg, log=lambda *a: None, classes_from="pool")
    parts = fold_parts(prep, product_folds(prep.cat, 3, cfg.seed), 3, cfg)
    fits = []
    real = TitleModel.fit
    monkeypatch.setattr(TitleModel, "fit", lambda self, *a, **k: fits.append(1) or real(self, *a, **k))
    alone, _ = out_of_fold(prep, parts, cfg)
    assert len(fits) == 3
    titles = TitleModels()
    first, _ = out_of_fold(prep, parts, cfg, titles=titles)
    logreg = cfg.model_copy(deep=True)
    logreg.head = type(cfg.head).model_validate({**cfg.head.model_dump(), "type": "logreg", "C": 0.1})
    second, _ = out_of_fold(prep, parts, logreg, titles=titles)
    assert len(fits) == 6 and titles.fits == 3 and len(titles.models) == 3 and titles.seconds > 0
    for name in alone:
        np.testing.assert_array_equal(first[name], alone[name])     # the same title models as without sharing
    fresh, _ = out_of_fold(prep, parts, logreg)
    for name in fresh:
        np.testing.assert_allclose(second[name], fresh[name], atol=1e-6)
    other = cfg.model_copy(deep=True)
    other.text.C = cfg.text.C * 2    # other text settings: other title models
    out_of_fold(prep, parts, other, titles=titles)
    assert titles.fits == 6
