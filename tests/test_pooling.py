"""Pooling of the backbone's feature map: avg (the net's own), gem, multilevel (issue 16: better
frozen features for the presets)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from catalens.config import load_config
from catalens.embed.backbones import BackboneError, FeatureExtractor, check_pool
from catalens.embed.factory import create_backbone
from catalens.embed.runtimes import module_fingerprint
from catalens.ingest.images import load_rgb
from conftest import real_photo_table

SHARED = Path(os.environ.get("CATALENS_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def _real_photos(n: int) -> list[bytes]:
    root = SHARED / "clothing-small" / "train"
    if not root.exists():
        pytest.skip(f"real photos not found at {root} (set CATALENS_SHARED_DATA)")
    return [f.read_bytes() for c in ("dress", "shoes") for f in sorted((root / c).glob("*.jpg"))[:n // 2]]


def _pixels(photos: list[bytes], bb) -> torch.Tensor:
    return torch.from_numpy(np.stack([load_rgb(b, bb.preprocess) for b in photos])).permute(0, 3, 1, 2).float()


def test_multilevel_is_gem_of_the_head_then_the_last_three_stage_means():
    """Computed by hand from the net's own modules on real photos (packaged ImageNet weights)."""
    bb = create_backbone("efficientnet_lite0", crop_pct=1.0, pool="multilevel")
    plain = create_backbone("efficientnet_lite0", crop_pct=1.0)
    assert (bb.feature_dim, plain.feature_dim) == (1280 + 112 + 192 + 320, 1280)
    x = _pixels(_real_photos(4), bb)
    net = bb.module.net
    taps = {}
    hooks = [net.blocks[i].register_forward_hook(lambda m, a, o, i=i: taps.__setitem__(i, o)) for i in (4, 5, 6)]
    with torch.inference_mode():
        fmap = net.forward_features((x - bb.module.mean) * bb.module.inv_std)  # (4,1280,7,7)
        got = bb.module(x).numpy()
        avg = plain.module(x).numpy()
    for h in hooks:
        h.remove()
    gem = fmap.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3).numpy()
    want = np.hstack([gem] + [taps[i].mean((2, 3)).numpy() for i in (4, 5, 6)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(avg, fmap.mean((2, 3)).numpy(), rtol=1e-5, atol=1e-5)
    active = avg > 0.01   # channels the ReLU6 did not silence everywhere
    assert (gem >= avg).all() and (gem[active] > avg[active]).mean() > 0.99  # a power mean lies above the mean


def test_each_pool_has_its_own_cache_key_and_avg_keeps_the_old_one():
    avg = create_backbone("efficientnet_lite0")   # the packaged weights: the same in every call
    same = create_backbone("efficientnet_lite0", pool="avg")
    gem = create_backbone("efficientnet_lite0", pool="gem")
    multi = create_backbone("efficientnet_lite0", pool="multilevel")
    assert avg.fingerprint() == same.fingerprint()
    assert len({avg.fingerprint(), gem.fingerprint(), multi.fingerprint()}) == 3
    assert module_fingerprint(avg.module) == module_fingerprint(same.module)  # the runtime (ONNX) cache key
    assert len({module_fingerprint(m.module) for m in (avg, gem, multi)}) == 3
    assert (avg.describe()["pool"], gem.describe()["pool"], gem.feature_dim) == ("avg", "gem", 1280)
    side = create_backbone("efficientnet_lite0+efficientnet_lite1@256", "random", pool="multilevel")
    assert side.feature_dim == 2 * 1904 and [m["pool"] for m in side.describe()["members"]] == ["multilevel"] * 2


def test_bad_pools_are_refused_with_the_choices():
    net = create_backbone("efficientnet_lite0", "random").module.net
    with pytest.raises(BackboneError, match="^unknown pool 'multi'. Did you mean: multilevel. Known pools: avg, gem, "
                                            "multilevel$"):
        check_pool("multi", net)
    with pytest.raises(BackboneError, match=r"^pool 'gem' reads the stages of an EfficientNet-family net \(conv_stem, "
                                            r"blocks, conv_head\); backbone 'resnet18' is a ResNet: use pool avg$"):
        create_backbone("resnet18", "random", pool="gem")
    with pytest.raises(Exception, match="Input should be 'avg', 'gem' or 'multilevel'"):
        load_config(overrides=[{"backbone": {"pool": "max"}}])
    from catalens.cli import build_parser
    from catalens.commands._common import config_from_args

    assert config_from_args(build_parser().parse_args(["train", "D", "--out", "M", "--pool", "gem"])).backbone.pool == "gem"


def test_fine_tuning_refuses_another_pool_with_the_way_out():
    from catalens.train.finetune import FinetuneError, check_finetunable

    check_finetunable(create_backbone("efficientnet_lite0", "random"))
    with pytest.raises(FinetuneError, match=r"^--finetune trains the net through its own average pooling, and "
                                            r"backbone.pool is 'multilevel': fine-tune with pool avg \(the default\), "
                                            r"or train frozen with pool multilevel \(without --finetune\)$"):
        check_finetunable(create_backbone("efficientnet_lite0", "random", pool="multilevel"))


def test_trained_model_records_the_pool_and_answers_the_same_through_torch_graph_and_explain(tmp_path):
    """Real photos, frozen Lite0 with pool multilevel: model.json records it, the reloaded model gives the
    training features, the exported ONNX graph answers as torch does, and Grad-CAM explains it."""
    from catalens.embed.runtimes import to_tensor
    from catalens.export.onnx import OnnxModel, export_onnx
    from catalens.model.explain import grad_cam
    from catalens.model.single import CatalensModel
    from catalens.train.pipeline import train

    data, rows = real_photo_table(tmp_path, 6, 2)
    cfg = load_config(overrides=[{"tracking": False, "cache_dir": str(tmp_path / "cache"),
                                  "engine": {"progress": False, "runtime": "eager", "workers": 0},
                                  "head": {"epochs": 20},
                                  "backbone": {"name": "efficientnet_lite0@160", "crop_pct": 1.0, "pool": "multilevel"}}])
    train(data, tmp_path / "m", cfg, log=lambda *a: None)
    desc = json.loads((tmp_path / "m" / "model.json").read_text())["backbone"]
    assert (desc["pool"], desc["feature_dim"]) == ("multilevel", 1904)
    model = CatalensModel.load(tmp_path / "m")
    assert isinstance(model.backbone.module, FeatureExtractor) and model.backbone.module.pool == "multilevel"
    photos = [Path(r["path"]).read_bytes() for r in rows[::4]]
    fresh = create_backbone("efficientnet_lite0@160", crop_pct=1.0, pool="multilevel")
    with torch.inference_mode():
        np.testing.assert_allclose(model.backbone.module(_pixels(photos, model.backbone)).numpy(),
                                   fresh.module(_pixels(photos, fresh)).numpy(), rtol=0, atol=1e-5)
    res = export_onnx(tmp_path / "m", log=lambda *a: None)
    assert res.parity_ok
    graph = OnnxModel(res.path).predict_bytes(photos)
    px = np.stack([load_rgb(b, model.backbone.preprocess) for b in photos])
    with torch.inference_mode():
        ref = {k: v.numpy() for k, v in model.pixel_module()(to_tensor(px)).items()}
    np.testing.assert_allclose(graph["label"], ref["label"], rtol=0, atol=1e-5)
    heat, classes = grad_cam(model, px)
    assert heat.shape == (len(photos), 160, 160) and heat.max() == pytest.approx(1.0)
    assert (classes == ref["label"].argmax(1)).all()
