"""Per-product aggregation: mean of probabilities, by hand; product-level metrics."""
import numpy as np
import pandas as pd
import pytest

from catalens.evaluate.products import aggregate_probs, product_metrics
from catalens.predict.aggregate import aggregate_predictions, infer_tasks
from catalens.tasks import MISSING, TaskInfo

KIND = TaskInfo("kind", "class", ["bag", "shoe", "watch"])
PAT = TaskInfo("pattern", "tags", ["striped", "solid"], thresholds=[0.5, 0.3])


def _frame():
    rows = [  # product p1: 2 readable images + 1 failed; p2: one image; p3: only a failed image
        ("a", "p1", None, ["shoe", "bag"], [0.6, 0.3], 0.8, 0.1),
        ("b", "p1", None, ["bag", "shoe"], [0.7, 0.2], 0.4, 0.6),
        ("c", "p1", "decode: broken", None, None, None, None),
        ("d", "p2", None, ["watch", "bag"], [0.9, 0.05], 0.2, 0.2),
        ("e", "p3", "decode: broken", None, None, None, None),
    ]
    df = pd.DataFrame(rows, columns=["id", "product_id", "problem", "kind_top_labels", "kind_top_probs",
                                     "pattern_striped_prob", "pattern_solid_prob"])
    df["kind"] = df["kind_top_labels"].str[0]
    df["kind_prob"] = df["kind_top_probs"].str[0]
    df["pattern_tags"] = None
    df["pattern_striped"] = df["pattern_striped_prob"] >= 0.5
    df["pattern_solid"] = df["pattern_solid_prob"] >= 0.3
    return df


def test_mean_of_probabilities_matches_hand_computation(tmp_path):
    df = _frame()
    df.to_parquet(tmp_path / "pred.parquet")
    out = aggregate_predictions(tmp_path / "pred.parquet", [KIND, PAT], out=tmp_path / "prod.parquet")
    assert list(out["product_id"]) == ["p1", "p2", "p3"]
    assert list(out["n_images"]) == [2, 1, 0]
    assert out.loc[0, "ids"] == ["a", "b", "c"]
    p1 = out.iloc[0]
    # bag: (0.3 + 0.7) / 2 = 0.5; shoe: (0.6 + 0.2) / 2 = 0.4
    assert p1["kind"] == "bag" and p1["kind_prob"] == pytest.approx(0.5)
    assert p1["kind_top_labels"] == ["bag", "shoe"]
    np.testing.assert_allclose(p1["kind_top_probs"], [0.5, 0.4])
    # striped (0.8+0.4)/2 = 0.6 >= 0.5; solid (0.1+0.6)/2 = 0.35 >= 0.3
    assert p1["pattern_striped_prob"] == pytest.approx(0.6) and p1["pattern_solid_prob"] == pytest.approx(0.35)
    assert p1["pattern_tags"] == ["striped", "solid"]
    p2 = out.iloc[1]
    assert p2["kind"] == "watch" and p2["kind_prob"] == pytest.approx(0.9) and p2["pattern_tags"] == []
    p3 = out.iloc[2]
    assert p3["kind"] is None or pd.isna(p3["kind"])
    assert p3["pattern_tags"] is None
    assert len(pd.read_parquet(tmp_path / "prod.parquet")) == 3


def test_products_are_auto_accepted_on_their_mean_probability():
    out = aggregate_predictions(_frame(), [KIND, PAT], accept={"kind": 0.6})
    # p1: bag 0.5 < 0.6 (its photos disagree); p2: watch 0.9; p3: no readable photo
    assert out["kind_accept"].tolist() == [False, True, None]
    assert out.columns.get_loc("kind_accept") == out.columns.get_loc("kind_prob") + 1
    assert "kind_accept" not in aggregate_predictions(_frame(), [KIND, PAT]).columns


def test_tasks_are_inferred_from_columns():
    tasks = infer_tasks(list(_frame().columns))
    assert [(t.name, t.kind) for t in tasks] == [("kind", "class"), ("pattern", "tags")]
    assert tasks[1].classes == ["striped", "solid"]
    out = aggregate_predictions(_frame())          # thresholds 0.5 without the model's tasks
    assert out.iloc[0]["pattern_tags"] == ["striped"]


def test_product_labels_are_decoded_to_known_paths():
    master = TaskInfo("m", "class", ["A", "F"])
    art = TaskInfo("a", "class", ["shirt", "shoe"], parent="m")
    df = pd.DataFrame({"id": ["1", "2"], "product_id": ["p", "p"], "problem": [None, None],
                       "m_top_labels": [["A", "F"], ["A", "F"]], "m_top_probs": [[0.6, 0.4], [0.6, 0.4]],
                       "a_top_labels": [["shoe", "shirt"], ["shoe", "shirt"]], "a_top_probs": [[0.9, 0.1], [0.9, 0.1]]})
    plain = aggregate_predictions(df, [master, art])
    assert (plain.loc[0, "m"], plain.loc[0, "a"]) == ("A", "shoe")             # inconsistent
    paths = {"m > a": [["A", "shirt"], ["F", "shoe"]]}
    dec = aggregate_predictions(df, [master, art], hierarchy_paths=paths)
    assert (dec.loc[0, "m"], dec.loc[0, "a"]) == ("F", "shoe")                 # .4*.9 > .6*.1
    assert dec.loc[0, "m_prob"] == pytest.approx(0.4)


def test_in_memory_aggregation_and_product_level_metrics():
    pid = ["x", "y", "x", "z", "y"]
    probs = {"kind": np.array([[0.2, 0.8, 0.0], [1, 0, 0], [0.6, 0.4, 0.0], [0, 0, 1], [0.5, 0.5, 0]])}
    ok = np.array([True, True, True, True, False])
    products, mean, n = aggregate_probs(pid, probs, ok)
    assert list(products) == ["x", "y", "z"] and n.tolist() == [2, 1, 1]
    np.testing.assert_allclose(mean["kind"], [[0.4, 0.6, 0.0], [1, 0, 0], [0, 0, 1]])
    y = {"kind": np.array([0, 0, 0, 2, MISSING])}
    m = product_metrics([KIND], pid, y, probs, ok)
    assert m["products"] == 3 and m["images"] == 4
    assert m["kind"]["accuracy"] == pytest.approx(2 / 3)     # x: shoe (wrong), y: bag, z: watch
    # image level for comparison: rows a-d give 3 of 4 right
    img_acc = (probs["kind"][ok].argmax(1) == y["kind"][ok]).mean()
    assert img_acc == pytest.approx(0.75)
