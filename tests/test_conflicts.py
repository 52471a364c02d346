"""Title–image conflicts (issue 14, item 5): exact scores and thresholds on hand-made
probabilities, the decoder's columns / arrow schema / server record, and a synthetic model
trained with titles (threshold stored in text/fusion.json, conflicts in every output)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from catalens.model.decode import Decoder, FusedProbs, arrow_schema, column_names
from catalens.tasks import TaskInfo
from catalens.text.conflict import (DEFAULT_CONFLICT, choose_threshold, conflict_scores, describe,
                                    photo_scores)
from catalens.text.fusion import TextFusion

TASKS = [TaskInfo("category", "class", ["shirt", "shoe", "bag"]),
         TaskInfo("pattern", "tags", ["striped", "solid"], thresholds=[0.5, 0.5])]


class _Titles:
    """A title model answering from a fixed table (title -> probabilities per task)."""

    def __init__(self, table: dict) -> None:
        self.table, self.tasks = table, TASKS

    def predict_proba(self, texts):
        return {t.name: np.array([self.table[x][t.name] for x in texts], np.float32) for t in TASKS}


TABLE = {"striped shirt": {"category": [0.97, 0.02, 0.01], "pattern": [0.95, 0.05]},
         "running shoe": {"category": [0.02, 0.96, 0.02], "pattern": [0.1, 0.5]},
         "some shirt": {"category": [0.55, 0.40, 0.05], "pattern": [0.3, 0.3]}}
IMAGE = {"category": np.array([[0.02, 0.98, 0.0], [0.01, 0.99, 0.0], [0.1, 0.9, 0.0], [0.05, 0.95, 0.0]],
                              np.float32),
         "pattern": np.array([[0.1, 0.8], [0.1, 0.8], [0.1, 0.8], [0.1, 0.8]], np.float32)}
TITLES = ["striped shirt", "running shoe", "some shirt", None]


def _decoder(weights=(1.0, 1.0), threshold=0.9):
    fusion = TextFusion(_Titles(TABLE), {t.name: {"image": weights[0], "text": weights[1]} for t in TASKS},
                        {"method": "min_conf", "threshold": threshold})
    return Decoder(TASKS, text=fusion)


def test_scores_are_zero_when_both_sides_agree_or_there_is_no_title():
    p_img = IMAGE["category"].astype(np.float64)
    p_txt = np.array([TABLE[t]["category"] if t else [np.nan] * 3 for t in TITLES])
    np.testing.assert_allclose(conflict_scores(p_img, p_txt, "min_conf"), [0.97, 0.0, 0.55, 0.0])
    np.testing.assert_allclose(conflict_scores(p_img, p_txt, "tv"), [0.96, 0.0, 0.5, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match=r"conflict method 'cosine' is not one of \['min_conf', 'tv'\]"):
        conflict_scores(p_img, p_txt, "cosine")


def test_threshold_flags_at_most_the_allowed_share_of_genuine_pairs():
    genuine = np.r_[np.zeros(95), 0.5, 0.6, 0.7, 0.8, 0.9]
    assert choose_threshold(genuine, 0.01) == 0.8          # only 0.9 (1%) lies above
    assert choose_threshold(genuine, 0.03) == 0.6
    assert choose_threshold(np.zeros(50), 0.01) == 0.0     # any disagreement at all is then a conflict
    with pytest.raises(ValueError, match="no validation photo with a title"):
        choose_threshold(np.zeros(0))
    d = describe({"category": IMAGE["category"][:3]}, {"category": np.array([TABLE[t]["category"] for t in TITLES[:3]])},
                 ["category"], max_genuine=0.34)
    assert d == {"method": "tv", "threshold": pytest.approx(0.5), "max_genuine": 0.34,
                 "source": "val (3 photos with a title)",
                 "val_flagged": pytest.approx(1 / 3)}
    np.testing.assert_allclose(photo_scores({"category": IMAGE["category"]},
                                            {"category": np.full((4, 3), np.nan)}, ["category"]), 0.0)


def test_decoder_flags_the_strong_disagreement_and_says_which_side_won():
    dec = _decoder()
    fused = dec.fuse(IMAGE, TITLES)
    assert isinstance(fused, FusedProbs) and fused.image is IMAGE
    ans = dec.decode(fused)
    # row 0, a shoe photo titled "striped shirt": shoe 0.98 * 0.02 = 0.0196 > shirt 0.02 * 0.97 = 0.0194,
    # the image wins; row 2 disagrees too, but at 0.55 only (under the threshold 0.9)
    assert [dec.tasks[0].classes[j] for j in ans.label["category"]] == ["shoe", "shoe", "shoe", "shoe"]
    assert ans.conflict.tolist() == [True, False, False, False]
    assert ans.conflict_task["category"].tolist() == [True, False, False, False]
    assert ans.conflict_winner.tolist() == ["image", None, None, None]
    # the title weighs three times the image: the title's shirt wins
    ans = _decoder(weights=(1.0, 3.0))(IMAGE, TITLES)
    assert ans.label["category"].tolist() == [0, 1, 1, 1]
    assert ans.conflict_winner.tolist() == ["title", None, None, None]


def test_columns_schema_and_record_carry_the_conflict():
    dec = _decoder()
    ans = dec(IMAGE, TITLES)
    cols = dec.columns(ans, ok=np.array([True, True, True, False]))
    assert cols["category_conflict"] == [True, False, False, None]
    assert cols["conflict"] == [True, False, False, None]
    assert cols["conflict_winner"] == ["image", None, None, None]
    names = column_names(TASKS)
    assert names[:4] == ["category", "category_prob", "category_accept", "category_conflict"]
    assert names[-4:] == ["unknown_score", "unknown", "conflict", "conflict_winner"]
    schema = arrow_schema(TASKS)
    assert str(schema.field("conflict").type) == "bool" and str(schema.field("conflict_winner").type) == "string"
    assert str(schema.field("category_conflict").type) == "bool"
    assert set(cols) == set(names)
    rec = dec.record(ans, 0)
    assert rec["conflict"] is True and rec["conflict_winner"] == "image"
    assert rec["labels"]["category"] == {"label": "shoe", "prob": pytest.approx(0.0196 / (0.0196 + 0.0194), abs=1e-4),
                                         "conflict": True}


def test_no_titles_is_false_and_no_title_model_is_null():
    dec = _decoder()
    ans = dec(IMAGE, None)                       # a model with a title model, photos without titles
    assert dec.columns(ans)["conflict"] == [False] * 4 and dec.record(ans, 0)["conflict_winner"] is None
    plain = Decoder(TASKS)
    ans = plain(IMAGE, TITLES)                   # no title model: titles are not looked at
    cols = plain.columns(ans)
    assert cols["conflict"] == [None] * 4 and cols["category_conflict"] == [None] * 4
    rec = plain.record(ans, 0)
    assert rec["conflict"] is None and "conflict" not in rec["labels"]["category"]


def test_old_fusion_json_gets_the_default(tmp_path):
    from catalens.text.model import TitleModel

    tm = TitleModel(TASKS[:1]).fit(["red shirt", "blue shoe", "a bag", "green shirt"],
                                   {"category": np.array([0, 1, 2, 0])})
    TextFusion(tm, {"category": {"image": 1.0, "text": 1.0}}, {"method": "tv", "threshold": 0.7}).save(tmp_path)
    assert TextFusion.load(tmp_path).conflict == {"method": "tv", "threshold": 0.7}
    meta = json.loads((tmp_path / "fusion.json").read_text())
    del meta["conflict"]
    (tmp_path / "fusion.json").write_text(json.dumps(meta))
    assert TextFusion.load(tmp_path).conflict == DEFAULT_CONFLICT


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    from catalens.config import load_config
    from catalens.synthetic import make_catalogue
    from catalens.train.pipeline import train

    base = tmp_path_factory.mktemp("conflicts")
    data = make_catalogue(base / "data", n_products=90, size=96, seed=5)
    cfg = load_config(None, [{"engine": {"progress": False, "runtime": "eager"}, "head": {"epochs": 30},
                              "text": {"enabled": True}, "tracking": False}])
    train(data, base / "model", cfg, log=lambda *a: None)
    return base


def test_trained_model_stores_the_threshold_and_every_output_flags_swapped_titles(text_model, tmp_path):
    import catalens
    from catalens.cli import main

    fusion = json.loads((text_model / "model" / "text" / "fusion.json").read_text())["conflict"]
    assert fusion["method"] == "tv" and fusion["max_genuine"] == 0.01
    assert fusion["source"].startswith("val (") and fusion["val_flagged"] <= 0.01
    products = pd.read_csv(text_model / "data" / "products.csv", dtype=str)
    products = products[products["title"].notna() & (products["title"].str.len() > 0)].head(40)
    paths = [str(text_model / "data" / "images" / f"{i}.jpg") for i in products["id"]]
    # each photo with the title of the next product of another category
    cats, titles = products["category"].tolist(), products["title"].tolist()
    swapped = [next(titles[j] for j in range(len(titles)) if cats[j] != cats[i]) for i in range(len(titles))]
    model = catalens.load(text_model / "model", runtime="eager")
    own = model.predict(pd.DataFrame({"path": paths, "title": titles}))
    other = model.predict(pd.DataFrame({"path": paths, "title": swapped}))
    plain = model.predict(paths)
    assert own["conflict"].mean() <= 0.1 < other["conflict"].mean()
    assert (~plain["conflict"].astype(bool)).all() and plain["conflict_winner"].isna().all()
    flagged = other[other["conflict"].astype(bool)]
    assert set(flagged["conflict_winner"]) <= {"image", "title"}
    assert (flagged["department_conflict"].astype(bool) | flagged["category_conflict"].astype(bool)).all()
    assert other.loc[~other["conflict"].astype(bool), "conflict_winner"].isna().all()
    # the CLI writes the same columns (a table with a title column)
    table = tmp_path / "in.csv"
    pd.DataFrame({"path": paths, "title": swapped}).to_csv(table, index=False)
    assert main(["predict", str(text_model / "model"), str(table), "--out", str(tmp_path / "p.parquet"),
                 "--no-progress", "--runtime", "eager"]) == 0
    cli = pd.read_parquet(tmp_path / "p.parquet")
    assert cli["conflict"].tolist() == other["conflict"].tolist()
    assert cli["conflict_winner"].tolist() == other["conflict_winner"].tolist()
    assert cli["category_conflict"].tolist() == other["category_conflict"].tolist()
