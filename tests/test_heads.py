"""Contract tests over the head registry: learn, gradients flow, no NaN, deterministic, round-trip."""
import numpy as np
import pytest
import torch

from catalens.heads import HEADS, MultiTaskHead, create_head
from catalens.heads.losses import class_weights, multitask_loss
from catalens.tasks import TaskInfo

TASKS = [TaskInfo("dept", "class", ["bottoms", "tops"]),
         TaskInfo("cat", "class", ["jeans", "shirt", "skirt"], parent="dept"),
         TaskInfo("pattern", "tags", ["striped", "checked"])]


def toy(n=240, seed=0):
    """Separable features: class c shifts dimension c; tags switch dimensions 5/6."""
    rng = np.random.default_rng(seed)
    cat = rng.integers(0, 3, n)
    dept = np.where(cat == 1, 1, 0)
    tags = rng.integers(0, 2, (n, 2)).astype(np.float32)
    X = rng.normal(0, 1, (n, 16)).astype(np.float32)
    X[np.arange(n), cat] += 4
    X[:, 5] += 4 * tags[:, 0]
    X[:, 6] += 4 * tags[:, 1]
    return X, {"dept": dept, "cat": cat, "pattern": tags}


def fitted(name, **kw):
    X, Y = toy()
    Xv, Yv = toy(80, seed=1)
    kw.setdefault("scaling", "feature")  # toy dimensions have unequal means
    return create_head(name, TASKS, epochs=100, lr=1e-2, seed=3, **kw).fit(X, Y, Xv, Yv)


@pytest.mark.parametrize("name", HEADS.names())
def test_head_learns_all_tasks(name):
    head = fitted(name)
    Xt, Yt = toy(200, seed=2)
    pred = head.predict(Xt)
    assert (pred["cat"] == np.array(TASKS[1].classes)[Yt["cat"]]).mean() > 0.95
    assert (pred["dept"] == np.array(TASKS[0].classes)[Yt["dept"]]).mean() > 0.95
    assert (pred["pattern"] == Yt["pattern"].astype(bool)).mean() > 0.95
    proba = head.predict_proba(Xt)
    np.testing.assert_allclose(proba["cat"].sum(1), 1.0, atol=1e-5)
    assert head.classes_["cat"] == ["jeans", "shirt", "skirt"]


@pytest.mark.parametrize("name", HEADS.names())
def test_head_fit_is_deterministic(name):
    a, b = fitted(name), fitted(name)
    X, _ = toy(50, seed=5)
    np.testing.assert_array_equal(a.predict_proba(X)["cat"], b.predict_proba(X)["cat"])


@pytest.mark.parametrize("name", HEADS.names())
def test_head_save_load_round_trip(name, tmp_path):
    head = fitted(name)
    head.save(tmp_path)
    back = MultiTaskHead.load(tmp_path)
    X, _ = toy(50, seed=6)
    for t in TASKS:
        np.testing.assert_array_equal(head.predict_proba(X)[t.name], back.predict_proba(X)[t.name])
    assert back.params == head.params


@pytest.mark.parametrize("name", HEADS.names())
def test_gradients_flow_without_nan(name):
    head = create_head(name, TASKS, epochs=1)
    X, Y = toy(32)
    head.fit(X, Y)
    net = head.net_.train()
    logits = net(torch.from_numpy(X))
    targets = {"dept": torch.from_numpy(Y["dept"]), "cat": torch.from_numpy(Y["cat"]),
               "pattern": torch.from_numpy(Y["pattern"])}
    loss = multitask_loss(logits, targets, TASKS, {}, {})
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_missing_labels_do_not_contribute():
    logits = {"cat": torch.tensor([[5.0, 0, 0], [0, 0, 5.0]]), "dept": torch.zeros(2, 2),
              "pattern": torch.zeros(2, 2)}
    full = multitask_loss(logits, {"cat": torch.tensor([0, 0]), "dept": torch.tensor([-1, -1]),
                                   "pattern": torch.full((2, 2), float("nan"))}, TASKS, {}, {})
    masked = multitask_loss(logits, {"cat": torch.tensor([0, -1]), "dept": torch.tensor([-1, -1]),
                                     "pattern": torch.full((2, 2), float("nan"))}, TASKS, {}, {})
    assert masked < full                       # the wrong row (label 0, logit on 2) was masked away
    assert torch.isfinite(masked)


def test_loss_weights_scale_task_losses():
    logits = {"dept": torch.zeros(2, 2), "cat": torch.zeros(2, 3), "pattern": torch.zeros(2, 2)}
    y = {"dept": torch.tensor([0, 1]), "cat": torch.tensor([-1, -1]), "pattern": torch.full((2, 2), float("nan"))}
    one = multitask_loss(logits, y, TASKS, {}, {})
    two = multitask_loss(logits, y, TASKS, {"dept": 2.0}, {})
    assert torch.isclose(two, 2 * one)
    assert torch.isclose(one, torch.log(torch.tensor(2.0)))


def test_balanced_class_weights():
    w = class_weights(np.array([0, 0, 0, 1, -1]), 3, "balanced")
    # counts 3 and 1 (class 2 absent): inverse frequency, normalised over present classes
    assert w[0] < w[1] and w[2] == 0
    assert torch.isclose(w[:2].mean(), torch.tensor(1.0))


def test_unfitted_head_says_so():
    with pytest.raises(RuntimeError, match="not fitted"):
        create_head("linear", TASKS).predict(np.zeros((1, 16), np.float32))


