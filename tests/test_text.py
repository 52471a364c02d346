"""Title models (TF-IDF + logistic regression, Naive Bayes), fusion, missing titles, saving."""
import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer

from catalens.heads import create_head
from catalens.tasks import MISSING, TaskInfo
from catalens.text import TextFusion, TitleModel, TitleVectorizer, clean_titles, fit_weights

KINDS = ["shirt", "shoe", "watch", "bag"]
BRANDS = ["nike", "puma", "adidas", "fossil", "titan", "roadster", "levis"]
COLOURS = ["red", "blue", "black", "white", "green"]


def _titles(n, rng):
    y = rng.integers(0, len(KINDS), n)
    texts = [f"{rng.choice(BRANDS)} men {rng.choice(COLOURS)} {KINDS[k]}" for k in y]
    return texts, y


def test_clean_titles_marks_missing():
    texts, has = clean_titles(["Nike shoe", None, float("nan"), "  ", "", 3])
    assert has.tolist() == [True, False, False, False, False, False]
    assert texts == ["Nike shoe", "", "", "", "", ""]


def test_vectorizer_reproduces_sklearn_tfidf_and_round_trips(tmp_path):
    texts = ["Nike Men Blue T-Shirt", "Puma striped socks", "red check shirt", "Nike red shoes"]
    v = TitleVectorizer(ngram=(1, 2), char_ngram=None, max_features=None).fit(texts)
    ref = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"(?u)\b\w[\w\-]*\b").fit(texts)
    X, R = v.transform(texts).toarray(), ref.transform(texts).toarray()
    order = [v.parts[0].vocabulary[t] for t in ref.get_feature_names_out()]
    np.testing.assert_allclose(X[:, order], R, atol=1e-12)
    v2 = TitleVectorizer(char_ngram=(2, 4)).fit(texts)
    v2.save(tmp_path / "v.json")
    back = TitleVectorizer.load(tmp_path / "v.json")
    np.testing.assert_array_equal(back.transform(texts).toarray(), v2.transform(texts).toarray())
    assert v2.transform([None]).nnz == 0


@pytest.mark.parametrize("method", ["logreg", "nb"])
def test_title_model_learns_a_toy_task_perfectly(method, tmp_path):
    rng = np.random.default_rng(0)
    texts, y = _titles(200, rng)
    tag = np.array([[float("red" in t), float("blue" in t)] for t in texts], np.float32)
    tasks = [TaskInfo("kind", "class", KINDS), TaskInfo("colour", "tags", ["red", "blue"])]
    m = TitleModel(tasks, method=method).fit(texts, {"kind": y, "colour": tag})
    test_texts, y_test = _titles(100, np.random.default_rng(1))
    p = m.predict_proba(test_texts)
    assert (p["kind"].argmax(1) == y_test).all()
    assert np.allclose(p["kind"].sum(1), 1.0, atol=1e-5)
    truth = np.array([[float("red" in t), float("blue" in t)] for t in test_texts])
    assert ((p["colour"] >= 0.5) == truth.astype(bool)).all()
    assert list(m.predict(test_texts)["kind"][:3]) == [KINDS[k] for k in y_test[:3]]
    m.save(tmp_path / "m")
    assert not list((tmp_path / "m").glob("*.pkl"))
    back = TitleModel.load(tmp_path / "m")
    np.testing.assert_allclose(back.predict_proba(test_texts)["kind"], p["kind"], rtol=1e-6)


@pytest.mark.parametrize("method", ["logreg", "nb"])
def test_title_model_handles_missing_labels_and_titles_and_unseen_classes(method):
    rng = np.random.default_rng(2)
    texts, y = _titles(120, rng)
    y = y.copy()
    y[:10] = MISSING
    texts = list(texts)
    texts[10:20] = [None] * 10
    tasks = [TaskInfo("kind", "class", KINDS + ["never"])]
    m = TitleModel(tasks, method=method).fit(texts, {"kind": y})
    # a long title: Naive Bayes' log-likelihood of a seen class is ~-8 per word, far below -30
    long = "nike men red shoe " + " ".join(BRANDS + COLOURS + ["men"] * 4)
    p = m.predict_proba(["nike men red shoe", long, None])
    assert p["kind"][:2].argmax(1).tolist() == [1, 1]
    assert p["kind"][:, 4].max() < 1e-6           # a class without training titles is never predicted
    np.testing.assert_allclose(p["kind"].sum(1), 1.0, atol=1e-5)


