"""Ensembles (weighted mean of member probabilities) and test-time augmentation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from catalens.model.load import load_model
from catalens.model.single import CatalensModel
from catalens.config import load_config
from catalens.embed.factory import create_backbone
from catalens.model.ensemble import EnsembleError, EnsembleModel, build_ensemble
from catalens.synthetic import make_folder_dataset
from catalens.model.tta import TTABackbone, apply_model_tta, with_tta
from catalens.train.pipeline import train


def _cfg(**over):
    return load_config(overrides=[{"tracking": False, "engine": {"workers": 0, "progress": False}}, over])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("ens")
    data = make_folder_dataset(base / "data", n_per_class=4, size=64)
    a = train(data, base / "a", _cfg(seed=1), log=lambda m: None).folder
    b = train(data, base / "b", _cfg(seed=2, head={"type": "mlp", "hidden": 32}), log=lambda m: None).folder
    return data, a, b


def _px(n=3, size=224, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _member_probs(model, px):
    x = torch.from_numpy(px).permute(0, 3, 1, 2).float()
    with torch.inference_mode():
        return model.predict_proba_features(model.backbone.module(x).numpy())


@pytest.mark.parametrize("weights", [None, [3.0, 1.0]])
def test_ensemble_is_the_weighted_mean_of_member_probabilities(models, tmp_path, weights):
    _, a, b = models
    out = build_ensemble([a, b], tmp_path / "e", weights, log=lambda m: None)
    ens = load_model(tmp_path / "e")
    assert isinstance(ens, EnsembleModel) and isinstance(out, EnsembleModel)
    assert (tmp_path / "e" / "members" / "0" / "model.json").exists()
    ma, mb = CatalensModel.load(a), CatalensModel.load(b)
    px = _px()
    pa, pb, pe = _member_probs(ma, px), _member_probs(mb, px), ens.predict_proba_images(px)
    wa, wb = (0.5, 0.5) if weights is None else (0.75, 0.25)
    for t in ens.tasks:
        expected = np.float32(wa) * pa[t.name] + np.float32(wb) * pb[t.name]
        np.testing.assert_array_equal(pe[t.name], expected)
        np.testing.assert_allclose(pe[t.name].sum(1), 1.0, atol=1e-5)
    # the generic path the predictor/evaluator take gives the same numbers
    x = torch.from_numpy(px).permute(0, 3, 1, 2).float()
    with torch.inference_mode():
        feats = ens.backbone.module(x).numpy()
        pix = ens.pixel_module()(x)
    for t in ens.tasks:
        np.testing.assert_array_equal(ens.predict_proba_features(feats)[t.name], pe[t.name])
        np.testing.assert_allclose(pix[t.name].numpy(), pe[t.name], atol=1e-6)
    assert ens.backbone.fingerprint() != ma.backbone.fingerprint()
    # both members are Lite0 with the same weights: one embedding serves both (features, graph)
    assert ma.backbone.fingerprint() == mb.backbone.fingerprint()
    assert ens.backbone.member_parts == ((0,), (0,)) and ens.backbone.module.dims == [ma.backbone.feature_dim]
    assert feats.shape == (3, ma.backbone.feature_dim) and len(ens.pixel_module().backbones) == 1


def test_ensemble_predicts_a_catalogue(models, tmp_path):
    import pyarrow.parquet as pq

    from catalens.ingest.open import open_catalogue
    from catalens.predict.predictor import predict_catalogue

    data, a, b = models
    build_ensemble([a, b], tmp_path / "e", log=lambda m: None)
    ens = load_model(tmp_path / "e")
    cat = open_catalogue(data).split("test")
    res = predict_catalogue(ens, cat, tmp_path / "p.parquet", _cfg(cache_dir=str(tmp_path / "cache")), log=lambda m: None)
    table = pq.read_table(res.path).to_pandas()
    assert len(table) == len(cat) and table["problem"].isna().all()
    assert set(table["label"]) <= set(ens.tasks[0].classes)


def test_mismatched_class_order_is_a_clear_error(models):
    _, a, b = models
    ma, mb = CatalensModel.load(a), CatalensModel.load(b)
    mb.head.tasks[0].classes = list(reversed(mb.tasks[0].classes))
    with pytest.raises(EnsembleError, match=r"class order .* differs .* position 0"):
        EnsembleModel([ma, mb], names=["A", "B"])
    mb.head.tasks[0].name = "other"
    with pytest.raises(EnsembleError, match="same tasks"):
        EnsembleModel([ma, mb])


def test_ensemble_cli_and_bad_weights(models, tmp_path, capsys):
    from catalens.cli import main

    _, a, b = models
    assert main(["ensemble", str(a), str(b), "--out", str(tmp_path / "e"), "--weights", "2,1"]) == 0
    meta = json.loads((tmp_path / "e" / "model.json").read_text())
    assert meta["ensemble"]["weights"] == pytest.approx([2 / 3, 1 / 3])
    assert main(["ensemble", str(a), str(b), "--out", str(tmp_path / "f"), "--weights", "1"]) == 2
    assert "one weight per model" in capsys.readouterr().err


def test_members_of_different_input_sizes(models, tmp_path):
    data, a, _ = models
    c = train(data, tmp_path / "c", _cfg(backbone={"name": "efficientnet_lite1", "weights": "random"}),
              log=lambda m: None).folder
    build_ensemble([a, c], tmp_path / "e", log=lambda m: None)
    ens = load_model(tmp_path / "e")
    assert ens.preprocess.size == 240  # decoded once at the largest member's preprocessing
    assert ens.backbone.member_parts == ((0,), (1,)) and len(ens.backbone.module.dims) == 2
    p = ens.predict_proba_images(_px(2, 240))
    np.testing.assert_allclose(p["label"].sum(1), 1.0, atol=1e-5)


def test_a_side_by_side_member_shares_the_backbones_of_single_members(models, tmp_path):
    """Lite0, Lite1 and Lite0+Lite1 (a preset's blend of singles and the backbones side by side): each
    backbone runs once, and every member gets the features it gets alone."""
    from catalens.embed.multi import MemberInput

    data = models[0]
    rnd = {"weights": "random"}
    folders = [train(data, tmp_path / n, _cfg(seed=i, backbone={"name": name, **rnd}), log=lambda m: None).folder
               for i, (n, name) in enumerate([("a", "efficientnet_lite0"), ("b", "efficientnet_lite1"),
                                               ("c", "efficientnet_lite0+efficientnet_lite1")])]
    build_ensemble(folders, tmp_path / "e", [1.0, 1.0, 2.0], log=lambda m: None)
    ens = load_model(tmp_path / "e")
    ma, mb, mc = (CatalensModel.load(f) for f in folders)
    assert ens.backbone.member_parts == ((0,), (1,), (0, 1)) and len(ens.backbone.module.dims) == 2
    assert ens.backbone.member_fingerprints == (ma.backbone.fingerprint(), mb.backbone.fingerprint())
    assert ens.preprocess.size == 240 and ens.preprocess == mc.preprocess
    x = torch.from_numpy(_px(3, 240, seed=5)).permute(0, 3, 1, 2).float()
    with torch.inference_mode():
        feats = ens.backbone.module(x).numpy()
        fc = mc.backbone.module(x).numpy()                                   # the pair alone, same decode
        fa = ma.backbone.module(MemberInput(1.0, 224)(x)).numpy()          # Lite0 alone at its side
        fb = mb.backbone.module(x).numpy()
        pix = ens.pixel_module()(x)
    np.testing.assert_allclose(feats, fc, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(feats, np.hstack([fa, fb]), rtol=1e-5, atol=1e-5)
    got = ens.predict_proba_features(feats)
    for t in ens.tasks:
        want = (0.25 * ma.head.predict_proba(fa)[t.name] + 0.25 * mb.head.predict_proba(fb)[t.name]
                + 0.5 * mc.head.predict_proba(fc)[t.name])
        np.testing.assert_allclose(got[t.name], want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(pix[t.name].numpy(), got[t.name], atol=1e-5)
    assert len(ens.pixel_module().backbones) == 2
    meta = json.loads((tmp_path / "e" / "model.json").read_text())
    assert meta["backbone"]["member_parts"] == [[0], [1], [0, 1]]


def test_tta_hflip_on_a_symmetric_image_equals_no_tta():
    bb = create_backbone("efficientnet_lite0")
    half = torch.rand(2, 3, 224, 112) * 255
    x = torch.cat([half, half.flip(-1)], dim=-1)
    assert torch.equal(x, x.flip(-1))
    tta = with_tta(bb, ["hflip"])
    with torch.inference_mode():
        assert torch.equal(tta.module(x), bb.module(x))
        y = torch.rand(2, 3, 224, 224) * 255
        expected = (bb.module(y) + bb.module(y.flip(-1))) / 2
        torch.testing.assert_close(tta.module(y), expected, rtol=0, atol=1e-6)
    assert tta.fingerprint() != bb.fingerprint()
    assert with_tta(tta, []).fingerprint() == bb.fingerprint()
    with pytest.raises(ValueError, match="valid views"):
        with_tta(bb, ["rotate"])


def test_model_folder_tta_is_honoured_on_load(models, tmp_path):
    import shutil

    _, a, _ = models
    shutil.copytree(a, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    meta["tta"] = ["hflip", "zoom"]
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    m = CatalensModel.load(tmp_path / "m")
    assert isinstance(m.backbone, TTABackbone) and m.backbone.views == ("hflip", "zoom")
    plain = apply_model_tta(CatalensModel.load(tmp_path / "m"), [])
    assert not isinstance(plain.backbone, TTABackbone)
    px = _px(2)
    p_tta, p_plain = _member_probs(m, px), _member_probs(plain, px)
    assert not np.allclose(p_tta["label"], p_plain["label"])
    name = m.backbone.name   # beside its plain self in an ensemble, the TTA member is named apart
    assert EnsembleModel([plain, m]).backbone.name == f"ensemble({name}+{name} tta:hflip,zoom)"


def test_ensemble_of_title_models_fuses_each_members_titles(tmp_path_factory):
    """Members trained with --text fuse the titles with their own image probabilities, then the
    ensemble averages; without titles it is the image-only average; rows without a title too."""
    from catalens.model.blocks import catalogue_titles
    from catalens.synthetic import make_catalogue

    base = tmp_path_factory.mktemp("ens-text")
    data = make_catalogue(base / "data", n_products=60, size=64, seed=3)
    folders = []
    for seed, text in ((1, True), (2, True), (3, False)):
        cfg = _cfg(seed=seed, head={"epochs": 20}, text={"enabled": text})
        folders.append(train(data, base / f"m{seed}", cfg, log=lambda m: None).folder)
    build_ensemble(folders, base / "e", [2.0, 1.0, 1.0], log=lambda m: None)
    ens = load_model(base / "e")  # an EnsembleModel, as predict and evaluate load it
    members = [CatalensModel.load(f) for f in folders]
    assert [m.text is not None for m in members] == [True, True, False]
    assert ens.text is not None
    px = _px(4, ens.preprocess.size, seed=4)
    x = torch.from_numpy(px).permute(0, 3, 1, 2).float()
    with torch.inference_mode():
        feats = ens.backbone.module(x).numpy()
    assert ens.backbone.member_parts == ((0,), (0,), (0,))   # one Lite0 embedding serves the three members
    parts = [feats] * 3
    for part in ens.head.split(feats):
        np.testing.assert_array_equal(part, feats)
    titles = np.array(["striped cotton shirt", None, "floral summer dress", "leather boots"], dtype=object)
    got = ens.predict_proba_features(feats, texts=titles)
    for t in ens.tasks:
        want = sum(w * m.predict_proba_features(f, texts=titles)[t.name]
                   for w, m, f in zip(ens.weights, members, parts))
        np.testing.assert_allclose(got[t.name], want, rtol=1e-5, atol=1e-6)
        plain = ens.predict_proba_features(feats)[t.name]
        np.testing.assert_allclose(got[t.name][1], plain[1], rtol=1e-5, atol=1e-6)  # no title: image only
        assert not np.allclose(got[t.name][[0, 2, 3]], plain[[0, 2, 3]], atol=1e-4)  # titles moved the rest
    # the predictor hands the catalogue's titles to ensembles as to single models
    from catalens.ingest.open import open_catalogue

    cat = open_catalogue(data)
    rows = np.arange(4)
    titled = ens.predict_proba_features(feats, texts=catalogue_titles(cat, rows))
    t0 = ens.tasks[0].name
    np.testing.assert_allclose(titled[t0], ens.predict_proba_features(
        feats, texts=cat.frame["text"].to_numpy(dtype=object)[rows])[t0], rtol=1e-6)


def test_ensemble_calibrates_accept_and_unknown_on_val_with_its_own_probabilities(models, tmp_path):
    """``catalens ensemble`` sets the thresholds as training does for one model (the same
    functions), on the val photos of the members' data and the ensemble's probabilities; predict
    then writes them."""
    import pandas as pd

    from catalens.cli import main
    from catalens.evaluate.selective import choose_threshold
    from catalens.ingest.open import open_catalogue
    from catalens.model.predictor import stream_probabilities
    from catalens.model.unknown import describe

    data, a, b = models
    assert main(["ensemble", str(a), str(b), "--out", str(tmp_path / "e"), "--data", str(data),
                 "--target-precision", "0.5"]) == 0
    meta = json.loads((tmp_path / "e" / "model.json").read_text())
    ens = load_model(tmp_path / "e")
    cat = open_catalogue(data)
    is_val = (cat.frame["split"] == "val").to_numpy()         # the data's val/ folder
    val = cat.subset(is_val)
    probs = {k: np.concatenate([blk.probs[k] for blk in stream_probabilities(ens, val)]) for k in ("label",)}
    y = val.encode(ens.tasks)["label"]
    assert meta["accept"]["source"] == f"val ({is_val.sum()} photos of {data}), the ensemble's probabilities"
    assert meta["accept"]["target_precision"] == 0.5
    conf, pred = probs["label"].max(1), probs["label"].argmax(1)
    want = choose_threshold(conf, pred == y, 0.5, 0.95, 2.0).threshold
    assert meta["accept"]["thresholds"] == {"label": want}
    assert meta["unknown"] == describe(probs, ["label"])
    out = tmp_path / "pred.csv"
    assert main(["predict", str(tmp_path / "e"), str(data), "--out", str(out), "--no-progress"]) in (0, 1)
    df = pd.read_csv(out)
    assert df["label_accept"].notna().all() and df["unknown"].notna().all()
    assert set(df["conflict"].isna()) == {True}                      # no title model: no conflict flag


def test_ensemble_without_its_data_leaves_the_flags_null_and_says_so(models, tmp_path, capsys):
    from catalens.cli import main

    _, a, b = models
    assert main(["ensemble", str(a), str(b), "--out", str(tmp_path / "e"), "--data", str(tmp_path / "nope")]) == 2
    member = json.loads((a / "model.json").read_text())
    member["data"] = str(tmp_path / "gone")
    (a / "model.json").write_text(json.dumps(member))
    capsys.readouterr()
    assert main(["ensemble", str(a), str(b), "--out", str(tmp_path / "f")]) == 0
    meta = json.loads((tmp_path / "f" / "model.json").read_text())
    assert meta.get("accept") is None and meta.get("unknown") is None
    assert "accept and unknown thresholds are left null; give it with --data DATA" in capsys.readouterr().err
