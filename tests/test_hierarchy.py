"""Hierarchy-consistent decoding: only seen paths, the max-product path, metrics before/after."""
import numpy as np
import pytest

from catalens.evaluate.metrics import compute_metrics
from catalens.heads.hierarchy import consistent_share, decode_hierarchy, path_indices
from catalens.tasks import TaskInfo

MASTER = TaskInfo("master", "class", ["Apparel", "Footwear"])
SUB = TaskInfo("sub", "class", ["Shoes", "Topwear", "Watches"], parent="master")
ART = TaskInfo("article", "class", ["Sneakers", "Tshirts", "Watch"], parent="sub")
TASKS = [MASTER, SUB, ART]
PATHS = {"master > sub > article": [["Apparel", "Topwear", "Tshirts"], ["Footwear", "Shoes", "Sneakers"]]}


def test_picks_the_max_product_path_by_hand():
    # argmax per level: Footwear, Topwear, Watch -> inconsistent
    probs = {"master": np.array([[0.4, 0.6]]), "sub": np.array([[0.2, 0.5, 0.3]]),
             "article": np.array([[0.3, 0.3, 0.4]])}
    # Apparel/Topwear/Tshirts: .4*.5*.3 = .060; Footwear/Shoes/Sneakers: .6*.2*.3 = .036
    out = decode_hierarchy(TASKS, probs, PATHS)
    assert [int(out[t.name][0]) for t in TASKS] == [0, 1, 1]
    # make the shoe path win: .6*.45*.3 = .081 > .4*.25*.3 = .030
    probs["sub"] = np.array([[0.45, 0.25, 0.3]])
    out = decode_hierarchy(TASKS, probs, PATHS)
    assert [int(out[t.name][0]) for t in TASKS] == [1, 0, 0]


def test_returns_only_seen_paths_and_matches_brute_force():
    rng = np.random.default_rng(0)
    n = 300
    probs = {t.name: rng.dirichlet(np.ones(t.n_outputs) * 0.5, size=n) for t in TASKS}
    paths = {"master > sub > article": PATHS["master > sub > article"] + [["Apparel", "Watches", "Watch"]]}
    out = decode_hierarchy(TASKS, probs, paths)
    seen = {tuple(p) for p in path_indices(TASKS, paths["master > sub > article"]).tolist()}
    rows = list(zip(*(out[t.name].tolist() for t in TASKS)))
    assert set(rows) <= seen
    for i, r in enumerate(rows):  # brute force: the best product among seen paths
        best = max(seen, key=lambda p: probs["master"][i, p[0]] * probs["sub"][i, p[1]] * probs["article"][i, p[2]])
        assert r == best
    argmax = {t.name: probs[t.name].argmax(1) for t in TASKS}
    assert consistent_share(TASKS, out, paths)["master > sub > article"] == 1.0
    assert consistent_share(TASKS, argmax, paths)["master > sub > article"] < 0.5


def test_metrics_report_consistency_before_and_after():
    rng = np.random.default_rng(1)
    n = 200
    probs = {t.name: rng.dirichlet(np.ones(t.n_outputs), size=n) for t in TASKS}
    y = {t.name: rng.integers(0, t.n_outputs, n) for t in TASKS}
    flat = PATHS["master > sub > article"]
    before = compute_metrics(TASKS, y, probs, known_paths=flat)["hierarchy"]["master > sub > article"]
    decoded = decode_hierarchy(TASKS, probs, PATHS)
    after = compute_metrics(TASKS, y, probs, known_paths=flat, pred_index=decoded)["hierarchy"]["master > sub > article"]
    assert before["consistent_share"] < 0.3
    assert after["consistent_share"] == 1.0


def test_unknown_classes_in_paths_are_skipped_and_no_paths_means_no_decoding():
    paths = path_indices(TASKS, [["Apparel", "Topwear", "Tshirts"], ["Kids", "Topwear", "Tshirts"], ["Apparel"]])
    assert paths.tolist() == [[0, 1, 1]]
    probs = {t.name: np.full((2, t.n_outputs), 1.0 / t.n_outputs) for t in TASKS}
    assert decode_hierarchy(TASKS, probs, {"master > sub > article": []}) == {}


def test_two_chains_sharing_a_level_agree():
    a = TaskInfo("a", "class", ["x", "y"])
    b = TaskInfo("b", "class", ["b1", "b2", "b3"], parent="a")
    c = TaskInfo("c", "class", ["c1", "c2"], parent="a")
    paths = {"a > b": [["x", "b1"], ["y", "b2"], ["y", "b3"]], "a > c": [["x", "c1"], ["y", "c2"]]}
    probs = {"a": np.array([[0.5, 0.5]]), "b": np.array([[0.9, 0.05, 0.05]]), "c": np.array([[0.1, 0.9]])}
    out = decode_hierarchy([a, b, c], probs, paths)
    # chain a > b decided first (a=x, b=b1); c must then follow a=x
    assert (int(out["a"][0]), int(out["b"][0]), int(out["c"][0])) == (0, 0, 0)


@pytest.mark.parametrize("flat", [True, False])
def test_flat_list_of_paths_is_accepted(flat):
    probs = {"master": np.array([[0.4, 0.6]]), "sub": np.array([[0.2, 0.5, 0.3]]),
             "article": np.array([[0.3, 0.3, 0.4]])}
    known = PATHS["master > sub > article"] if flat else PATHS
    assert int(decode_hierarchy(TASKS, probs, known)["article"][0]) == 1
