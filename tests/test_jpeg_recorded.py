"""The JPEG decoder of the training features is recorded in model.json and used to predict."""
from __future__ import annotations

import json
import logging
import types

import numpy as np
import pytest

from catalens.ingest import images as im_mod
from catalens.ingest.images import Preprocess, jpeg_decoder, load_rgb

pytestmark = pytest.mark.skipif(im_mod.simplejpeg is None,
                                reason="simplejpeg is not installed (pip install 'catalens[fast]')")

OTHER = {"pillow": "simplejpeg", "simplejpeg": "pillow"}


def test_preprocess_records_the_decoder(monkeypatch):
    monkeypatch.delenv("CATALENS_JPEG_DECODER", raising=False)
    pre = Preprocess(size=64, resize=72)
    assert "jpeg" not in pre.to_dict() and pre.decoder() == "simplejpeg"
    assert pre.pinned().to_dict()["jpeg"] == "simplejpeg"
    monkeypatch.setenv("CATALENS_JPEG_DECODER", "pillow")
    assert pre.pinned().jpeg == "pillow"
    rec = Preprocess(size=64, resize=72, jpeg="simplejpeg")
    assert rec.decoder() == "simplejpeg"                    # recorded beats the machine's setting
    assert Preprocess.from_dict(rec.to_dict()) == rec
    assert rec.to_dict(decoder=False) == pre.to_dict()      # fingerprints leave the decoder out
    with pytest.raises(ValueError, match=r"^preprocess jpeg 'turbo' is not one of pillow, simplejpeg$"):
        Preprocess(jpeg="turbo")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny model per decoder, trained with CATALENS_JPEG_DECODER set to it."""
    from catalens.config import load_config
    from catalens.synthetic import make_folder_dataset
    from catalens.train.pipeline import train

    base = tmp_path_factory.mktemp("jpeg-recorded")
    data = make_folder_dataset(base / "data", n_per_class=4, size=96)
    cfg = load_config(overrides=[{"tracking": False, "engine": {"progress": False, "runtime": "eager", "workers": 0},
                                  "head": {"epochs": 3}, "backbone": {"weights": "random", "image_size": 64}}])
    out = {}
    mp = pytest.MonkeyPatch()
    try:
        for dec in ("pillow", "simplejpeg"):
            mp.setenv("CATALENS_JPEG_DECODER", dec)
            train(data, base / dec, cfg, log=lambda *a: None)
            out[dec] = base / dec
    finally:
        mp.undo()
    return data, out


@pytest.fixture
def turbo_calls(monkeypatch):
    """Counts simplejpeg.decode_jpeg calls (the libjpeg-turbo path)."""
    real, calls = im_mod.simplejpeg, []

    def decode_jpeg(data, **kw):
        calls.append(len(data))
        return real.decode_jpeg(data, **kw)

    monkeypatch.setattr(im_mod, "simplejpeg", types.SimpleNamespace(decode_jpeg=decode_jpeg))
    return calls


def _photos(data) -> list:
    return sorted(p for p in data.rglob("*.jpg"))[:6]


@pytest.mark.parametrize("dec", ["pillow", "simplejpeg"])
def test_model_decodes_as_it_was_trained(trained, dec, monkeypatch, turbo_calls):
    from catalens.embed.engine import EngineConfig, stream_features
    from catalens.ingest.open import open_catalogue
    from catalens.model.load import load_model

    data, models = trained
    desc = json.loads((models[dec] / "model.json").read_text())
    assert desc["backbone"]["preprocess"]["jpeg"] == dec
    monkeypatch.setenv("CATALENS_JPEG_DECODER", OTHER[dec])   # this machine would now pick the other one
    model = load_model(models[dec])
    assert model.backbone.preprocess.jpeg == dec
    photos = _photos(data)
    cat = open_catalogue(data).subset(np.arange(6))
    paths = [str(p) for p in cat.frame["path"]]
    eng = EngineConfig(runtime="eager", workers=0, progress=False)

    def features(backbone, cfg):
        return np.concatenate([b.features for b in stream_features(cat, backbone, None, cfg)])

    del turbo_calls[:]
    served = np.stack([load_rgb(open(p, "rb").read(), model.preprocess) for p in photos])  # serving
    got = features(model.backbone, eng)                                                   # predict/evaluate
    assert len(turbo_calls) == (len(photos) + len(paths) if dec == "simplejpeg" else 0)
    want = features(model.backbone, EngineConfig(runtime="eager", workers=0, progress=False, jpeg=dec))
    other = features(model.backbone, EngineConfig(runtime="eager", workers=0, progress=False, jpeg=OTHER[dec]))
    np.testing.assert_array_equal(got, want)     # the training decoder's features, bit for bit
    from catalens.config import default_cache_dir
    from catalens.embed.cache import EmbeddingCache, content_hash

    bb = model.backbone
    train_cache = EmbeddingCache(default_cache_dir(), bb.fingerprint(), bb.feature_dim, jpeg=dec)
    keys = [content_hash(open(p, "rb").read()) for p in paths]
    assert all(k in train_cache for k in keys)   # training embedded these photos with its decoder
    np.testing.assert_allclose(got, train_cache.get(keys), rtol=0, atol=1e-5)   # = the features training used
    assert np.abs(got - other).max() > 1e-4      # the other decoder's differ: the check means something
    np.testing.assert_array_equal(served, np.stack([load_rgb(open(p, "rb").read(), model.preprocess, jpeg=dec)
                                                    for p in photos]))


def test_predictor_cache_follows_the_recorded_decoder(trained, monkeypatch, tmp_path):
    """The embedding cache is opened for the model's decoder (else the engine would refuse it)."""
    import catalens

    data, models = trained
    monkeypatch.setenv("CATALENS_JPEG_DECODER", "pillow")
    pred = catalens.load(models["simplejpeg"], cache_dir=str(tmp_path / "cache"))
    cache = pred._cache(True)
    assert cache.decoder == "simplejpeg" and cache.dir.name.endswith("+simplejpeg")
    out = pred.predict([str(p) for p in _photos(data)])
    assert len(out) == 6 and out["problem"].isna().all()


