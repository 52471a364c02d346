"""Mixup / CutMix / progressive resizing of fine-tuning (catalens.train.mixing)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from catalens.config import load_config
from catalens.heads.losses import multitask_loss
from catalens.synthetic import make_folder_dataset
from catalens.tasks import TaskInfo
from catalens.train import finetune as ft
from catalens.train.mixing import (Mix, apply_mix, draw_mix, mix_rng, mixed_loss, progressive_scale,
                                   resize_batch)
from catalens.train.pipeline import train

TASKS = [TaskInfo("kind", "class", ["a", "b", "c"]), TaskInfo("pattern", "tags", ["striped", "solid"])]


def _loss(smoothing):
    return lambda lg, tg: multitask_loss(lg, tg, TASKS, {}, {}, smoothing)


def test_mixed_loss_is_the_loss_of_mixed_targets_for_classes_and_tags():
    g = torch.Generator().manual_seed(0)
    logits = {"kind": torch.randn(4, 3, generator=g), "pattern": torch.randn(4, 2, generator=g)}
    y = {"kind": torch.tensor([0, 2, 1, 2]), "pattern": torch.tensor([[1., 0.], [0., 1.], [1., 1.], [0., 0.]])}
    perm = torch.tensor([2, 0, 3, 1])
    mix = Mix("mixup", 0.7, perm)
    got = mixed_loss(_loss(0.1), logits, y, mix)
    # the same by hand: smoothed one-hot targets mixed 0.7 / 0.3, tags' 0/1 targets mixed 0.7 / 0.3
    soft = F.one_hot(y["kind"], 3).float() * 0.9 + 0.1 / 3
    soft = 0.7 * soft + 0.3 * soft[perm]
    ce = -(soft * logits["kind"].log_softmax(-1)).sum(1).mean()
    tags = 0.7 * y["pattern"] + 0.3 * y["pattern"][perm]
    bce = F.binary_cross_entropy_with_logits(logits["pattern"], tags)
    assert float(got) == pytest.approx(float(ce + bce), rel=1e-6)
    assert float(mixed_loss(_loss(0.1), logits, y, None)) == pytest.approx(float(_loss(0.1)(logits, y)))


def test_missing_labels_count_only_their_labelled_side():
    logits = {"kind": torch.tensor([[2., 0., 0.], [0., 1., 0.]]), "pattern": torch.zeros(2, 2)}
    y = {"kind": torch.tensor([0, -1]), "pattern": torch.full((2, 2), float("nan"))}
    mix = Mix("mixup", 0.6, torch.tensor([1, 0]))
    # own side: row 0 labelled "a"; partner side: row 1 gets row 0's "a"
    own = F.cross_entropy(logits["kind"][:1], torch.tensor([0]))
    partner = F.cross_entropy(logits["kind"][1:], torch.tensor([0]))
    assert float(mixed_loss(_loss(0.0), logits, y, mix)) == pytest.approx(float(0.6 * own + 0.4 * partner))


def test_cutmix_pastes_a_box_and_lam_is_the_area_left():
    x = torch.arange(2 * 1 * 7 * 7, dtype=torch.float32).view(2, 1, 7, 7)
    mix = draw_mix(np.random.default_rng(3), 2, 7, 7, mixup=0.0, cutmix=1.0)
    assert mix.kind == "cutmix" and mix.perm.tolist() in ([0, 1], [1, 0])
    y0, y1, x0, x1 = mix.box
    out = apply_mix(x, mix)
    other = x[mix.perm]
    inside = torch.zeros(7, 7, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    assert torch.equal(out[:, :, inside], other[:, :, inside])
    assert torch.equal(out[:, :, ~inside], x[:, :, ~inside])
    assert mix.lam == pytest.approx(1 - inside.sum().item() / 49)
    assert torch.equal(x, torch.arange(98, dtype=torch.float32).view(2, 1, 7, 7))  # input untouched


def test_mixup_blends_and_draws_are_a_function_of_seed_epoch_step():
    x = torch.stack([torch.zeros(3, 2, 2), torch.ones(3, 2, 2)])
    a = draw_mix(mix_rng(0, 1, 5), 2, 2, 2, mixup=0.4, cutmix=0.0)
    b = draw_mix(mix_rng(0, 1, 5), 2, 2, 2, mixup=0.4, cutmix=0.0)
    assert a.lam == b.lam and torch.equal(a.perm, b.perm) and a.kind == "mixup"
    out = apply_mix(x, Mix("mixup", 0.25, torch.tensor([1, 0])))
    assert torch.equal(out[0], torch.full((3, 2, 2), 0.75)) and torch.equal(out[1], torch.full((3, 2, 2), 0.25))
    # both on: half of the batches each, over many steps
    kinds = [draw_mix(mix_rng(0, 0, s), 8, 7, 7, 0.4, 1.0).kind for s in range(200)]
    assert 70 < kinds.count("cutmix") < 130
    assert draw_mix(mix_rng(0, 0, 0), 8, 7, 7, 0.0, 0.0) is None
    assert draw_mix(mix_rng(0, 0, 0), 1, 7, 7, 0.4, 0.0) is None  # a batch of one has no partner


def test_progressive_schedule_and_resize():
    assert [progressive_scale(0.5, e, 6) for e in range(6)] == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    assert progressive_scale(0.0, 0, 6) == 1.0 and progressive_scale(0.5, 0, 1) == 1.0
    x = torch.rand(2, 192, 7, 7)
    assert resize_batch(x, 0.5).shape == (2, 192, 4, 4)   # round(3.5) = 4
    assert resize_batch(x, 1.0) is x
    px = torch.full((1, 3, 224, 224), 128.0)
    small = resize_batch(px, 0.5)
    assert small.shape == (1, 3, 112, 112) and torch.allclose(small, torch.full_like(small, 128.0))


def test_regularise_heads_only_gets_mixup_but_no_cutmix():
    f = load_config(overrides=[{"finetune": {"mixup": 0.0, "cutmix": 1.0, "progressive": 0.5}}]).finetune
    x = torch.rand(4, 16)
    out, mix = ft._regularise(x, f, 0, 0, 0)
    assert mix is None and out is x
    out, mix = ft._regularise(torch.rand(4, 8, 7, 7), f, 0, 0, 0)
    assert mix.kind == "cutmix" and out.shape == (4, 8, 4, 4)  # epoch 1 of 6 at half the side


def test_config_rejects_bad_values():
    with pytest.raises(Exception, match="progressive"):
        load_config(overrides=[{"finetune": {"progressive": 1.5}}])
    with pytest.raises(Exception, match="mixup"):
        load_config(overrides=[{"finetune": {"mixup": -1}}])
    f = load_config().finetune
    assert (f.mixup, f.cutmix, f.progressive) == (0.0, 0.0, 0.0)  # off unless measured to help


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("mix") / "data", n_per_class=6, size=96)


def _cfg(**kw):
    f = {"mode": "blocks", "blocks": 1, "epochs": 2, "views": 2, "batch_size": 16, "workers": 0}
    f.update(kw)
    return load_config(overrides=[{"tracking": False, "engine": {"workers": 0, "progress": False}, "finetune": f}])


def test_fine_tuning_with_mixing_trains_differently_and_resumes_exactly(synth, tmp_path, monkeypatch):
    plain = tmp_path / "plain"
    train(synth, plain, _cfg(), log=lambda m: None)
    cfg = _cfg(mixup=0.4, cutmix=1.0, progressive=0.5)
    train(synth, tmp_path / "a", cfg, log=lambda m: None)
    a, p = load_file(str(tmp_path / "a" / "backbone.safetensors")), load_file(str(plain / "backbone.safetensors"))
    assert not torch.equal(a["conv_head.weight"], p["conv_head.weight"])
    meta = json.loads((tmp_path / "a" / "model.json").read_text())["finetune"]
    assert (meta["settings"]["mixup"], meta["settings"]["cutmix"], meta["settings"]["progressive"]) == (0.4, 1.0, 0.5)

    def interrupt(epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(ft, "_after_epoch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(synth, tmp_path / "b", cfg, log=lambda m: None)
    monkeypatch.setattr(ft, "_after_epoch", lambda epoch: None)
    train(synth, tmp_path / "b", cfg, log=lambda m: None)
    b = load_file(str(tmp_path / "b" / "backbone.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
