"""Fine-tuning under torchrun (DDP, gloo on CPU): 2 processes train as 1 process with the doubled batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from catalens.model.single import CatalensModel
from catalens.config import load_config
from catalens.embed.factory import create_backbone
from catalens.ingest.images import load_rgb
from catalens import distributed as ddp
from catalens.train.pipeline import train

PER_RANK_BATCH = 4

needs_gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def _settings(weights) -> dict:
    """A tiny random EfficientNet (160 px) read from a file; float32 (bf16 rounding depends on batch shapes);
    a learning rate the random network survives."""
    return {"tracking": False, "seed": 0,
            "backbone": {"name": "test_efficientnet", "weights": str(weights)},
            "engine": {"workers": 0, "threads": 1, "progress": False},
            "finetune": {"blocks": 1, "epochs": 2, "views": 2, "batch_size": PER_RANK_BATCH, "workers": 0,
                         "lr": 0.001, "bf16": "off"}}


def _val_probs(model, root):
    files = sorted((root / "val").rglob("*.jpg"))
    px = np.stack([load_rgb(f.read_bytes(), model.backbone.preprocess) for f in files])
    with torch.inference_mode():
        feats = model.backbone.module(torch.from_numpy(px).permute(0, 3, 1, 2).float()).numpy()
    return model.predict_proba_features(feats)


@needs_gloo
def test_torchrun_two_processes_equal_one_process_with_the_global_batch(tiny_folder, tmp_path):
    init = tmp_path / "init.safetensors"
    net = create_backbone("test_efficientnet", "random").module.net
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(init))
    run_cfg = tmp_path / "run.yaml"
    run_cfg.write_text(yaml.safe_dump(_settings(init)))
    out = tmp_path / "ddp"
    env = {**os.environ, "CATALENS_TRACKING": "0", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if sys.platform == "linux":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: loopback, whatever the hostname resolves to
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "catalens", "train", str(tiny_folder), "--out", str(out), "--config", str(run_cfg),
           "--finetune", "blocks"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"

    # both ranks trained, each on its half (16 train images, 8 + 8), with DDP over gloo
    for r in (0, 1):
        assert f"[rank {r}/2] fine-tuning on 8 of 16 training images per epoch (gloo" in proc.stdout, proc.stdout
    meta = json.loads((out / "model.json").read_text())
    assert meta["train_images"] == 16
    assert meta["finetune"]["distributed"] == {"world_size": 2, "backend": "gloo", "rows_per_rank": [8, 8]}
    assert len(meta["finetune"]["history"]) == 2
    assert not (out / ".finetune").exists()          # rank 0 removed the work folder after everyone finished
    assert not (tmp_path / "runs").exists()          # tracking off (CATALENS_TRACKING=0)

    # the fine-tuned stage and conv head moved away from the initial weights; the frozen part did not
    start, saved = load_file(str(init)), load_file(str(out / "backbone.safetensors"))
    assert set(saved) == set(start)
    assert torch.equal(saved["conv_stem.weight"], start["conv_stem.weight"])
    assert torch.equal(saved["blocks.3.0.conv_pw.weight"], start["blocks.3.0.conv_pw.weight"])
    for k in ("blocks.4.0.conv_pw.weight", "conv_head.weight"):
        assert (saved[k] - start[k]).abs().max() > 1e-5, k  # moved well beyond the tolerance used below

    # DDP averages the gradients of 2 x 4 rows = one process with batches of 8 over the same permutation
    one = train(tiny_folder, tmp_path / "one",
                load_config(run_cfg, overrides=[{"finetune": {"mode": "blocks", "batch_size": 2 * PER_RANK_BATCH}}]),
                log=lambda m: None)
    single = json.loads((tmp_path / "one" / "model.json").read_text())
    assert "distributed" not in single["finetune"]
    np.testing.assert_allclose([h["train_loss"] for h in meta["finetune"]["history"]],
                               [h["train_loss"] for h in single["finetune"]["history"]], rtol=1e-5)
    ref = load_file(str(tmp_path / "one" / "backbone.safetensors"))
    for k in saved:
        torch.testing.assert_close(saved[k], ref[k], rtol=0, atol=1e-6, msg=f"backbone {k}")
    loaded = CatalensModel.load(out)
    a, b = _val_probs(loaded, tiny_folder), _val_probs(one.model, tiny_folder)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-5)
        np.testing.assert_allclose(a[k].sum(1), 1.0, atol=1e-5)


def test_shards_are_disjoint_equal_and_match_the_global_batches(monkeypatch):
    order = np.random.default_rng(0).permutation(10)
    monkeypatch.setenv("WORLD_SIZE", "3")
    parts = []
    for r in range(3):
        monkeypatch.setenv("RANK", str(r))
        parts.append(ddp.shard(order))
    assert [len(p) for p in parts] == [4, 4, 4]                  # padded to 12: same number of steps
    assert set(np.concatenate(parts)) == set(order)              # every row, 2 of them twice (padding)
    padded = np.concatenate([order, order[:2]])
    b = 2
    for s in range(2):  # batch s of every rank, together, = positions s*W*b .. (s+1)*W*b of the permutation
        together = np.concatenate([p[s * b:(s + 1) * b] for p in parts])
        assert sorted(together) == sorted(padded[s * 3 * b:(s + 1) * 3 * b])


def test_single_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert not ddp.is_distributed() and ddp.is_main() and ddp.world_size() == 1
    order = np.arange(7)
    assert ddp.shard(order) is order
    obj = {"a": 1}
    assert ddp.broadcast_object(obj) is obj
    with ddp.rank0_first():
        pass
    ddp.barrier()
    m = torch.nn.Linear(2, 2)
    assert ddp.wrap(m, torch.device("cpu")) is m
    assert ddp.init() is False
    assert ddp.all_sum([1.0, 2.0]) == [1.0, 2.0] and ddp.all_gather(3) == [3]
