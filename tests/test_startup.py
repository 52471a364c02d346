"""Start-up of `catalens embed`: a remembered Lite backbone is not built (no timm import) when the
runtime runs a cached graph; and `catalens embed` streams its features to disk."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from catalens.embed.backbones import LazyModule
from catalens.embed.factory import create_backbone
from tests.conftest import jpeg_bytes


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CATALENS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_lazy_lite_backbone_is_remembered_then_lazy(cache_env):
    first = create_backbone("efficientnet_lite0", lazy=True)          # nothing remembered: built now
    assert not isinstance(first.module, LazyModule)
    memo = json.loads((cache_env / "onnx" / "backbones.json").read_text())
    assert list(memo.values()) == [{"fingerprint": first.fingerprint(), "feature_dim": 1280}]
    lazy = create_backbone("efficientnet_lite0", lazy=True)
    assert isinstance(lazy.module, LazyModule) and not lazy.module.built
    assert (lazy.fingerprint(), lazy.feature_dim, lazy.describe()) == \
        (first.fingerprint(), first.feature_dim, first.describe())
    assert not lazy.module.built                                          # none of that built it
    import torch

    x = torch.rand(2, 3, 224, 224) * 255
    with torch.no_grad():
        torch.testing.assert_close(lazy.module(x), first.module(x))      # built on first use, same weights
    assert lazy.module.built and lazy.fingerprint() == first.fingerprint()
    assert not isinstance(create_backbone("efficientnet_lite0", lazy=True, image_size=256).module, LazyModule)


def test_embed_start_skips_timm_with_a_remembered_graph(cache_env, tmp_path):
    from catalens.embed.engine import EngineConfig, engine_runner

    bb = create_backbone("efficientnet_lite0", lazy=True)
    engine_runner(bb, EngineConfig(runtime="onnx"))   # exports the graph once (torch module built here)
    code = textwrap.dedent("""
        import sys, numpy as np
        from catalens.embed.factory import create_backbone
        from catalens.embed.engine import EngineConfig, engine_runner
        bb = create_backbone("efficientnet_lite0", lazy=True)
        run = engine_runner(bb, EngineConfig(runtime="onnx"))
        out = run(np.zeros((2, 224, 224, 3), np.uint8))
        print(out.shape, "timm" in sys.modules, bb.module.built)
    """)
    env = dict(os.environ, CATALENS_CACHE=str(cache_env))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "(2, 1280) False False"


def test_embed_streams_features_to_disk(tmp_path):
    from catalens.cli import main
    from catalens.embed.engine import EngineConfig, embed_catalogue
    from catalens.ingest.open import open_catalogue

    data = tmp_path / "photos" / "red"
    data.mkdir(parents=True)
    for i in range(5):
        (data / f"r{i}.jpg").write_bytes(jpeg_bytes((200, 30 * i, 30), pattern=i % 3))
    (data / "bad.jpg").write_bytes(b"not a photo")
    args = ["embed", str(tmp_path / "photos"), "--out", str(tmp_path / "emb"), "--backbone", "test_efficientnet",
            "--weights", "random", "--set", "engine.progress=false", "--set", "engine.runtime=eager"]
    import torch

    torch.manual_seed(0)
    assert main(args) == 0
    feats = np.load(tmp_path / "emb" / "embeddings.npy")
    cat = open_catalogue(tmp_path / "photos")
    torch.manual_seed(0)
    bb = create_backbone("test_efficientnet", weights="random")
    ref = embed_catalogue(cat, bb, None, EngineConfig(runtime="eager", progress=False))
    np.testing.assert_allclose(feats, ref.features, rtol=0, atol=1e-6)
    import pandas as pd

    index = pd.read_parquet(tmp_path / "emb" / "index.parquet")
    assert index["ok"].tolist() == ref.ok.tolist() and index["ok"].sum() == 5
    assert index.loc[~index["ok"], "problem"].str.startswith("not_an_image: cannot identify image").all()
    assert not list((tmp_path / "emb").glob("*.tmp"))


def test_predict_out_loads_the_model_lazily(tmp_path):
    """`catalens predict --out`: the model folder's network is not built when a remembered ONNX
    runtime answers (second run), and the predictions equal the first run's."""
    from catalens.config import load_config
    from catalens.model.load import load_model
    from catalens.synthetic import make_folder_dataset
    from catalens.train.pipeline import train

    data = make_folder_dataset(tmp_path / "data", n_per_class=4, size=96)
    cfg = load_config(overrides=[{"tracking": False, "engine": {"progress": False, "runtime": "eager", "workers": 0},
                                  "head": {"epochs": 3}, "backbone": {"weights": "random", "image_size": 64}}])
    train(data, tmp_path / "m", cfg, log=lambda *a: None)
    env = dict(os.environ, CATALENS_CACHE=str(tmp_path / "cache"), CATALENS_NO_MALLOC_TUNING="1")
    code = textwrap.dedent(f"""
        import sys
        from catalens.cli import main
        rc = main(["predict", "{tmp_path / 'm'}", "{data}", "--out", sys.argv[1], "--runtime", "onnx",
                   "--no-progress"])
        print(rc, "timm" in sys.modules)
    """)
    outs = []
    for run in ("first", "second"):
        out = tmp_path / f"{run}.parquet"
        res = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=600,
                             env=env)
        assert res.returncode == 0, res.stderr[-2000:]
        outs.append(res.stdout.strip().splitlines()[-1])
    assert outs == ["0 True", "0 False"]   # the first run exports the graph and remembers the fingerprint
    import pandas as pd

    a, b = pd.read_parquet(tmp_path / "first.parquet"), pd.read_parquet(tmp_path / "second.parquet")
    pd.testing.assert_frame_equal(a, b)
    eager = load_model(tmp_path / "m")
    os.environ["CATALENS_CACHE"], old = str(tmp_path / "cache"), os.environ["CATALENS_CACHE"]
    try:
        lazy = load_model(tmp_path / "m", lazy=True)
    finally:
        os.environ["CATALENS_CACHE"] = old
    assert isinstance(lazy.backbone.module, LazyModule) and lazy.backbone.fingerprint() == eager.backbone.fingerprint()
