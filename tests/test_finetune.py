"""Fine-tuning: weights change, the folder loads and predicts the same, resume is exact."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from catalens.model.single import CatalensModel
from catalens.config import load_config
from catalens.embed.factory import create_backbone
from catalens.ingest.images import Preprocess, load_rgb
from catalens.synthetic import make_folder_dataset
from catalens.train import finetune as ft
from catalens.train.augment import AugmentParams, augment, center_view, random_resized_box, view_rng
from catalens.train.pipeline import train


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("ft") / "data", n_per_class=6, size=96)


@pytest.fixture(scope="module")
def pretrained():
    return {k: v.clone() for k, v in create_backbone("efficientnet_lite0").module.net.state_dict().items()}


def _cfg(**kw):
    f = {"mode": "blocks", "blocks": 1, "epochs": 2, "views": 2, "batch_size": 16, "workers": 0}
    f.update(kw)
    return load_config(overrides=[{"tracking": False, "engine": {"workers": 0, "progress": False}, "finetune": f}])


def _pixels(root, n=4, size=224):
    files = sorted(root.rglob("*.jpg"))[:n]
    pre = Preprocess(size=size, resize=round(size / 0.875))
    return np.stack([load_rgb(f.read_bytes(), pre) for f in files])


def _probs(model, px):
    x = torch.from_numpy(px).permute(0, 3, 1, 2).float()
    with torch.inference_mode():
        return model.predict_proba_features(model.backbone.module(x).numpy())


def test_finetune_blocks_changes_backbone_and_loads(synth, tmp_path, pretrained):
    out = tmp_path / "m"
    res = train(synth, out, _cfg(), log=lambda m: None)
    saved = load_file(str(out / "backbone.safetensors"))
    assert set(saved) == set(pretrained)
    # the frozen stem is untouched, the trained last stage and conv head moved
    assert torch.equal(saved["conv_stem.weight"], pretrained["conv_stem.weight"])
    assert torch.equal(saved["blocks.5.0.conv_pw.weight"], pretrained["blocks.5.0.conv_pw.weight"])
    assert not torch.equal(saved["blocks.6.0.conv_pw.weight"], pretrained["blocks.6.0.conv_pw.weight"])
    assert not torch.equal(saved["conv_head.weight"], pretrained["conv_head.weight"])
    # BatchNorm statistics stay frozen
    assert torch.equal(saved["bn2.running_mean"], pretrained["bn2.running_mean"])
    meta = json.loads((out / "model.json").read_text())
    assert meta["finetune"]["trained"] == "last 1 stages" and len(meta["finetune"]["history"]) == 2
    assert "fine-tune" in meta["backbone"]["weights_origin"]
    assert not (out / ".finetune").exists()  # work folder removed on success
    loaded = CatalensModel.load(out)
    px = _pixels(synth)
    a, b = _probs(res.model, px), _probs(loaded, px)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6)
        np.testing.assert_allclose(a[k].sum(1), 1.0, atol=1e-5)


def test_online_augmentation_path(synth, tmp_path, pretrained):
    out = tmp_path / "m"
    train(synth, out, _cfg(views=0, epochs=1), log=lambda m: None)
    saved = load_file(str(out / "backbone.safetensors"))
    assert not torch.equal(saved["conv_head.weight"], pretrained["conv_head.weight"])
    assert json.loads((out / "model.json").read_text())["finetune"]["views"] == 0


def test_heads_only_keeps_backbone(synth, tmp_path, pretrained):
    out = tmp_path / "m"
    train(synth, out, _cfg(blocks=0, tta=["hflip"]), log=lambda m: None)
    saved = load_file(str(out / "backbone.safetensors"))
    assert all(torch.equal(saved[k], pretrained[k]) for k in pretrained)
    from catalens.model.tta import TTABackbone

    assert isinstance(CatalensModel.load(out).backbone, TTABackbone)


def test_schedule_step_and_lr_in_history(synth, tmp_path):
    out = tmp_path / "m"
    train(synth, out, _cfg(blocks=0, schedule="step", step_epochs=1, gamma=0.5, warmup_epochs=0), log=lambda m: None)
    meta = json.loads((out / "model.json").read_text())
    hist = meta["finetune"]["history"]
    assert [h["lr"] for h in hist] == pytest.approx([0.01, 0.005])
    # history.json: the fine-tuning stage, with train and val accuracy per class task
    from catalens.model.format import read_history

    typed = read_history(out)
    classes = {t["name"] for t in meta["tasks"] if t["kind"] == "class"}
    assert typed.stage == "finetune" and [e.lr for e in typed.epochs] == pytest.approx([0.01, 0.005])
    assert all(set(e.train_accuracy) == set(e.val_accuracy) == classes for e in typed.epochs)
    assert [e.val_accuracy for e in typed.epochs] == [h["val_accuracy_by_task"] for h in hist]


def test_resume_gives_identical_weights(synth, tmp_path, monkeypatch):
    cfg = _cfg()
    train(synth, tmp_path / "a", cfg, log=lambda m: None)

    def interrupt(epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(ft, "_after_epoch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(synth, tmp_path / "b", cfg, log=lambda m: None)
    work = tmp_path / "b" / ".finetune"
    ckpt = json.loads((work / "ckpt.json").read_text())
    assert ckpt["epoch"] == 1 and (work / ckpt["file"]).suffix == ".safetensors"
    assert not any(p.suffix in (".pt", ".pth", ".pkl", ".pickle") for p in work.rglob("*"))
    monkeypatch.setattr(ft, "_after_epoch", lambda epoch: None)
    lines = []
    train(synth, tmp_path / "b", cfg, log=lines.append)
    assert any("resum" in line for line in lines)
    for name in ("backbone.safetensors", "head.safetensors"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}:{k} differs after resume"


def test_resume_flag_without_checkpoint_is_an_error(synth, tmp_path):
    with pytest.raises(ft.FinetuneError, match="no checkpoint"):
        train(synth, tmp_path / "m", _cfg(resume="require"), log=lambda m: None)


def test_cli_flags_map_to_config():
    from catalens.cli import build_parser
    from catalens.commands._common import config_from_args

    args = build_parser().parse_args(["train", "D", "--out", "M", "--finetune", "--finetune-epochs", "3",
                                      "--tta", "hflip", "--resume"])
    cfg = config_from_args(args)
    assert cfg.finetune.mode == "blocks" and cfg.finetune.epochs == 3
    assert cfg.finetune.tta == ["hflip"] and cfg.finetune.resume == "require"
    args = build_parser().parse_args(["train", "D", "--out", "M", "--finetune", "all"])
    assert config_from_args(args).finetune.mode == "all"
    assert config_from_args(build_parser().parse_args(["train", "D", "--out", "M"])).finetune.mode == "none"


def test_finetune_defaults_are_the_fast_recipe():
    """Plain ``--finetune``: last stage + conv head, 3 precomputed views on CPU, 6 epochs (issue 16)."""
    f = load_config().finetune
    assert (f.blocks, f.epochs, f.views) == (1, 6, None)
    assert ft.default_views(f, torch.device("cpu")) == 3
    assert ft.default_views(f.model_copy(update={"mode": "all"}), torch.device("cpu")) == 0
    assert ft.default_views(f, torch.device("cuda")) == 0
    assert ft.default_views(f.model_copy(update={"views": 5}), torch.device("cpu")) == 5


def test_split_backbone_is_exact():
    bb = create_backbone("efficientnet_lite0", "random")
    x = torch.rand(2, 3, 224, 224) * 255
    with torch.no_grad():
        ref = bb.module(x)
        for mode, blocks in (("blocks", 1), ("blocks", 2), ("blocks", 0), ("all", 2), ("blocks", 99)):
            trunk, tail, params = ft.split_backbone(bb.module, mode, blocks)
            torch.testing.assert_close(tail(trunk(x)).flatten(1), ref, rtol=0, atol=1e-5)
            n_all = len(list(bb.module.parameters()))
            assert (len(params) == n_all) == (mode == "all" or blocks == 99)
            assert (len(params) == 0) == (mode == "blocks" and blocks == 0)


def test_schedule_warmup_then_cosine():
    f = [ft.lr_factor(s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[55] == pytest.approx(0.5, abs=0.02)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] < 0.01


def test_augment_is_deterministic_and_in_range():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    p = AugmentParams(size=224)
    a = augment(img, view_rng(1, 2, 3, 0), p)
    b = augment(img, view_rng(1, 2, 3, 0), p)
    c = augment(img, view_rng(1, 2, 3, 1), p)
    assert a.shape == (224, 224, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    for seed in range(50):
        x0, y0, x1, y1 = random_resized_box(np.random.default_rng(seed), 256, (0.5, 1.0), (3 / 4, 4 / 3))
        assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256
        assert (x1 - x0) * (y1 - y0) >= 0.45 * 256 * 256


def test_center_view_matches_preprocessing(synth):
    f = sorted(synth.rglob("*.jpg"))[0]
    pre = Preprocess(size=224, resize=256)
    stored = load_rgb(f.read_bytes(), Preprocess(size=256, resize=256))
    assert np.array_equal(center_view(stored, 224), load_rgb(f.read_bytes(), pre))


def test_bf16_only_where_native():
    assert isinstance(ft.cpu_has_native_bf16(), bool)
    cpu = torch.device("cpu")
    assert ft.use_bf16("auto", cpu) == ft.cpu_has_native_bf16()
    assert ft.use_bf16("off", torch.device("cuda")) is False
    assert ft.use_bf16("auto", torch.device("cuda")) is True


def test_epoch_line_reports_every_class_task_finest_first():
    from catalens.tasks import TaskInfo

    tasks = [TaskInfo("master", "class", ["a", "b"]), TaskInfo("article", "class", ["x", "y", "z"]),
             TaskInfo("pattern", "tags", ["striped"])]
    Y = {"master": np.array([0, 1, 1, 0]), "article": np.array([0, 2, -1, 1]), "pattern": np.zeros((4, 1))}
    probs = {"master": np.array([[.9, .1], [.2, .8], [.6, .4], [.7, .3]]),
             "article": np.array([[.8, .1, .1], [.1, .2, .7], [.3, .3, .4], [.5, .4, .1]]),
             "pattern": np.zeros((4, 1))}
    accs = ft._class_accuracies(probs, Y, tasks, np.arange(4))
    assert list(accs) == ["article", "master"]          # most classes first: the hard level leads
    assert accs == {"article": pytest.approx(2 / 3), "master": 0.75}  # row 2 has no article label


def test_a_diverging_run_stops_with_a_clear_error(synth, tmp_path):
    with pytest.raises(ft.DivergedError, match=r"fine-tuning diverged: the training loss became (nan|inf) in epoch \d "
                                                r"\(step \d+\); lower finetune.lr \(now 1e\+08\) or "
                                                r"finetune.backbone_lr_mult \(now 1\), e.g. --set finetune.lr=3.33e\+07"):
        train(synth, tmp_path / "m", _cfg(lr=1e8, backbone_lr_mult=1.0, label_smoothing=0.0), log=lambda m: None)
    assert not (tmp_path / "m" / "model.json").exists()   # no model folder from a diverged run
