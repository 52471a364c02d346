"""catalens train --preset fast|medium|best --time-limit (issue 16): budget kept, leaderboard, one model folder.

Tiny synthetic data, random weights, small input sides: the recipe list is patched to small sides so
that the test trains in seconds; the budget logic and the folder are those of the real presets.
"""
from __future__ import annotations

import json
import re
import time

import numpy as np
import pandas as pd
import pytest

import catalens
from catalens.cli import build_parser, main
from catalens.commands._common import config_from_args
from catalens.config import load_config
from catalens.train import presets as P
from catalens.train.presets import run as R
from catalens.train.presets.recipes import rel_cost

FAST = ["--no-progress", "--runtime", "eager"]


def test_parse_duration():
    assert P.parse_duration("20m") == 1200 and P.parse_duration("90s") == 90 and P.parse_duration("1h30m") == 5400
    assert P.parse_duration("1200") == 1200 and P.parse_duration(2.5) == 2.5 and P.parse_duration("1.5m") == 90
    with pytest.raises(ValueError, match=r"--time-limit '20 minutes': expected a duration such as 20m, 90s, "
                                         r"1h30m or 1200 \(seconds\)"):
        P.parse_duration("20 minutes")
    with pytest.raises(ValueError, match="must be more than 0 seconds"):
        P.parse_duration("0s")


def test_cli_flags(capsys):
    cfg = config_from_args(build_parser().parse_args(["train", "D", "--out", "M", "--preset", "best",
                                                      "--time-limit", "20m"]))
    assert cfg.preset.name == "best" and cfg.preset.time_limit == 1200
    assert config_from_args(build_parser().parse_args(["train", "D", "--out", "M"])).preset.name == "fast"
    off = config_from_args(build_parser().parse_args(["train", "D", "--out", "M", "--preset", "best",
                                                      "--set", "preset.titles=off"]))
    assert off.preset.titles == "off"  # YAML reads a bare off as False: taken as meant
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "D", "--out", "M", "--time-limit", "soon"])
    assert "argument --time-limit: expected a duration such as 20m" in capsys.readouterr().err


def test_recipes_of_the_presets():
    medium = [r.name for r in P.candidate_recipes("medium")]
    best = [r.name for r in P.candidate_recipes("best")]
    # the plain model last of them: first, it took 32 s of a 3-minute budget and Lite2@300 no longer fitted
    assert medium[0] == "lite1@272 crop 1 multilevel" and medium[-1] == P.PLAIN == "lite0 (plain catalens train)"
    assert "lite0@256+lite1@272+lite2@300 crop 1 multilevel" in medium
    assert best[:len(medium)] == medium and {"searched head", "best single + tta hflip"} <= set(best)
    # the searched head right after the frozen recipes (its first heads; more at the end), then the costly ones
    assert best[len(medium):len(medium) + 2] == ["searched head", "lite0 last stage fine-tuned"]
    assert "lite0 last stage fine-tuned" not in medium
    by_name = {r.name: r for r in P.candidate_recipes("best")}
    base = load_config(overrides=[{"tracking": False}])
    pools = {n: r.config(base, by_name).backbone.pool for n, r in by_name.items() if r.kind in ("frozen", "concat", "finetune")}
    assert pools.pop("lite0 (plain catalens train)") == "avg" and pools.pop("lite0 last stage fine-tuned") == "avg"
    assert set(pools.values()) == {"multilevel"} and len(pools) == 6  # the other frozen recipes and their concats
    heads = {n: r.config(base, by_name).head for n, r in by_name.items() if r.kind in ("frozen", "concat", "finetune")}
    assert heads.pop("lite0 (plain catalens train)").type == "linear"
    assert heads.pop("lite0 last stage fine-tuned").type == "linear"
    assert {(h.type, h.C, h.label_smoothing) for h in heads.values()} == {("logreg", 0.1, 0.1)}
    assert len(heads) == 6  # TTA: its single's head
    concat = by_name["lite0@256+lite1@272+lite2@300 crop 1 multilevel"].config(base, by_name).backbone
    assert concat.name == "efficientnet_lite0@256+efficientnet_lite1@272+efficientnet_lite2@300" and concat.crop_pct == 1.0
    assert rel_cost("efficientnet_lite0") == 1.0
    assert rel_cost("efficientnet_lite0@256+efficientnet_lite1@272") == pytest.approx(
        (256 / 224) ** 2 + 1.5 * (272 / 240) ** 2)


SMALL = [P.Recipe("lite0@64", "efficientnet_lite0@64", head=dict(P.LOGREG)),
         P.Recipe("lite0@80 crop 1", "efficientnet_lite0@80", 1.0, head=dict(P.LOGREG)),
         P.Recipe("both", members=("lite0@64", "lite0@80 crop 1"), kind="concat"),
         P.Recipe("searched head", kind="search")]


#: the limit of the tests whose searches are cut to a few seconds (so they take ~15 s whatever the limit):
#: room for every recipe on a loaded or slower machine (at 60 s, one was seen skipping its search under load)
SLACK = 240.0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from catalens.synthetic import make_catalogue

    return make_catalogue(tmp_path_factory.mktemp("preset") / "data", n_products=60, size=64, seed=2)


def _cfg(tmp, limit, name="best"):
    return load_config(overrides=[{"tracking": False, "cache_dir": str(tmp / "cache"),
                                   "engine": {"progress": False, "runtime": "eager", "workers": 0},
                                   "backbone": {"weights": "random"}, "head": {"epochs": 20},
                                   "preset": {"name": name, "time_limit": limit, "folds": 3}}])


