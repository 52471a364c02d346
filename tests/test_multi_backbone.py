"""Several backbones side by side (``--backbone a+b@SIZE``): inputs, features, folders, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from catalens.model.single import CatalensModel
from catalens.config import load_config
from catalens.embed.backbones import BackboneError
from catalens.embed.factory import backbone_from_description, create_backbone
from catalens.embed.multi import MultiBackbone, shared_preprocess
from catalens.ingest.images import Preprocess
from catalens.synthetic import make_folder_dataset
from catalens.train.pipeline import train
from catalens.model.tta import with_tta

NAME = "test_efficientnet+test_efficientnet@128"


@pytest.fixture(scope="module")
def multi():
    torch.manual_seed(0)
    return create_backbone(NAME, weights="random")


def test_shared_decode_is_wide_and_sharp_enough_for_every_member():
    lite0, lite1_full = Preprocess(224, 256), Preprocess(272, 272)   # crop 0.875; whole short side
    pre, inputs = shared_preprocess([lite0, lite1_full])
    assert (pre.size, pre.resize) == (272, 272)                       # widest crop, largest side
    assert [(round(i.keep, 4), i.size) for i in inputs] == [(0.875, 224), (1.0, 272)]
    pre, inputs = shared_preprocess([Preprocess(224, 256), Preprocess(240, 274)])
    assert (pre.size, pre.resize) == (240, 274)


def test_features_are_the_members_features_side_by_side(multi):
    assert isinstance(multi, MultiBackbone) and multi.name == NAME
    a, b = multi.members
    assert b.preprocess.size == 128 and multi.preprocess.size == a.preprocess.size == 160
    assert multi.feature_dim == a.feature_dim + b.feature_dim
    x = torch.rand(2, 3, multi.preprocess.size, multi.preprocess.size) * 255
    with torch.inference_mode():
        out = multi.module(x)
        fa = a.module(multi.module.inputs[0](x))
        fb = b.module(multi.module.inputs[1](x))
    torch.testing.assert_close(out, torch.cat([fa, fb], 1))
    again = create_backbone(NAME, weights="random")
    assert again.fingerprint() == multi.fingerprint()          # random weights: the same net every time
    with torch.no_grad():
        next(again.members[1].module.net.parameters()).add_(1.0)
    assert again.fingerprint() != multi.fingerprint()          # a member's weights are in the hash


def test_description_and_weights_round_trip(multi):
    desc = multi.describe()
    assert desc["arch"] == "concat" and [m["name"] for m in desc["members"]] == ["test_efficientnet"] * 2
    state = multi.module.net.state_dict()
    assert any(k.startswith("0.") for k in state) and any(k.startswith("1.") for k in state)
    back = backbone_from_description(desc, state)
    assert back.fingerprint() == multi.fingerprint()
    x = torch.rand(1, 3, multi.preprocess.size, multi.preprocess.size) * 255
    with torch.inference_mode():
        torch.testing.assert_close(back.module(x), multi.module(x))
        tta = with_tta(multi, ["hflip"])
        torch.testing.assert_close(tta.module(x), (multi.module(x) + multi.module(x.flip(-1))) / 2)
    assert tta.describe()["members"] == desc["members"] and tta.describe()["tta"] == ["hflip"]


@pytest.mark.parametrize("name, kw, message", [
    ("test_efficientnet+test_efficientnet", {"weights": "w.safetensors"}, "a weights file belongs to one backbone"),
    ("test_efficientnet+test_efficientnet", {"weights": "random", "image_size": 200}, "give each member its side"),
    ("test_efficientnet@big", {"weights": "random"}, "whole number of pixels"),
    ("test_efficientnet++test_efficientnet", {"weights": "random"}, "empty backbone name"),
])
def test_bad_multi_specs_are_clear(name, kw, message):
    with pytest.raises(BackboneError, match=message):
        create_backbone(name, **kw)


def test_train_save_load_predict_with_a_multi_backbone(tmp_path):
    data = make_folder_dataset(tmp_path / "data", n_per_class=4, size=64)
    cfg = load_config(overrides=[{"tracking": False, "engine": {"workers": 0, "progress": False},
                                  "backbone": {"name": NAME, "weights": "random", "crop_pct": 1.0},
                                  "finetune": {"tta": ["hflip"]}}])
    res = train(data, tmp_path / "m", cfg, log=lambda m: None)
    model = CatalensModel.load(tmp_path / "m")
    assert model.backbone.name == NAME and model.backbone.views == ("hflip",)
    assert [m.preprocess.size for m in model.backbone.plain.members] == [160, 128]
    assert model.preprocess.resize == model.preprocess.size          # crop_pct 1: whole short side
    px = np.random.default_rng(0).integers(0, 256, (2, model.preprocess.size, model.preprocess.size, 3), np.uint8)
    x = torch.from_numpy(px).permute(0, 3, 1, 2).float()
    with torch.inference_mode():
        ref = res.model.predict_proba_features(with_tta(res.model.backbone, ["hflip"]).module(x).numpy())["label"]
        got = model.predict_proba_features(model.backbone.module(x).numpy())["label"]
    np.testing.assert_allclose(got, ref, atol=1e-5)
    bad = load_config(overrides=[{"backbone": {"name": NAME, "weights": "random"}, "finetune": {"mode": "blocks"},
                                  "tracking": False}])
    with pytest.raises(ValueError, match="--finetune takes one backbone"):
        train(data, tmp_path / "ft", bad, log=lambda m: None)
    # ONNX export of the multi-backbone model (with its TTA): parity with torch is checked by export
    from catalens.export.onnx import OnnxModel, export_onnx

    exp = export_onnx(tmp_path / "m", tmp_path / "m.onnx", log=lambda *a: None)
    assert exp.parity["max_abs_diff"] < 1e-4, exp.parity
    onnx = OnnxModel(exp.path)
    assert onnx.preprocess == model.preprocess
    np.testing.assert_allclose(onnx.run_hwc(px)["label"], got, atol=1e-4)


def test_a_member_cropped_from_the_shared_decode_exports_to_onnx(tmp_path):
    """A member whose crop is narrower than the shared decode's (Lite0 at crop 0.875 beside crop-1 members) is traced
    into the runtimes' ONNX graph, and ONNX Runtime computes what torch does (round() of a traced shape failed)."""
    import catalens.embed.runtimes as rt
    from catalens.embed.multi import MemberInput

    module = torch.nn.Sequential(MemberInput(0.875, 24), torch.nn.Flatten()).eval()   # 32 px -> centre 28 -> 24
    path = rt.export_onnx(module, 32, tmp_path / "m.onnx")
    px = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), np.uint8)
    got = rt.ort_session(path, 1).run(None, {"pixels": px})[0]
    with torch.inference_mode():
        want = module(torch.from_numpy(px).permute(0, 3, 1, 2).float()).numpy()
    assert got.shape == (3, 3 * 24 * 24)
    np.testing.assert_allclose(got, want, atol=1e-3)