def test_folder_without_a_recorded_decoder_loads_as_pillow(trained, tmp_path, monkeypatch):
    import shutil

    from catalens.model.load import load_model

    monkeypatch.delenv("CATALENS_JPEG_DECODER", raising=False)
    folder = tmp_path / "old"
    shutil.copytree(trained[1]["simplejpeg"], folder)
    desc = json.loads((folder / "model.json").read_text())
    del desc["backbone"]["preprocess"]["jpeg"]
    (folder / "model.json").write_text(json.dumps(desc))
    assert load_model(folder).backbone.preprocess.decoder() == "pillow"
    assert jpeg_decoder() == "simplejpeg"      # though this machine would pick simplejpeg for new models


def test_missing_simplejpeg_falls_back_to_pillow_with_one_warning(trained, monkeypatch, caplog):
    from catalens.model.load import load_model

    monkeypatch.setattr(im_mod, "simplejpeg", None)
    monkeypatch.setattr(im_mod, "_WARNED", set())
    folder = trained[1]["simplejpeg"]
    with caplog.at_level(logging.WARNING, logger="catalens.ingest.images"):
        model = load_model(folder)
        assert model.backbone.preprocess.decoder() == "pillow"
        load_rgb(open(_photos(trained[0])[0], "rb").read(), model.preprocess)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"model '{folder}' was trained on JPEGs decoded by simplejpeg (libjpeg-turbo), "
                                  f"which is not installed here: decoding with Pillow instead")
    assert warnings[0].endswith("Fix: pip install simplejpeg")


def test_an_unknown_recorded_decoder_is_refused(trained, tmp_path):
    import shutil

    from catalens.model.load import load_model

    folder = tmp_path / "bad"
    shutil.copytree(trained[1]["pillow"], folder)
    desc = json.loads((folder / "model.json").read_text())
    desc["backbone"]["preprocess"]["jpeg"] = "turbo"
    (folder / "model.json").write_text(json.dumps(desc))
    with pytest.raises(Exception, match=r"backbone.preprocess.jpeg is 'turbo'; expected one of pillow, simplejpeg "
                                        r"\(the JPEG decoder of the training features\)"):
        load_model(folder)