def test_best_within_budget_writes_leaderboard_and_a_working_folder(data, tmp_path, monkeypatch):
    monkeypatch.setattr(R, "candidate_recipes", lambda preset: [P.Recipe(**r.__dict__) for r in SMALL])
    # the recipes take ~10 s on a quiet machine (~20 s seen under load), the searched head continues with the rest
    limit = 60.0
    t = time.time()
    P.train_preset(data, tmp_path / "m", _cfg(tmp_path, limit), log=lambda *a: None)
    took = time.time() - t
    assert took <= 1.15 * limit, f"took {took:.0f}s for a {limit:.0f}s limit"
    board = pd.read_csv(tmp_path / "m" / "leaderboard.csv")
    assert list(board.columns[:6]) == ["recipe", "cv_score", "fit_seconds", "predict_img_s", "weight", "status"]
    recipes = board["recipe"].tolist()
    assert {"lite0@64", "lite0@80 crop 1", "both"} <= set(recipes)
    scored = board[board["status"].isin(["chosen", "scored"])]
    assert len(scored) >= 3 and scored["cv_score"].between(0, 1).all()
    assert (board["status"] == "chosen").sum() >= 1
    searched = board.loc[board["recipe"].str.startswith("searched head"), "status"].tolist()
    assert searched and searched[0] in ("chosen", "scored"), searched   # its first heads fit: it is scored
    desc = json.loads((tmp_path / "m" / "model.json").read_text())
    preset = desc["preset"]
    assert preset["name"] == "best" and preset["folds"] == 3 and preset["time_limit"] == limit
    dec = preset["hierarchy_decoding"]  # department > category: decided on the blend's out-of-fold probabilities
    assert dec["mode"] == "auto" and desc["hierarchy_decoding"] is dec["chosen"]
    assert preset["cv_score"] == (dec["cv_decoded"] if dec["chosen"] else preset["cv_score"])
    chosen = board.loc[board["status"] == "chosen", "recipe"].str.split(" [(]").str[0]
    assert sorted(c["recipe"] for c in preset["chosen"]) == sorted(chosen)
    # the chosen logreg recipes end fitted on train + val (preset.refit_full); the AdamW ones do not
    folders = ([tmp_path / "m"] if len(preset["chosen"]) == 1 else
               [tmp_path / "m" / "members" / str(i) for i in range(len(preset["chosen"]))])
    refit = [i for i, f in enumerate(folders) if load_config(f / "config.yaml").head.type == "logreg"]
    if len(preset["chosen"]) == 1:
        assert (desc["refit_full"]["rows"] == desc["train_images"] + desc["val_images"]) if refit else \
            "refit_full" not in desc
    else:
        assert desc.get("refit_full", {}).get("members", []) == refit
    if len(preset["chosen"]) > 1:  # an ensemble folder: one row for it, first
        assert board["status"].iloc[0] == "the model" and "ensemble" in desc
        assert board["cv_score"].iloc[0] >= scored["cv_score"].max() - 1e-9
    # the folder is a model like any other: predict (Python and CLI) and evaluate accept it
    model = catalens.load(tmp_path / "m", runtime="eager", progress=False)
    photos = sorted((data.parent / "images").glob("*.jpg"))[:3]
    got = model.predict([str(p) for p in photos])
    assert len(got) == 3 and got["category"].notna().all()
    assert main(["predict", str(tmp_path / "m"), *map(str, photos), "--out", str(tmp_path / "p.csv"), *FAST]) == 0
    assert pd.read_csv(tmp_path / "p.csv")["category"].tolist() == got["category"].tolist()
    assert main(["evaluate", str(tmp_path / "m"), str(data), "--report", str(tmp_path / "ev"), *FAST]) == 0
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert ev["category"]["n"] > 0
    assert [r["recipe"] for r in ev["context"]["preset leaderboard"]] == [r["recipe"] for r in preset["leaderboard"]]
    assert ev["context"]["preset hierarchy decoding"] == (
        f"{'on' if dec['chosen'] else 'off'} (auto): CV {dec['cv_decoded']:.4f} decoded, "
        f"{dec['cv_argmax']:.4f} per-level argmax")
    refit = desc.get("refit_full")  # the report says the model learnt from train + val
    assert ev["context"].get("refit_full") == (None if refit is None else f"fitted again on train + val "
                                               f"({refit['rows']} photos)" if "rows" in refit else
                                               f"members {refit['members']} fitted again on train + val")


def test_the_searched_head_tries_its_first_heads_early_and_continues_at_the_end(data, tmp_path, monkeypatch):
    """The search's first part: trial 0 is the best recipe's own head with its known out-of-fold
    predictions (no fits), then SEARCH_FIRST's heads only; the recipes after it run; at the end the same
    study continues with what is left before the refit."""
    from catalens.train import search as S

    recipes = [*SMALL, P.Recipe("after", "efficientnet_lite0@72", head=dict(P.LOGREG))]
    monkeypatch.setattr(R, "candidate_recipes", lambda preset: [P.Recipe(**r.__dict__) for r in recipes])
    first = ({"type": "mlp", "hidden": 256, "lr": 1e-3, "dropout": 0.4},)
    monkeypatch.setattr(R, "SEARCH_FIRST", first)
    calls, real = [], S.search

    def spy(*a, **k):
        calls.append(k)
        if k["trials"] is None:   # the continued search: a few seconds are enough to test it
            k = {**k, "minutes": min(k["minutes"], 0.1)}
        return real(*a, **k)

    monkeypatch.setattr(S, "search", spy)
    lines, cfg = [], _cfg(tmp_path, SLACK)
    cfg.preset.titles = "off"   # with titles trial 0 is fitted again, without the title model (its own test)
    P.train_preset(data, tmp_path / "m", cfg, log=lines.append)
    assert len(calls) == 2, lines
    assert calls[0]["trials"] == 2 and calls[0]["first"] == first and calls[1]["trials"] is None
    value, oof, seconds = calls[0]["start_result"]
    order = [m.split(":")[0].strip() for m in lines if m.startswith("  ") and ": " in m]
    assert order.index("searched head") < order.index("after") < order.index("searched head, continued")
    board = pd.read_csv(tmp_path / "m" / "leaderboard.csv").set_index("recipe")
    best = board.loc[[r for r in board.index if r in ("lite0@64", "lite0@80 crop 1", "both")], "cv_score"].max()
    assert value == pytest.approx(best, abs=1e-6) and seconds > 0   # the best recipe's own CV, as scored
    searched = board.loc[[r for r in board.index if r.startswith("searched head (")]]
    assert len(searched) == 1 and searched["status"].iloc[0] in ("chosen", "scored")
    assert searched["cv_score"].iloc[0] >= best - 1e-9    # never below the head it started from
    assert re.search(r"searched head, continued: (no head better than the first part's CV [0-9.]+ \(|CV [0-9.]+ "
                     r"\(the first part's [0-9.]+, kept beside it; )\d+s, \d+ trials in all", "\n".join(lines))


def test_a_search_with_no_time_after_the_frozen_recipes_runs_whole_at_the_end(data, tmp_path, monkeypatch):
    """When its first heads do not fit after the frozen recipes, the search is tried again last, with all
    that is left before the refit: starting head, first heads and the sampler's, in one call."""
    from catalens.train import search as S

    monkeypatch.setattr(R, "candidate_recipes", lambda preset: [P.Recipe(**r.__dict__) for r in SMALL])
    guesses = iter([1e9])
    monkeypatch.setattr(R._PresetRun, "_trial_guess", lambda self, best: next(guesses, 0.0))
    calls, real = [], S.search
    monkeypatch.setattr(S, "search", lambda *a, **k: calls.append(k) or real(*a, **{**k, "minutes": min(k["minutes"], 0.1)}))
    lines, cfg = [], _cfg(tmp_path, SLACK)
    cfg.preset.titles = "off"
    P.train_preset(data, tmp_path / "m", cfg, log=lines.append)
    assert "  searched head: skipped: needs ~1000000000s, " in "\n".join(lines)
    assert any(m.startswith("  searched head, at the end: CV ") for m in lines), lines
    assert [c["trials"] for c in calls] == [None]
    board = pd.read_csv(tmp_path / "m" / "leaderboard.csv")
    assert board.loc[board["recipe"].str.startswith("searched head"), "status"].iloc[0] in ("chosen", "scored")