def test_temperature_scaling_calibrates_without_changing_argmax():
    X, Y = toy()
    Xv, Yv = toy(300, seed=1)
    head = create_head("linear", TASKS, epochs=100, lr=1e-2, seed=3, weight_decay=0.0).fit(X, Y)
    from catalens.heads.estimator import _nll

    before = head.predict_proba(Xv)["cat"]
    nll_before = _nll(head.predict_logits(Xv)["cat"], Yv["cat"], "class")
    temps = head.calibrate(Xv, Yv)
    after = head.predict_proba(Xv)["cat"]
    assert set(temps) == {"dept", "cat", "pattern"} and temps["cat"] != 1.0
    np.testing.assert_array_equal(before.argmax(1), after.argmax(1))
    assert _nll(head.predict_logits(Xv)["cat"], Yv["cat"], "class") <= nll_before


@pytest.mark.parametrize("scaling", ["global", "feature", "none"])
def test_input_scaling_modes(scaling):
    X, Y = toy()
    head = create_head("linear", TASKS, epochs=5, scaling=scaling).fit(X, Y)
    mean, std = head.net_.mean.numpy(), head.net_.std.numpy()
    if scaling == "feature":
        np.testing.assert_allclose(std, X.std(0, ddof=1), rtol=1e-4)
    elif scaling == "global":
        assert np.all(mean == 0) and np.allclose(std, X.std(ddof=1), rtol=1e-4)
    else:
        assert np.all(mean == 0) and np.all(std == 1)
    with pytest.raises(ValueError, match="scaling must be"):
        create_head("linear", TASKS, scaling="minmax")


def test_logreg_head_is_scikit_learns_logistic_regression():
    """One class task, no scaling: the same optimum as sklearn's L2 multinomial logistic regression."""
    from sklearn.linear_model import LogisticRegression

    X, Y = toy()
    task = [TASKS[1]]
    head = create_head("logreg", task, scaling="none", C=0.5).fit(X, {"cat": Y["cat"]})
    ref = LogisticRegression(C=0.5, tol=1e-8, max_iter=1000).fit(X, Y["cat"])
    Xt, _ = toy(60, seed=4)
    np.testing.assert_allclose(head.predict_proba(Xt)["cat"], ref.predict_proba(Xt), atol=2e-3)
    np.testing.assert_allclose(head.net_.outputs["cat"].weight.detach().numpy(), ref.coef_, atol=2e-2)
    assert head.params["solver"] == "lbfgs" and head.params["C"] == 0.5
    assert head.best_epoch_ == len(head.history_) and head.history_[-1]["lr"] == 1.0


def test_logreg_head_records_rounds_and_calibrates_on_val():
    X, Y = toy()
    Xv, Yv = toy(80, seed=1)
    head = create_head("logreg", TASKS, scaling="feature", C=100.0).fit(X, Y, Xv, Yv)  # weak penalty: rounds
    rows = head.history_
    assert len(rows) > 1 and [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] and "val_loss" in rows[-1]
    assert set(head.temperatures_) == {"dept", "cat", "pattern"}


def test_logreg_head_refuses_what_does_not_apply():
    with pytest.raises(ValueError, match="solver lbfgs fits a linear head .*got hidden 64, dropout 0.0: use head "
                                         "type linear or mlp"):
        create_head("logreg", TASKS, hidden=64)
    with pytest.raises(ValueError, match="sampler 'balanced' and max_per_class 0 do not apply: use "
                                         "head.class_weighting for imbalance"):
        create_head("logreg", TASKS, sampler="balanced")
    with pytest.raises(ValueError, match="head C is 0.0; the inverse L2 strength of solver lbfgs must be > 0"):
        create_head("logreg", TASKS, C=0.0)


def test_head_from_config_builds_what_the_config_says():
    from catalens.config import load_config
    from catalens.heads import head_from_config

    cfg = load_config(overrides=[{"head": {"type": "logreg", "C": 0.3, "class_weighting": "balanced"}}])
    head = head_from_config(cfg.head, TASKS, seed=7)
    assert head.params["solver"] == "lbfgs" and head.params["C"] == 0.3
    assert head.params["class_weighting"] == "balanced" and head.params["seed"] == 7
    plain = head_from_config(load_config().head, TASKS, seed=0)
    assert "solver" not in plain.params  # head.json of AdamW heads is as before


@pytest.mark.parametrize("name", HEADS.names())
def test_refit_keeps_what_val_chose_and_learns_from_all_rows(name):
    """``refit``: the first fit's temperatures, history and best epoch stay; the weights are those of a
    fit on all rows for the first fit's epoch count (AdamW: same schedule, no early stopping)."""
    head = fitted(name, patience=3)
    temps, history, best = dict(head.temperatures_), list(head.history_), head.best_epoch_
    X, Y = toy()
    Xv, Yv = toy(80, seed=1)
    Xa, Ya = np.vstack([X, Xv]), {k: np.concatenate([Y[k], Yv[k]]) for k in Y}
    head.refit(Xa, Ya)
    assert head.temperatures_ == temps and head.history_ == history and head.best_epoch_ == best
    assert [float(t) for t in head.net_.temperature] == pytest.approx(list(temps.values()))
    assert head.refit_["rows"] == 320
    alone = create_head(name, TASKS, epochs=100, lr=1e-2, seed=3, scaling="feature", patience=3)
    if head.params.get("solver") == "lbfgs":
        alone.fit(Xa, Ya)
    else:
        alone._fit(Xa, Ya, None, None, stop_after=best)
        assert head.refit_["epochs"] == best and (name != "mlp" or best < 100)  # mlp stops early on val
    alone.net_.temperature.copy_(head.net_.temperature)
    Xt, _ = toy(50, seed=7)
    for k in ("dept", "cat", "pattern"):
        np.testing.assert_allclose(head.predict_proba(Xt)[k], alone.predict_proba(Xt)[k], atol=1e-6)
