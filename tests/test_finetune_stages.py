"""Partial fine-tuning by stages of any timm family (issue 16): ResNet, ConvNeXt, VGG, DenseNet, Inception.

Random weights only (no downloads); the stage boundaries come from timm's ``feature_info``.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from catalens.config import load_config
from catalens.embed.factory import create_backbone
from catalens.train import finetune as ft

# name -> the top-level parameter prefixes of the last stage (what blocks=1 trains)
LAST_STAGE = {
    "resnet18": {"layer4"},
    "convnext_atto": {"stages.3", "head"},           # + the head's LayerNorm before pooling
    "densenet121": {"features.transition3", "features.denseblock4", "features.norm5"},
    "inception_v3": {"Mixed_7a", "Mixed_7b", "Mixed_7c"},
    "vgg11": {"features.16", "features.18", "pre_logits"},  # the last pooling stage joins the one before
}


def _prefixes(module, params) -> set[str]:
    ids = {id(p) for p in params}
    out = set()
    for n, p in module.named_parameters():
        if id(p) in ids:
            parts = n.split(".")
            out.add(".".join(parts[:2]) if parts[0] in ("stages", "features") else parts[0])
    return out


@pytest.mark.parametrize("name", sorted(LAST_STAGE))
def test_last_stage_of_each_family_is_exact(name):
    bb = create_backbone(name, "random")
    trunk, tail, params = ft.split_backbone(bb.module, "blocks", 1)
    assert _prefixes(bb.module.net, params) == LAST_STAGE[name]
    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(1)) * 255
    with torch.no_grad():
        torch.testing.assert_close(tail(trunk(x)).flatten(1), bb.module(x), rtol=1e-4, atol=1e-4)
    _, _, two = ft.split_backbone(bb.module, "blocks", 2)
    assert len(two) > len(params)
    _, _, every = ft.split_backbone(bb.module, "blocks", 99)  # more stages than the net has: all of it
    assert len(every) == len(list(bb.module.parameters()))


def test_stages_of_a_resnet():
    seq, stages = ft.timm_stages(create_backbone("resnet18", "random").module.net)
    assert [[seq[i][0] for i in st] for st in stages] == [
        ["conv1", "bn1", "act1"], ["maxpool", "layer1"], ["layer2"], ["layer3"], ["layer4"]]


def test_a_net_without_stages_is_refused():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Conv2d(3, 4, 3)

    with pytest.raises(ft.FinetuneError, match="--finetune blocks needs a timm backbone that names its stages "
                                               r"\(feature_info\); 'Conv2d' does not: use --finetune all"):
        ft.split_backbone(Plain(), "blocks", 1)


def test_finetune_last_stage_of_a_resnet_end_to_end(tmp_path):
    from catalens.model.load import load_model
    from catalens.synthetic import make_folder_dataset
    from catalens.train.pipeline import train

    from safetensors.torch import save_file

    data = make_folder_dataset(tmp_path / "data", n_per_class=4, size=64)
    before = {k: v.clone().contiguous() for k, v in create_backbone("resnet18", "random").module.net.state_dict().items()}
    save_file(before, str(tmp_path / "r18.safetensors"))
    cfg = load_config(overrides=[{
        "tracking": False, "engine": {"progress": False, "runtime": "eager", "workers": 0},
        "head": {"epochs": 5},
        "backbone": {"name": "resnet18", "weights": str(tmp_path / "r18.safetensors"), "image_size": 64},
        "finetune": {"mode": "blocks", "blocks": 1, "epochs": 1, "views": 1, "batch_size": 8, "workers": 0}}])
    res = train(data, tmp_path / "m", cfg, log=lambda m: None)
    saved = load_file(str(tmp_path / "m" / "backbone.safetensors"))
    moved = {k.split(".")[0] for k in before if k in saved and before[k].dtype.is_floating_point
             and not torch.equal(saved[k], before[k]) and "running" not in k}
    assert moved == {"layer4"}  # the other stages are bit-identical to the starting weights
    meta = json.loads((tmp_path / "m" / "model.json").read_text())["finetune"]
    assert meta["trained"] == "last 1 stages" and meta["views"] == 1
    loaded = load_model(tmp_path / "m")
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 255
    with torch.inference_mode():
        a = res.model.predict_proba_features(res.model.backbone.module(x).numpy())
        b = loaded.predict_proba_features(loaded.backbone.module(x).numpy())
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5)
