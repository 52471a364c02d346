"""``data.refit_full``: val decides, then the head and title model learn from train + val (issue 16).

One synthetic catalogue, Lite0 with random weights at a small side: what val decided (metrics,
thresholds, temperatures, fusion weights) is unchanged, the weights are those of a fit on train + val,
and the in-place refit of a saved folder (the presets' ensembles) gives the very same model.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

from catalens.cli import main
from catalens.config import load_config
from catalens.train.pipeline import train
from catalens.train.refit import NOTE, refit_folder

FAST = ["--no-progress", "--runtime", "eager"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from catalens.synthetic import make_catalogue

    return make_catalogue(tmp_path_factory.mktemp("refit") / "data", n_products=60, size=64, seed=4)


def _cfg(tmp, **over):
    base = {"tracking": False, "cache_dir": str(tmp / "cache"),
            "engine": {"progress": False, "runtime": "eager", "workers": 0},
            "backbone": {"name": "efficientnet_lite0@64", "weights": "random"},
            "head": {"type": "logreg"}, "text": {"enabled": True}}
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return load_config(overrides=[base])


def _train(data, out, cfg, log=lambda *a: None):
    return train(data, out, cfg, log=log)  # weights "random": the same untrained net every time


def _desc(folder):
    return json.loads((folder / "model.json").read_text())


def test_refit_full_keeps_vals_decisions_and_learns_from_train_and_val(data, tmp_path):
    plain = _train(data, tmp_path / "plain", _cfg(tmp_path))
    lines = []
    full = _train(data, tmp_path / "full", _cfg(tmp_path, data={"refit_full": True}), log=lines.append)
    a, b = _desc(tmp_path / "plain"), _desc(tmp_path / "full")
    assert "refit_full" not in a
    n = b["train_images"] + b["val_images"]
    frame = pd.read_csv(data.parent / "products.csv")
    titles = int(frame["split"].isin(["train", "val"]).sum())  # every synthetic row has a title and labels
    assert b["refit_full"] == {"rows": n, "head_epochs": b["refit_full"]["head_epochs"], "title_rows": titles,
                               "note": NOTE}
    assert f"refit_full: head fitted again on {n} train + val photos, title model on {titles} titles" in lines
    for key in ("metrics", "accept", "unknown", "hierarchy_paths", "tasks"):  # decided on val: as without
        assert b[key] == a[key], key
    assert full.model.head.temperatures_ == plain.model.head.temperatures_
    assert full.model.text.weights == plain.model.text.weights and full.model.text.conflict == plain.model.text.conflict
    wa = load_file(str(tmp_path / "plain" / "head.safetensors"))
    wb = load_file(str(tmp_path / "full" / "head.safetensors"))
    assert not np.allclose(wa["outputs.category.weight"], wb["outputs.category.weight"])
    np.testing.assert_array_equal(wa["temperature"], wb["temperature"])
    # the refitted model predicts through the same CLI; a photo it now learnt from is answered
    assert main(["predict", str(tmp_path / "full"), str(data), "--out", str(tmp_path / "p.csv"), *FAST]) == 0
    assert pd.read_csv(tmp_path / "p.csv")["category"].notna().all()


def test_refitting_a_saved_folder_gives_the_same_model(data, tmp_path):
    """The presets refit ensemble members after choosing the ensemble's thresholds: same result as
    ``data.refit_full`` in ``train``."""
    _train(data, tmp_path / "full", _cfg(tmp_path, data={"refit_full": True}))
    _train(data, tmp_path / "later", _cfg(tmp_path))
    refit_folder(tmp_path / "later", data, _cfg(tmp_path), log=lambda *a: None)
    assert load_config(tmp_path / "later" / "config.yaml").data.refit_full  # trains this model again
    a, b = _desc(tmp_path / "full"), _desc(tmp_path / "later")
    assert a["refit_full"] == b["refit_full"] and a["accept"] == b["accept"]
    for name in ("head.safetensors", "text/title_model.safetensors"):
        wa, wb = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "later" / name))
        assert wa.keys() == wb.keys()
        for k in wa:
            np.testing.assert_allclose(wa[k], wb[k], atol=1e-6, err_msg=f"{name}: {k}")


def test_refit_full_refuses_fine_tuning(data, tmp_path):
    cfg = _cfg(tmp_path, data={"refit_full": True}, finetune={"mode": "blocks"})
    with pytest.raises(ValueError, match=r"^data.refit_full refits the head on frozen features; --finetune blocks "
                                         r"trains the backbone on the train photos alone, so the val photos' "
                                         r"features would not match: drop data.refit_full, or --finetune$"):
        _train(data, tmp_path / "m", cfg)
    assert not (tmp_path / "m").exists()
