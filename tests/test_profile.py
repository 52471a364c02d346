"""``catalens profile``: counts exact on known modules, timings present, CLI and model folders."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from catalens.cli import main
from catalens.profile import count_macs_flops, format_report, layer_macs, profile_module, profile_target


def test_conv_macs_exact():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    rep = profile_module(conv, 16, batch=2, runtimes=())
    assert rep["totals"]["macs"] == 8 * 3 * 3 * 3 * 16 * 16
    assert rep["totals"]["flops"] == 2 * rep["totals"]["macs"]
    assert rep["totals"]["params"] == 8 * 3 * 3 * 3 + 8
    assert rep["disk"]["safetensors_bytes"] >= 4 * rep["totals"]["params"]
    (row,) = rep["layers"]
    assert row["name"] == "(root)" and row["type"] == "Conv2d" and row["macs"] == rep["totals"]["macs"]


def test_strided_grouped_and_linear_macs():
    net = nn.Sequential(
        nn.Conv2d(3, 12, 3, stride=2, padding=1),         # -> 12 x 8 x 8
        nn.ReLU(),
        nn.Conv2d(12, 12, 3, padding=1, groups=12),       # depthwise
        nn.Conv2d(12, 6, 1, groups=3),                    # grouped pointwise
        nn.Flatten(),
        nn.Linear(6 * 8 * 8, 10),
    )
    stats = count_macs_flops(net, 16)
    assert stats["0"]["macs"] == 12 * 8 * 8 * 3 * 3 * 3
    assert stats["2"]["macs"] == 12 * 8 * 8 * 1 * 3 * 3
    assert stats["3"]["macs"] == 6 * 8 * 8 * 4 * 1 * 1
    assert stats["5"]["macs"] == 6 * 8 * 8 * 10
    assert stats["0"]["out_shape"] == [12, 8, 8]
    assert stats[""]["total_macs"] == sum(stats[k]["macs"] for k in ("0", "2", "3", "5"))
    assert stats[""]["total_flops"] == 2 * stats[""]["total_macs"]
    assert stats["5"]["flops"] == 2 * 384 * 10
    assert stats["1"]["params"] == 0 and stats["5"]["params"] == 384 * 10 + 10


def test_layer_macs_linear_on_sequences():
    lin = nn.Linear(7, 5)
    out = lin(torch.zeros(2, 3, 7))
    assert layer_macs(lin, out) == 2 * 3 * 7 * 5


def test_layer_times_and_runtimes(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    rep = profile_module(net, 32, batch=4, runtimes=("eager", "onnx"), threads=1, runtime_dir=tmp_path, top=3)
    assert len(rep["top_layers"]) == 3
    assert all(r["ms"] >= 0 for r in rep["layers"])
    assert rep["layers_total_ms"] >= max(r["ms"] for r in rep["layers"])
    for name in ("eager", "onnx"):
        r = rep["runtimes"][name]
        assert "error" not in r, r
        assert r["single_ms"] > 0 and r["batch_img_per_s"] > 0 and r["batch"] == 4
    text = format_report(rep)
    assert "MACs / image" in text and "onnx" in text
    json.dumps(rep)  # JSON-able


def test_unknown_runtime_is_reported_not_fatal():
    rep = profile_module(nn.Conv2d(3, 4, 1), 8, batch=2, runtimes=("nope",), layers=False)
    assert "unknown runtime" in rep["runtimes"]["nope"]["error"]


def test_cli_profile_backbone_json(tmp_path, capsys):
    out = tmp_path / "p.json"
    rc = main(["profile", "test_efficientnet", "--weights", "random", "--batch", "4", "--runtimes", "eager",
               "--json", str(out), "--top", "5"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "parameters" in text and "slowest layers" in text
    rep = json.loads(out.read_text())
    assert rep["backbone"]["name"] == "test_efficientnet" and rep["input_size"] == 160
    assert rep["totals"]["macs"] > 0 and rep["totals"]["params"] > 0
    assert len(rep["top_layers"]) == 5 and rep["runtimes"]["eager"]["batch"] == 4
    assert rep["build_s"] >= 0 and rep["disk"]["load_s"] >= 0


def test_profile_model_folder(tmp_path):
    from safetensors.torch import save_file

    from catalens.embed.factory import create_backbone

    bb = create_backbone("test_efficientnet", weights="random")
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in bb.module.net.state_dict().items()}, str(folder / "backbone.safetensors"))
    (folder / "model.json").write_text(json.dumps({"backbone": bb.describe()}))
    rep = profile_target(str(folder), batch=2, runtimes=(), layers=False)
    assert rep["source"]["kind"] == "model_folder"
    assert rep["totals"]["params"] == sum(p.numel() for p in bb.module.parameters())
    with pytest.raises(FileNotFoundError, match="model.json"):
        profile_target(str(tmp_path))