def _complementary(n, rng):
    """4 classes = (colour, shape): the image knows the colour half, the title the shape half."""
    y = rng.integers(0, 4, n)
    colour, shape = y // 2, y % 2
    X = np.c_[colour * 2.0 - 1 + rng.normal(0, 0.3, n), rng.normal(0, 1, (n, 7))].astype(np.float32)
    texts = [f"item {'round' if s else 'square'} {rng.choice(BRANDS)}" for s in shape]
    return X, texts, y


def test_fusion_beats_each_alone_when_information_is_complementary(tmp_path):
    rng = np.random.default_rng(0)
    tasks = [TaskInfo("y", "class", ["a", "b", "c", "d"])]
    Xtr, Ttr, ytr = _complementary(400, rng)
    Xva, Tva, yva = _complementary(200, rng)
    Xte, Tte, yte = _complementary(400, rng)
    head = create_head("linear", tasks, epochs=60, seed=0).fit(Xtr, {"y": ytr}, Xva, {"y": yva})
    title = TitleModel(tasks).fit(Ttr, {"y": ytr})
    pv_img = head.predict_proba(Xva)
    w = fit_weights(tasks, pv_img, title.predict_proba(Tva), {"y": yva}, np.ones(len(yva), bool))
    fusion = TextFusion(title, w)
    acc = {
        "image": (head.predict_proba(Xte)["y"].argmax(1) == yte).mean(),
        "title": (title.predict_proba(Tte)["y"].argmax(1) == yte).mean(),
        "fused": (fusion.fuse(head.predict_proba(Xte), Tte)["y"].argmax(1) == yte).mean(),
    }
    assert acc["image"] < 0.6 and acc["title"] < 0.6    # each knows half: ~50%
    assert acc["fused"] > 0.95
    assert acc["fused"] >= max(acc["image"], acc["title"])
    assert w["y"]["text"] > 0
    fusion.save(tmp_path / "t")
    back = TextFusion.load(tmp_path / "t")
    np.testing.assert_allclose(back.fuse(head.predict_proba(Xte), Tte)["y"],
                               fusion.fuse(head.predict_proba(Xte), Tte)["y"], rtol=1e-6)


def test_row_without_title_falls_back_to_image_probabilities_exactly():
    rng = np.random.default_rng(3)
    tasks = [TaskInfo("y", "class", ["a", "b", "c", "d"]), TaskInfo("t", "tags", ["p", "q"])]
    texts, y = _titles(80, rng)
    tags = rng.integers(0, 2, (80, 2)).astype(np.float32)
    title = TitleModel(tasks).fit(texts, {"y": y, "t": tags})
    fusion = TextFusion(title, {"y": {"image": 0.5, "text": 1.0}, "t": {"image": 2.0, "text": 1.0}})
    img = {"y": rng.dirichlet(np.ones(4), 4).astype(np.float32), "t": rng.random((4, 2)).astype(np.float32)}
    rows = ["nike men red shoe", None, float("nan"), "   "]
    out = fusion.fuse(img, rows)
    for k in img:
        np.testing.assert_array_equal(out[k][1:], img[k][1:])     # bit-for-bit the image output
        assert not np.allclose(out[k][0], img[k][0])              # the titled row is fused
    assert out["y"][0].argmax() == 1


def test_cached_inference_equals_the_plain_formula_and_follows_a_refit():
    """Weights and the counting vectorizer are prepared once per fit (served titles: ~1 ms); the
    logits stay exactly X @ W.T + b, and a refit on other labels is never answered from the cache."""
    rng = np.random.default_rng(4)
    texts, y = _titles(80, rng)
    tasks = [TaskInfo("kind", "class", KINDS)]
    m = TitleModel(tasks).fit(texts, {"kind": y})
    probe = ["puma men blue bag", "levis men red shirt", None]

    def plain(model):
        X = model.transform(probe)
        W, b = model.weights["kind"]
        return np.asarray(X @ W.T.astype(np.float64)) + b[None, :].astype(np.float64)

    first = m.decision_function(probe)["kind"]
    np.testing.assert_allclose(first, plain(m), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(m.decision_function(probe)["kind"], first)   # from the cache
    m.fit(texts, {"kind": (y + 1) % len(KINDS)})                               # other labels
    again = m.decision_function(probe)["kind"]
    np.testing.assert_allclose(again, plain(m), rtol=0, atol=1e-12)
    assert again[0].argmax() == (KINDS.index("bag") + 1) % len(KINDS)