def test_catalens_runs_shows_a_preset_runs_leaderboard(data, tmp_path, monkeypatch, capsys):
    """The leaderboard goes into MLflow with the model folder: `catalens runs --leaderboard RUN` prints it; a
    run without a preset says why it has none."""
    pytest.importorskip("mlflow")
    from catalens.track import log_training

    monkeypatch.setattr(R, "candidate_recipes", lambda preset: [P.Recipe(**r.__dict__) for r in SMALL[:2]])
    monkeypatch.chdir(tmp_path)   # the default store: ./runs/mlflow.db
    for k in ("MLFLOW_TRACKING_URI", "CATALENS_TRACKING", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(k, raising=False)
    ids = {}
    for name in ("medium", "fast"):
        cfg = _cfg(tmp_path, SLACK, name)
        cfg.tracking = True
        res = P.train_preset(data, tmp_path / name, cfg, log=lambda *a: None)
        ids[name] = log_training(res, cfg, data=data, log=lambda *a: None)
    assert main(["runs", "--leaderboard", ids["medium"][:8]]) == 0
    board = pd.read_csv(tmp_path / "medium" / "leaderboard.csv")
    shown = capsys.readouterr()
    assert shown.out == board.to_string(index=False) + "\n" and "Downloading" not in shown.err
    assert {"lite0@64", "lite0@80 crop 1"} <= set(board["recipe"])
    assert main(["runs", "--leaderboard", ids["fast"][:8]]) == 2
    assert capsys.readouterr().err == (
        f"error: run {ids['fast'][:8]} (fast) has no leaderboard: it was trained with preset 'fast', and only "
        "'catalens train --preset medium' or '--preset best' writes one (runs with a preset show it in the "
        "'preset' column of 'catalens runs')\n")


def test_a_search_that_runs_out_of_time_is_a_skip_and_its_first_part_is_tried_again_at_the_end(
        data, tmp_path, monkeypatch):
    """No trial of the search finished in its seconds (a loaded machine): a budget skip like the others, not
    a failure. The first part's is tried again last with all that is left; the continued part's leaves the
    first part's head in place."""
    from catalens.train import search as S

    monkeypatch.setattr(R, "candidate_recipes", lambda preset: [P.Recipe(**r.__dict__) for r in SMALL])
    real = S.search

    def out_of_time_at(n: int):
        calls = []

        def fake(*a, **k):
            calls.append(k)
            if len(calls) == n:
                raise S.OutOfTime("catalens search: no trial finished within the 0.1-minute limit (...)")
            return real(*a, **{**k, "minutes": min(k["minutes"], 0.1)})
        return fake

    for n, name in ((1, "searched head"), (2, "searched head, continued")):
        monkeypatch.setattr(S, "search", out_of_time_at(n))
        lines, cfg = [], _cfg(tmp_path / str(n), SLACK)
        cfg.preset.titles = "off"
        P.train_preset(data, tmp_path / str(n) / "m", cfg, log=lines.append)
        assert any(re.fullmatch(rf"  {name}: skipped: no trial finished within its \d+s", m) for m in lines), lines
        board = pd.read_csv(tmp_path / str(n) / "m" / "leaderboard.csv")
        searched = board.loc[board["recipe"].str.startswith("searched head"), "status"].tolist()
        assert searched[0] in ("chosen", "scored"), searched   # tried again at the end / the first part stands
        if n == 1:
            assert any(m.startswith("  searched head, at the end: CV ") for m in lines), lines


def test_with_titles_a_search_that_beats_nothing_reuses_the_recipes_cv(data, tmp_path, monkeypatch):
    """With titles the trials leave the title model out, so a better head is cross-validated again with it;
    when no trial beat the starting head (the best recipe's own), that CV is the recipe's, known: not run again."""
    from catalens.train import search as S

    monkeypatch.setattr(R, "candidate_recipes", lambda preset: [P.Recipe(**r.__dict__) for r in SMALL])
    monkeypatch.setattr(R, "SEARCH_FIRST", ())   # the first part: the starting head alone, so nothing beats it
    real, real_cv, real_more = S.search, R._PresetRun._cv, R._PresetRun._search_more
    monkeypatch.setattr(S, "search", lambda *a, **k: real(*a, **k) if k["trials"] else  # the continued search:
                        real(*a, **{**k, "minutes": min(k["minutes"], 0.1)}))          # a few seconds are enough
    cvs, seen = [], {}
    monkeypatch.setattr(R._PresetRun, "_cv",
                        lambda self, s, *a, **k: cvs.append(s.recipe.name) or real_cv(self, s, *a, **k))

    def more(self):
        s = self.results[P.SEARCHED]
        seen.update(searched=s, on=self.results[s.recipe.name_detail])
        real_more(self)

    monkeypatch.setattr(R._PresetRun, "_search_more", more)
    lines = []
    P.train_preset(data, tmp_path / "m", _cfg(tmp_path, SLACK), log=lines.append)
    assert any("with titles" in m for m in lines[:1]), lines[:1]
    s, on = seen["searched"], seen["on"]
    # the recipes; not the searched head (a better head of the continued search would be: a recipe of its own)
    assert cvs[:3] == ["lite0@64", "lite0@80 crop 1", "both"] and set(cvs[3:]) <= {R.SEARCHED_MORE}
    assert s.oof is on.oof and s.score == on.score and s.scores == on.scores
    assert (s.cfg.head.type, s.cfg.head.C, s.cfg.head.label_smoothing) == ("logreg", 0.1, 0.1) == (
        on.cfg.head.type, on.cfg.head.C, on.cfg.head.label_smoothing)


def test_a_better_head_from_the_continued_search_is_a_recipe_beside_the_first(data, tmp_path, monkeypatch):
    """The second part's study is the first part's: a best trial with another head (heads are compared,
    not scores: with titles the trials' scores are image-only) becomes a recipe of its own, and the
    first part's head stays beside it, so the blend may take both (they share the features: one
    embedding at predict time)."""
    import dataclasses

    from catalens.train import search as S

    monkeypatch.setattr(R, "candidate_recipes", lambda preset: [P.Recipe(**r.__dict__) for r in SMALL])
    real, seen = S.search, {}

    def second_finds_another(*a, **k):
        res = real(*a, **{**k, "minutes": min(k["minutes"], 0.1)})
        if k["trials"] is None:   # the continued search: pretend its sampler found a better head
            res = dataclasses.replace(res, best_head={**res.best_head, "type": "logreg", "C": 7.0},
                                      best_value=res.best_value + 0.01)
        return res

    monkeypatch.setattr(S, "search", second_finds_another)
    real_more = R._PresetRun._search_more

    def more(self):
        seen["before"] = dict(self.results[P.SEARCHED].recipe.head or {})
        real_more(self)
        seen["after"] = dict(self.results[P.SEARCHED].recipe.head or {})
        seen["new"], seen["detail"] = self.results[R.SEARCHED_MORE], self.results[P.SEARCHED].recipe.name_detail

    monkeypatch.setattr(R._PresetRun, "_search_more", more)
    cfg, lines = _cfg(tmp_path, SLACK), []
    cfg.preset.titles = "off"
    P.train_preset(data, tmp_path / "m", cfg, log=lines.append)
    assert seen["before"].get("C") != 7.0 and seen["after"] == seen["before"]     # the first part's head stays
    new = seen["new"]
    assert new.recipe.head["C"] == 7.0 and new.recipe.head["type"] == "logreg" and new.status in ("scored", "chosen")
    assert new.recipe.name_detail == seen["detail"] and new.score > 0   # on the features the first part searched
    board = pd.read_csv(tmp_path / "m" / "leaderboard.csv")
    assert board["recipe"].str.startswith("searched head (").sum() == 1
    assert board["recipe"].str.startswith("searched head, continued (").sum() == 1
    assert any(m.startswith("  searched head, continued: CV ") and "kept beside it" in m for m in lines), lines


def test_a_budget_too_short_gives_the_plain_model(data, tmp_path, monkeypatch):
    monkeypatch.setattr(R, "candidate_recipes", lambda preset: [P.Recipe(**r.__dict__) for r in SMALL])
    lines = []
    P.train_preset(data, tmp_path / "m", _cfg(tmp_path, 0.5, "medium"), log=lines.append)
    board = pd.read_csv(tmp_path / "m" / "leaderboard.csv")
    assert board["status"].str.startswith("skipped").all()
    assert board.loc[board["recipe"] == "lite0@64", "status"].iloc[0].startswith("skipped: needs ~")
    assert "nothing could be scored in the time limit: training the plain model (preset fast)" in "\n".join(lines)
    desc = json.loads((tmp_path / "m" / "model.json").read_text())
    assert desc["backbone"]["name"] == "efficientnet_lite0" and desc["preset"]["chosen"] == []
    assert "ensemble" not in desc


def test_fast_is_the_plain_train(data, tmp_path):
    P.train_preset(data, tmp_path / "m", _cfg(tmp_path, 10, "fast"), log=lambda *a: None)
    assert (tmp_path / "m" / "model.json").exists() and not (tmp_path / "m" / "leaderboard.csv").exists()


def test_runs_list_shows_the_preset_cv():
    from catalens.track.mlflow_tracking import _headline

    got = _headline({"preset_cv_score": 0.912345, "val.label.accuracy": 0.9})
    assert got == {"label.accuracy": 0.9, "preset_cv": 0.9123}


def test_a_failing_recipe_costs_only_itself_and_finetune_is_refused(data, tmp_path, monkeypatch):
    monkeypatch.setattr(R, "candidate_recipes", lambda preset: [P.Recipe("lite0@64", "efficientnet_lite0@64"),
                                                                 P.Recipe("broken", "no_such_backbone_xyz")])
    P.train_preset(data, tmp_path / "m", _cfg(tmp_path, 120, "medium"), log=lambda *a: None)
    board = pd.read_csv(tmp_path / "m" / "leaderboard.csv").set_index("recipe")
    assert board.loc["lite0@64", "status"] == "chosen"
    assert board.loc["broken", "status"].startswith("failed: BackboneError: unknown backbone 'no_such_backbone_xyz'")
    cfg = load_config(overrides=[{"preset": {"name": "best"}, "finetune": {"mode": "blocks"}}])
    with pytest.raises(ValueError, match=r"--preset best chooses its own recipes \(best includes a last-stage "
                                         r"fine-tuning when it fits the time limit\); drop --finetune"):
        P.train_preset(data, tmp_path / "x", cfg)


def test_python_train_takes_preset_and_time_limit(data, tmp_path, monkeypatch):
    monkeypatch.setattr(R, "candidate_recipes", lambda preset: [P.Recipe(**r.__dict__) for r in SMALL])
    model = catalens.train(data, tmp_path / "m", preset="medium", time_limit="0.5s", tracking=False,
                           cache_dir=str(tmp_path / "cache"), backbone={"weights": "random"}, head={"epochs": 5},
                           engine={"progress": False, "runtime": "eager", "workers": 0})
    desc = json.loads((tmp_path / "m" / "model.json").read_text())
    assert desc["preset"]["name"] == "medium" and desc["preset"]["time_limit"] == 0.5
    assert (tmp_path / "m" / "leaderboard.csv").exists()
    photos = sorted((data.parent / "images").glob("*.jpg"))[:2]
    assert len(model.predict([str(p) for p in photos])) == 2
    with pytest.raises(ValueError, match="--time-limit 'soon': expected a duration"):
        catalens.train(data, tmp_path / "x", preset="best", time_limit="soon")


def test_a_chosen_side_by_side_recipe_is_refitted_through_the_shared_decode(data, tmp_path, monkeypatch):
    """The refit of a ``+`` recipe embeds the photos through the multi-backbone (one decode shared by the
    members, as predict computes them: no train/predict skew) and writes a multi-backbone model folder
    that predicts."""
    from catalens.embed import engine

    recipes = [P.Recipe("a", "efficientnet_lite0@64"), P.Recipe("b", "efficientnet_lite0@80"),
               P.Recipe("a+b", members=("a", "b"), kind="concat")]
    monkeypatch.setattr(R, "candidate_recipes", lambda preset: recipes)
    combine, refit = R._PresetRun._combine, R._PresetRun._refit
    embedded: list[int] = []

    def only_concat(self):
        s = self.results["a+b"]
        return [s], [1.0], s.score

    def refit_counting(self, *args):
        real = engine.engine_runner

        def counting(backbone, *a, **k):
            run = real(backbone, *a, **k)
            dims = backbone.feature_dim

            def counted(batch):
                out = run(batch)
                if dims == 2 * 1280:  # the multi-backbone, not a member
                    embedded.append(len(out))
                return out
            return counted
        monkeypatch.setattr(engine, "engine_runner", counting)
        return refit(self, *args)

    monkeypatch.setattr(R._PresetRun, "_combine", only_concat)
    monkeypatch.setattr(R._PresetRun, "_refit", refit_counting)
    cfg = _cfg(tmp_path, 300, "medium")
    cfg.backbone.weights = None  # the packaged ImageNet weights: random ones differ at every creation
    P.train_preset(data, tmp_path / "m", cfg, log=lambda *a: None)
    desc = json.loads((tmp_path / "m" / "model.json").read_text())
    assert desc["backbone"]["name"] == "efficientnet_lite0@64+efficientnet_lite0@80" and "ensemble" not in desc
    assert not (tmp_path / ".m.preset").exists()  # the work folder is removed
    from catalens.ingest.open import open_catalogue

    splits = open_catalogue(data).frame["split"]
    assert sum(embedded) == int(splits.isin(["train", "val"]).sum()) == 51  # every train + val photo, once
    monkeypatch.undo()
    model = catalens.load(tmp_path / "m", runtime="eager", progress=False)
    photos = sorted((data.parent / "images").glob("*.jpg"))[:2]
    assert model.predict([str(p) for p in photos])["category"].notna().all()


def test_an_ensemble_keeps_one_crop_mode(data, tmp_path, monkeypatch):
    """Members of an ensemble share one decode: a padded recipe is never combined with centre-cropped ones."""
    recipes = [P.Recipe("centre", "efficientnet_lite0@64"), P.Recipe("padded", "efficientnet_lite0@64", 1.0, "pad")]
    monkeypatch.setattr(R, "candidate_recipes", lambda preset: recipes)
    P.train_preset(data, tmp_path / "m", _cfg(tmp_path, 120, "best"), log=lambda *a: None)
    board = pd.read_csv(tmp_path / "m" / "leaderboard.csv").set_index("recipe")
    assert (board.loc[["centre", "padded"], "status"] == "chosen").sum() == 1
    assert "ensemble" not in json.loads((tmp_path / "m" / "model.json").read_text())


def test_best_scores_a_finetuned_recipe_out_of_fold_and_can_choose_it(data, tmp_path, monkeypatch):
    """The fine-tuned recipe: K' = preset.finetune_folds fine-tunings, each predicting its held-out fold
    through its own fine-tuned backbone; every row gets an out-of-fold probability; the leaderboard lists it;
    refitted when chosen, the folder records the fine-tuning."""
    recipes = [P.Recipe("lite0@64", "efficientnet_lite0@64"),
               P.Recipe("ft", "efficientnet_lite0@64", kind="finetune")]
    monkeypatch.setattr(R, "candidate_recipes", lambda preset: [P.Recipe(**r.__dict__) for r in recipes])
    seen = {}
    real = R._PresetRun._score_finetune

    def spy(self, s):
        real(self, s)
        seen["rows"], seen["scored"] = len(s.prep.cat), int(s.scored.sum())
        seen["oof_sums"] = np.nansum(s.oof["category"], axis=1)

    monkeypatch.setattr(R._PresetRun, "_score_finetune", spy)
    cfg = _cfg(tmp_path, 300)
    cfg.finetune.epochs, cfg.finetune.views = 2, 1
    cfg.preset.finetune_folds = 2
    lines = []
    P.train_preset(data, tmp_path / "m", cfg, log=lines.append)
    assert "scored" in seen, "\n".join(lines)
    assert seen["scored"] == seen["rows"] and np.allclose(seen["oof_sums"], 1.0, atol=1e-4)
    board = pd.read_csv(tmp_path / "m" / "leaderboard.csv").set_index("recipe")
    assert board.loc["ft", "status"] in ("chosen", "scored") and 0 <= board.loc["ft", "cv_score"] <= 1
    assert any(line.startswith("  ft: CV ") for line in lines)
    desc = json.loads((tmp_path / "m" / "model.json").read_text())
    if board.loc["ft", "status"] == "chosen" and "ensemble" not in desc:
        assert desc["finetune"]["mode"] == "blocks"
    assert not (tmp_path / ".m.preset").exists()  # fold models and their private feature cache removed


def test_a_preset_ensemble_calibrates_its_own_accept_and_unknown(data, tmp_path, monkeypatch):
    """When the blend picks several recipes, the ensemble folder gets accept and unknown thresholds chosen
    on the val photos with the ensemble's own probabilities (as `catalens ensemble`), not nulls; the accept
    thresholds also on the train photos' out-of-fold probabilities of the blend (as a single recipe's)."""
    monkeypatch.setattr(R, "candidate_recipes", lambda preset: [P.Recipe(**r.__dict__) for r in SMALL[:2]])
    real = R._PresetRun._combine

    def both(self):  # force an ensemble of the two recipes
        real(self)
        done = [s for s in self.results.values() if s.oof is not None]
        return done, [1.0] * len(done), 0.5

    monkeypatch.setattr(R._PresetRun, "_combine", both)
    cfg = _cfg(tmp_path, 200)
    cfg.preset.titles = "off"  # image heads: their thresholds take out-of-fold photos (with titles val alone)
    cfg.preset.hierarchy_decoding = "on"
    lines = []
    P.train_preset(data, tmp_path / "m", cfg, log=lines.append)
    desc = json.loads((tmp_path / "m" / "model.json").read_text())
    assert desc["hierarchy_decoding"] is True and desc["preset"]["hierarchy_decoding"]["chosen"] is True
    # the refit's steps, logged (a 3-minute run's refit was estimated at 23 s and took 35 s)
    assert [m for m in lines if re.fullmatch(r"  refit: \d+s \(members trained \d+s; the ensemble's thresholds \d+s; "
                                             r"refit_full \d+s; written \d+s\)", m)], lines
    assert "ensemble" in desc and len(desc["preset"]["chosen"]) == 2
    source = re.fullmatch(r"val \(9 photos of .*\), the ensemble's probabilities \+ out-of-fold train \((\d+) "
                          r"photos, the preset's 3-fold CV of the blend\)", desc["accept"]["source"])
    member0 = json.loads((tmp_path / "m" / "members" / "0" / "model.json").read_text())
    assert source and int(source.group(1)) == member0["train_images"] == 42, desc["accept"]["source"]
    assert set(desc["accept"]["thresholds"]) == {"category", "department"}
    assert desc["unknown"] is not None
    # chosen on val with the members as fitted on train; then each member learnt from train + val
    assert desc["refit_full"]["members"] == [0, 1]
    for i in (0, 1):
        member = json.loads((tmp_path / "m" / "members" / str(i) / "model.json").read_text())
        assert member["refit_full"]["rows"] == member["train_images"] + member["val_images"]
        # the members' own thresholds reused the preset's out-of-fold predictions: no fold heads fitted again
        assert re.fullmatch(rf"val \(9 photos\) \+ out-of-fold train \({member['train_images']} photos, "
                            rf"the preset's {desc['preset']['folds']}-fold CV of this recipe\)",
                            member["accept"]["source"]), member["accept"]["source"]
        again = load_config(tmp_path / "m" / "members" / str(i) / "config.yaml")  # trains the member again
        assert again.preset.name == "fast" and again.data.refit_full and again.head.type == "logreg"
    got = catalens.load(tmp_path / "m", runtime="eager", progress=False).predict(
        [str(p) for p in sorted((data.parent / "images").glob("*.jpg"))[:12]])
    assert got["category_accept"].notna().all() and got["unknown"].notna().all()
    from catalens.synthetic import DEPARTMENT_OF   # decoded: every answer is a path seen in training

    assert (got["department"] == got["category"].map(DEPARTMENT_OF)).all()


def _bare_run(limit: float = 1200.0):
    """A preset run without data: 900 train + 100 val photos, Lite0@224 embedding at 100 img/s."""
    run = R._PresetRun.__new__(R._PresetRun)
    run.base, run.recipes = load_config(), {r.name: r for r in P.candidate_recipes("best")}
    run.pool = type("Pool", (), {"frame": pd.DataFrame({"split": ["train"] * 900 + ["val"] * 100}),
                                 "__len__": lambda self: 1000})()
    run.clock = R.Clock(limit)
    run.clock.spi = 0.01
    run.k, run.log, run.results = 5, [].append, {}
    return run


def test_a_refit_embeds_shared_features_once():
    """A searched head and the `+` recipe it was searched on share the multi-backbone's features: the refit
    estimate of both counts that embedding once (the second refit reads it from the cache)."""
    run = _bare_run()
    three = run.recipes["lite0@256+lite1@272+lite2@300 crop 1 multilevel"]
    concat = R.Scored(three, fit_each=10.0, cfg=three.config(run.base, run.recipes))
    found = P.Recipe("searched head", kind="search", members=three.members, head={"type": "mlp"})
    searched = R.Scored(found, fit_each=20.0, cfg=concat.cfg)
    embed = 1000 * 0.01 * rel_cost("efficientnet_lite0@256+efficientnet_lite1@272+efficientnet_lite2@300")
    assert run._refit_cost(concat) == pytest.approx(10.0 * 1.3 * 2 + 3.0 + embed)   # logreg: refit_full fit too
    assert run._refit_cost(searched) == pytest.approx(20.0 * 1.3 + 3.0 + embed)     # mlp: fitted once
    val_pass = 100 * 0.01 * rel_cost(concat.cfg.backbone.name)                  # the ensemble's thresholds
    assert run._refit_total([concat, searched]) == pytest.approx(29.0 + 29.0 + embed + 5.0 + val_pass)
    lite2 = R.Scored(run.recipes["lite2@300 crop 1 multilevel"], fit_each=4.0)
    assert run._refit_total([lite2]) == pytest.approx(4.0 * 1.3 * 2 + 3.0 + 5.0)  # cached: no embedding


def test_a_blend_of_the_three_and_their_singles_runs_each_backbone_once():
    """Lite1, Lite0, Lite2 and the three side by side (fashion-products' blend): the ensemble runs each backbone
    once (catalens.model.ensemble), so the leaderboard's predict speed is the three's, and the refit's estimate
    of predicting the val photos through the ensemble counts each backbone once."""
    from catalens.train.presets.leaderboard import ensemble_row

    run = _bare_run()
    names = ["lite1@272 crop 1 multilevel", "lite0@256 crop 1 multilevel", "lite2@300 crop 1 multilevel",
             "lite0@256+lite1@272+lite2@300 crop 1 multilevel"]
    speeds = {names[0]: 110.0, names[1]: 160.0, names[2]: 86.6}
    for n in names:
        r = run.recipes[n]
        run.results[n] = R.Scored(r, fit_each=4.0, cfg=r.config(run.base, run.recipes), img_s=speeds.get(n))
    three = run.results[names[3]]
    three.img_s = round(1.0 / sum(1.0 / v for v in speeds.values()), 1)
    chosen = [run.results[n] for n in names]
    row = ensemble_row(chosen, [1.0] * 4, 0.9, 12.0, run.results)
    assert three.img_s == 37.2 and row["predict_img_s"] == 37.2
    assert row["recipe"].startswith("ensemble of the chosen (1 x lite1@272 crop 1 multilevel, ")
    val_pass = 100 * 0.01 * rel_cost(three.cfg.backbone.name)   # not twice: the singles are parts of the three
    embed = 1000 * 0.01 * rel_cost(three.cfg.backbone.name)     # the three's refit embeds through its own decode
    fits = sum(run._refit_fits(s) for s in chosen)
    assert run._refit_total(chosen) == pytest.approx(fits + embed + 5.0 + val_pass)


def test_embedding_estimates_use_each_backbones_measured_speed():
    """The clock keeps each backbone's measured seconds per image: a `+` refit costs the sum of its parts'
    (each with its own decode: an upper bound, the multi-backbone decodes once), where scaling the last
    measured speed by ``rel_cost`` counted the decode in every part (clothing-small: Lite2@300 12.4 ms per
    photo against Lite0's 6.4 ms, rel 2.8). A part not measured yet: the line decode + net x rel through the
    measured backbones (one measured: its speed scaled by rel). A TTA pass costs
    ``TTA_VIEW_COST`` plain passes per view (the engine runs the plain network once per pixel view), with a
    view that needs the TTA graph ``TTA_GRAPH_VIEW_COST``."""
    from catalens.train.presets import budget as B

    run = _bare_run()
    three = run.recipes["lite0@256+lite1@272+lite2@300 crop 1 multilevel"]
    concat = R.Scored(three, fit_each=10.0, cfg=three.config(run.base, run.recipes))
    spec = concat.cfg.backbone.name
    run.clock.learn_embed(8.0, 1000, "efficientnet_lite0@256")
    run.clock.learn_embed(11.0, 1000, "efficientnet_lite1@272")
    # Lite2@300 not measured yet: the line through the two measured, decode + net x rel (decode once)
    decode, net = run.clock.speed_line()
    assert net == pytest.approx(0.003 / (rel_cost("efficientnet_lite1@272") - rel_cost("efficientnet_lite0@256")))
    assert decode == pytest.approx(0.008 - net * rel_cost("efficientnet_lite0@256")) and 0.0016 < decode < 0.0018
    assert run._refit_embed(concat)[1] == pytest.approx(1000 * (decode + net * rel_cost(spec)))
    run.clock.learn_embed(14.0, 1000, "efficientnet_lite2@300")
    assert run.clock.per_image(spec) == pytest.approx(0.033)
    assert run._refit_embed(concat)[1] == pytest.approx(33.0)
    assert run._pass_cost("efficientnet_lite2@300", ("hflip",)) == pytest.approx(0.014 * 2 * B.TTA_VIEW_COST)
    zoom = run._pass_cost("efficientnet_lite2@300", ("hflip", "zoom"))   # the TTA graph
    assert zoom == pytest.approx(0.014 * 3 * B.TTA_GRAPH_VIEW_COST)
    assert run._pass_cost("efficientnet_lite2@300") == pytest.approx(0.014)
    decode, net = run.clock.speed_line()   # through the three now
    assert run.clock.per_image("efficientnet_lite0") == pytest.approx(decode + net)   # never measured
    one = _bare_run()
    one.clock.learn_embed(14.0, 1000, "efficientnet_lite2@300")
    assert one.clock.speed_line() is None   # one point: its speed scaled by rel
    assert one.clock.per_image("efficientnet_lite0") == pytest.approx(0.014 / rel_cost("efficientnet_lite2@300"))
    one.clock.learn_embed(15.0, 1000, "efficientnet_lite0@256")
    assert one.clock.speed_line() is None   # slower at a smaller rel: no line, scaled from the last measured
    assert one.clock.per_image("efficientnet_lite0") == pytest.approx(0.015 / rel_cost("efficientnet_lite0@256"))


def test_a_padded_recipe_is_skipped_when_the_photos_are_square(data, tmp_path, monkeypatch):
    """Padding a square photo to a square changes nothing: the padded twin of a scored centre-cropped
    recipe is skipped with the reason, not scored again; one photo that is not square keeps it."""
    from PIL import Image

    from catalens.ingest.open import open_catalogue
    from catalens.synthetic import make_catalogue

    recipes = [P.Recipe("centre", "efficientnet_lite0@64", 1.0), P.Recipe("padded", "efficientnet_lite0@64", 1.0, "pad")]
    monkeypatch.setattr(R, "candidate_recipes", lambda preset: [P.Recipe(**r.__dict__) for r in recipes])
    P.train_preset(data, tmp_path / "m", _cfg(tmp_path, 120, "best"), log=lambda *a: None)
    board = pd.read_csv(tmp_path / "m" / "leaderboard.csv").set_index("recipe")
    assert board.loc["padded", "status"] == "skipped: the photos are square (a sample of 51): padded, they give " \
                                            "the pixels of centre"
    small = make_catalogue(tmp_path / "small", n_products=8, size=32, seed=1)
    cat = open_catalogue(small)
    assert R.all_square(cat)
    path = small.parent / "images" / f"{cat.frame['id'].iloc[3]}.jpg"
    Image.new("RGB", (40, 32), (200, 10, 10)).save(path)
    assert not R.all_square(open_catalogue(small))


def test_a_recipe_counted_with_its_own_refit_keeps_the_refits_of_two_others_beside_it(monkeypatch):
    """The final refit is kept for three recipes (an ensemble rarely has more). A recipe whose estimate
    counts its own refit is checked against the refits of the two best so far beside it; before, three
    more were kept for it, four refits in all (on fashion-products the three backbones side by side were
    skipped by 6 s that way). A recipe whose own refit is not counted (TTA) still keeps three."""
    run = _bare_run()
    for name, score in (("lite1@272 crop 1 multilevel", 0.91), ("lite0@256 crop 1 multilevel", 0.90),
                        ("lite2@300 crop 1 multilevel", 0.905)):
        run.results[name] = R.Scored(run.recipes[name], score=score, oof={}, fit_each=10.0,  # refit: 29 s each
                                     cfg=run.recipes[name].config(run.base, run.recipes))
    top = sorted(run.results.values(), key=lambda x: -x.score)
    r2, r3 = run._reserve(2), run._reserve()
    assert r3 == run._refit_total(top) and r2 == run._refit_total(top[:2]) and r3 - r2 > 29.0
    monkeypatch.setattr(R._PresetRun, "_estimate", lambda self, recipe: 100.0)
    monkeypatch.setattr(R._PresetRun, "_score", lambda self, s, left, last=False: setattr(s, "score", 0.92))
    three = run.recipes["lite0@256+lite1@272+lite2@300 crop 1 multilevel"]
    own = run._refit_cost(R.Scored(three))
    run.clock = _bare_run(100.0 + own + r2 + 10.0).clock   # 10 s to spare beside two refits, short of three
    run._try(three)
    assert run.results[three.name].status == "scored"
    tta = run.recipes["best single + tta hflip"]
    run.clock = _bare_run(100.0 + r3 - 1.0).clock          # TTA: its 100 s and three refits do not fit
    run._try(tta)
    assert run.results[tta.name].status.startswith("skipped: needs ~100s, ")


def test_calibrate_embed_times_a_sample_after_the_runtimes_start(monkeypatch):
    """The embedding speed is measured on two of the engine's batches spread over the pool, after one batch
    that starts the runtime (untimed: the first call builds it, and a runtime prepares each new batch shape on
    its first call); the clock then estimates from it."""
    from catalens.embed import features as F
    from catalens.train.presets import budget as B

    calls = []

    def fake(cat, backbone, cfg):
        calls.append(list(cat.rows))
        time.sleep(1.0 if len(calls) == 1 else 0.004 * len(cat.rows))   # the first: the runtime's start

    class Pool:
        def __init__(self, rows):
            self.rows = rows

        def __len__(self):
            return len(self.rows)

        def subset(self, mask):
            return Pool([r for r, m in zip(self.rows, mask) if m])

    monkeypatch.setattr(F, "catalogue_features", fake)
    clock = B.Clock(600.0)
    cfg = load_config(None)
    assert cfg.engine.batch_size == 64 and B.calibration_sizes(64) == (64, 128)
    speed, timed, warm = B.calibrate_embed(clock, Pool(list(range(1000))), None, cfg, "efficientnet_lite2@300")
    assert [len(c) for c in calls] == [64, 128] and (timed, warm) == (128, 64) and not set(calls[0]) & set(calls[1])
    assert calls[0][0] == 0 and calls[1][-1] == 999   # spread over the whole pool
    assert clock.measured_embed and clock.spi == pytest.approx(0.004 / rel_cost("efficientnet_lite2@300"), rel=0.25)
    assert clock.spec_spi == {"efficientnet_lite2@300": pytest.approx(0.004, rel=0.25)}   # the speed of that backbone
    assert speed == pytest.approx(250, rel=0.25)


def test_the_first_estimate_with_many_photos_to_embed_calibrates_once(monkeypatch):
    """Before anything is measured, a recipe with at least CALIBRATE_FROM photos to embed measures the speed
    first (the first guess, 40 img/s, is about half this machine's); later estimates use what was measured."""
    run = _bare_run(180.0)
    lines = []
    run.log = lines.append
    calls = []

    def calibrate(clock, pool, backbone, cfg, spec):
        calls.append(spec)
        clock.learn_embed(1.0, 96, spec)   # 96 photos a second
        return 96.0, 128, 64

    monkeypatch.setattr(R, "uncached_share", lambda *a: 1.0)
    monkeypatch.setattr(R, "calibrate_embed", calibrate)
    plain = run.recipes["lite0 (plain catalens train)"]
    first = run._estimate(plain)
    once = ["efficientnet_lite0"]   # the plain recipe's spec: the speed kept for that backbone
    assert calls == once and lines == ["  embedding speed: 96 img/s for efficientnet_lite0 (a sample of 128 photos, "
                                       "after 64 to start)"]
    fits = run.clock.fit_cost(1000, 1280) * 5
    assert first == pytest.approx(1000 / 96 + fits)   # not 1000 / 40 + fits
    run._estimate(run.recipes["lite1@272 crop 1 multilevel"])
    assert calls == once   # measured once
    few = _bare_run(180.0)
    few.pool = type("Pool", (), {"frame": pd.DataFrame({"split": ["train"] * 300}), "__len__": lambda self: 300})()
    few.log = lines.append
    few._estimate(plain)
    assert calls == once and not few.clock.measured_embed   # 300 photos: the first guess is a few seconds off


def test_the_three_side_by_side_come_before_the_pair_whose_refit_would_crowd_them_out(monkeypatch):
    """The three backbones side by side are tried right after the singles, the pair after them. Scored
    first, the pair's refit (its own multi-backbone embedding) joins the refit reserve and the three no
    longer fit where they would have (fashion-products on a slower machine, 2026-12-02 05:39: skipped,
    needs ~488 s, 254 s left)."""
    concat = [r.name for r in P.candidate_recipes("best") if r.kind == "concat"]
    assert concat == ["lite0@256+lite1@272+lite2@300 crop 1 multilevel", "lite0@256+lite1@272 crop 1 multilevel"]
    singles = {"lite1@272 crop 1 multilevel": 0.89, "lite0@256 crop 1 multilevel": 0.891,
               "lite2@300 crop 1 multilevel": 0.889}

    def scored_singles():
        run = _bare_run()
        for name, score in singles.items():
            run.results[name] = R.Scored(run.recipes[name], score=score, oof={}, fit_each=10.0,
                                         cfg=run.recipes[name].config(run.base, run.recipes))
        return run

    def score(self, s, left, last=False):
        s.score, s.oof, s.fit_each = 0.902 if len(s.recipe.members) == 3 else 0.899, {}, 10.0
        s.cfg = s.recipe.config(self.base, self.recipes)

    monkeypatch.setattr(R._PresetRun, "_estimate", lambda self, recipe: 100.0)
    monkeypatch.setattr(R._PresetRun, "_score", score)
    run = scored_singles()
    three, pair = (run.recipes[n] for n in concat)
    limit = 100.0 + run._refit_cost(R.Scored(three)) + run._reserve(2) + 10.0   # 10 s to spare after the singles
    for order in ((three, pair), (pair, three)):
        run = scored_singles()
        run.clock = _bare_run(limit).clock
        for recipe in order:
            run._try(recipe)
        status = {r.name: run.results[r.name].status for r in order}
        if order[0] is three:
            assert status[three.name] == "scored"
        else:   # the old order: the pair's refit embedding (~32 s here) in the reserve leaves the three out
            assert status[pair.name] == "scored" and status[three.name].startswith("skipped: needs ~")


def test_the_refit_reserve_counts_shared_features_once():
    """The searched head and the `+` recipe it was searched on share one embedding in the refit: the
    reserve kept while recipes are scored counts it once, as the refit's own estimate does."""
    run = _bare_run()
    three = run.recipes["lite0@256+lite1@272+lite2@300 crop 1 multilevel"]
    cfg = three.config(run.base, run.recipes)
    found = P.Recipe("searched head", kind="search", members=three.members, head={"type": "mlp"})
    run.results = {three.name: R.Scored(three, score=0.92, oof={}, fit_each=10.0, cfg=cfg),
                   "searched head": R.Scored(found, score=0.927, oof={}, fit_each=20.0, cfg=cfg)}
    embed = 1000 * 0.01 * rel_cost(cfg.backbone.name)
    both = sum(run._refit_cost(s) for s in run.results.values())
    assert run._reserve() == pytest.approx(both - embed + 5.0 + 100 * 0.01 * rel_cost(cfg.backbone.name))


def _decoding_run(data, mode: str):
    """A bare run of 3 folds over the synthetic pool (department > category) with one scored recipe whose
    out-of-fold probabilities are the labels, confident, for every row."""
    from catalens.ingest.open import open_catalogue
    from catalens.train.kfold import Prepared, pool_tasks

    cat = open_catalogue(data)
    pool = cat.subset(cat.frame["split"].isin(["train", "val"]).to_numpy())
    tasks = pool_tasks(pool)
    Y = pool.encode(tasks)
    prep = Prepared(pool, tasks, Y, np.zeros((len(pool), 1), np.float32), np.ones(len(pool), bool),
                    np.full(len(pool), None, object))
    oof = {}
    for t in tasks:
        if t.kind == "class":
            p = np.full((len(pool), t.n_outputs), 0.1 / (t.n_outputs - 1))
            p[np.arange(len(pool)), Y[t.name]] = 0.9
        else:
            p = np.nan_to_num(Y[t.name])
        oof[t.name] = p
    run = _bare_run()
    run.k, run.logged = 3, []
    run.log = run.logged.append
    run.base.preset.hierarchy_decoding = mode
    s = R.Scored(run.recipes["lite2@300 crop 1 multilevel"], oof=oof, prep=prep, cfg=run.base,
                 scored=np.ones(len(pool), bool))
    return run, s, tasks


def _set_row(s, tasks, row: int, department: dict, category: dict) -> None:
    """Row ``row``'s department and category probabilities: ``{label: p}``, the rest spread evenly."""
    for t, want in zip(tasks[:2], (department, category)):
        p = np.full(t.n_outputs, (1 - sum(want.values())) / (t.n_outputs - len(want)))
        for label, v in want.items():
            p[t.classes.index(label)] = v
        s.oof[t.name][row] = p


def test_the_preset_decodes_label_paths_when_that_raises_the_out_of_fold_score(data):
    """preset.hierarchy_decoding auto: each fold's out-of-fold rows decoded with the paths of that fold's
    training rows; on when the objective (mean of department and category accuracy and pattern mAP) rises."""
    run, s, tasks = _decoding_run(data, "auto")
    n = len(s.scored)
    dept = s.prep.cat.frame["department"].to_numpy()
    rows = np.flatnonzero(dept == "bottoms")[:3]
    for r in rows:  # the category leans to a hat (0.55 against its own 0.45), the department is sure: decoding mends it
        own = s.prep.cat.frame["category"].iloc[r]
        _set_row(s, tasks, r, {"bottoms": 0.97}, {own: 0.44, "hat": 0.55})
    blend = run._decide_decoding([s], [1.0], 0.5)
    argmax = (1 + (n - 3) / n + 1) / 3
    assert run.decoding == {"chosen": True, "mode": "auto", "cv_argmax": round(argmax, 6), "cv_decoded": 1.0}
    assert blend == 1.0 and run._decodes()
    assert run.logged[-1] == f"  hierarchy decoding on (auto): CV 1.0000 decoded, {argmax:.4f} per-level argmax"

    run, s, tasks = _decoding_run(data, "auto")
    for r in rows:  # the category is sure of a hat, the department barely of bottoms: decoding spoils the department
        _set_row(s, tasks, r, {"bottoms": 0.55, "accessories": 0.44}, {"hat": 0.95})
    assert run._decide_decoding([s], [1.0], 0.5) == 0.5 and not run._decodes()
    assert run.decoding == {"chosen": False, "mode": "auto", "cv_argmax": round(argmax, 6),
                            "cv_decoded": round((2 * (n - 3) / n + 1) / 3, 6)}
    run.base.preset.hierarchy_decoding = "on"   # asked for: on, with the decoded score
    assert run._decide_decoding([s], [1.0], 0.5) == pytest.approx((2 * (n - 3) / n + 1) / 3)
    assert run.decoding["chosen"] and run.decoding["mode"] == "on"
    run.base.preset.hierarchy_decoding = "off"
    assert run._decide_decoding([s], [1.0], 0.5) == 0.5 and run.decoding == {"chosen": False, "mode": "off"}
    run.base.preset.hierarchy_decoding, run.base.hierarchy_decoding = "auto", True  # --hierarchical-decoding
    run._decide_decoding([s], [1.0], 0.5)
    assert run.decoding["chosen"] and run.decoding["mode"] == "on"


def test_greedy_blend_selects_by_log_loss_and_reports_the_preset_objective():
    """greedy_blend selects by log-loss by default: the recipe sure and right on three rows, unsure and wrong
    on one (log-loss 0.308 against 0.673), where the preset's objective (accuracy) would pick the one right on
    every row at 0.51. Adding the other to either lowers its criterion, so each blend is one recipe. The value
    returned is the chosen blend's accuracy either way."""
    from types import SimpleNamespace

    from catalens.tasks import TaskInfo
    from catalens.train.presets.blend import greedy_blend
    from catalens.train.search import objective_value

    y = np.array([0, 0, 1, 1])
    task = TaskInfo("label", "class", ["a", "b"])
    prep = SimpleNamespace(tasks=[task], select=lambda mask: {"label": y[mask]})

    def probs(p_true):  # (4, 2): p_true on each row's own class
        p = np.empty((4, 2))
        p[np.arange(4), y], p[np.arange(4), 1 - y] = p_true, 1 - np.asarray(p_true)
        return p

    cfg = load_config()
    sure = R.Scored(R.Recipe("sure"), oof={"label": probs([0.9, 0.9, 0.9, 0.4])}, prep=prep, cfg=cfg,
                    scored=np.ones(4, bool))
    even = R.Scored(R.Recipe("even"), oof={"label": probs([0.51] * 4)}, prep=prep, cfg=cfg, scored=np.ones(4, bool))

    never = (lambda members: 0.0, lambda: float("inf"))
    chosen, weights, value = greedy_blend([sure, even], *never)
    assert ([s.recipe.name for s in chosen], weights, value) == (["sure"], [1.0], 0.75)
    chosen, weights, value = greedy_blend([sure, even], *never, select_by=objective_value)
    assert ([s.recipe.name for s in chosen], weights, value) == (["even"], [1.0], 1.0)


def test_neg_log_loss_leaves_out_missing_labels_and_averages_the_tasks():
    """neg_log_loss: class rows labelled MISSING and NaN tags are left out; the tasks weigh the same."""
    from catalens.tasks import MISSING, TaskInfo
    from catalens.train.presets.blend import neg_log_loss

    tasks = [TaskInfo("cat", "class", ["a", "b"]), TaskInfo("tags", "tags", ["x", "y"])]
    Y = {"cat": np.array([0, MISSING, 1]), "tags": np.array([[1.0, np.nan], [0.0, 1.0], [np.nan, np.nan]])}
    P = {"cat": np.array([[0.8, 0.2], [0.0, 1.0], [0.5, 0.5]]),
         "tags": np.array([[0.9, 0.0], [0.2, 0.6], [0.0, 1.0]])}
    cat = -(np.log(0.8) + np.log(0.5)) / 2
    tags = -(np.log(0.9) + np.log(0.8) + np.log(0.6)) / 3
    assert neg_log_loss(tasks, Y, P) == pytest.approx(-(cat + tags) / 2)
    # the class part is the report's log-loss (catalens.evaluate.metrics.log_loss): rows renormalised, clipped at 1e-15
    one = tasks[:1]
    assert neg_log_loss(one, {"cat": np.array([0])}, {"cat": np.array([[0.0, 1.0]])}) == pytest.approx(np.log(1e-15))
    assert neg_log_loss(one, {"cat": np.array([0])}, {"cat": np.array([[0.2, 0.6]])}) == pytest.approx(np.log(0.25))
    # the tags part clips at the blend's EPS (1e-7) on both sides
    assert neg_log_loss(tasks[1:], {"tags": np.array([[1.0, 0.0]])}, {"tags": np.array([[0.0, 0.0]])}) \
        == pytest.approx(np.log(1e-7) / 2)
