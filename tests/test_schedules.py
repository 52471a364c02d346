"""Learning-rate schedules (one-cycle, cosine, step, plateau) of the heads and of fine-tuning; lr in the history."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from catalens.config import load_config
from catalens.heads.estimator import MultiTaskHead
from catalens.heads.schedules import onecycle_factor, plateau_drops, schedule_factor
from catalens.tasks import TaskInfo


def test_factors():
    # cosine: linear warm-up, then half-cosine to 0
    assert schedule_factor("cosine", 0, 100, 10, 10) == pytest.approx(0.1)
    assert schedule_factor("cosine", 55, 100, 10, 10) == pytest.approx(0.5, abs=0.02)
    # step: x gamma every step_epochs epochs (10 steps per epoch), after the warm-up
    assert [schedule_factor("step", s, 100, 0, 10, step_epochs=3, gamma=0.1) for s in (0, 29, 30, 60, 99)] == \
        pytest.approx([1, 1, 0.1, 0.01, 0.001])
    assert schedule_factor("step", 40, 100, 0, 10) == pytest.approx(0.1)  # default: a third of the 10 epochs
    # plateau: factor ** drops
    assert schedule_factor("plateau", 50, 100, 10, 10, plateau_drops=2, plateau_factor=0.5) == 0.25
    # one-cycle: torch's OneCycleLR (cos) as a factor of the peak
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=100, pct_start=0.2)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = [onecycle_factor(s, 100, int(0.2 * 100) - 1) for s in range(100)]
    np.testing.assert_allclose(ours, lrs, atol=2e-3)
    with pytest.raises(ValueError, match="learning-rate schedule 'linear' is not one of onecycle, cosine, step, "
                                         "plateau"):
        schedule_factor("linear", 0, 10, 0, 1)


def test_plateau_drops_follow_reduce_on_plateau():
    losses = [1.0, 0.9, 0.95, 0.96, 0.97, 0.8, 0.85, 0.86, 0.87]
    assert plateau_drops(losses, patience=2) == 2
    assert plateau_drops(losses, patience=3) == 0
    assert plateau_drops([], 0) == 0


def _data(n=120, d=8, k=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    X = rng.normal(size=(n, d)).astype(np.float32) + np.eye(k, d, dtype=np.float32)[y] * 2
    return X, {"t": y.astype(np.int64)}


@pytest.mark.parametrize("kind", ["onecycle", "cosine", "step", "plateau"])
def test_head_logs_the_learning_rate_of_every_epoch(kind):
    X, Y = _data()
    tasks = [TaskInfo("t", "class", ["a", "b", "c"])]
    head = MultiTaskHead(tasks, epochs=12, lr=0.01, patience=50, schedule=kind, step_epochs=4, gamma=0.1,
                         plateau_patience=0, batch_size=32).fit(X[:90], {"t": Y["t"][:90]}, X[90:], {"t": Y["t"][90:]})
    lrs = [h["lr"] for h in head.history_]
    assert len(lrs) == 12 and all(0 <= v <= 0.01 + 1e-9 for v in lrs)
    if kind == "step":  # 4 steps per epoch (90 rows, batch 32 → 3 steps; warm-up 5% of 36 = 2 steps)
        assert lrs[0] == pytest.approx(0.01) and lrs[4] == pytest.approx(0.001) and lrs[8] == pytest.approx(1e-4)
    elif kind == "plateau":  # with patience 0 every epoch without improvement divides by 2
        vl = [h["val_loss"] for h in head.history_]
        assert lrs[-1] == pytest.approx(0.01 * 0.5 ** plateau_drops(vl[:-1], 0))
    else:
        assert lrs[-1] < 0.001 and max(lrs) > 0.005
    assert ("schedule" in head.params) == (kind != "onecycle")


def test_config_keys_and_defaults():
    cfg = load_config()
    assert cfg.head.schedule == "onecycle" and cfg.finetune.schedule == "cosine"
    cfg = load_config(overrides=[{"head": {"schedule": "step", "step_epochs": 10}, "finetune": {"schedule": "plateau"}}])
    assert cfg.head.step_epochs == 10 and cfg.finetune.plateau_patience == 1
    with pytest.raises(ValueError, match="head.schedule"):
        load_config(overrides=[{"head": {"schedule": "linear"}}])
