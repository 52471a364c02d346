"""Crop modes of the stored preprocessing: centre crop, whole photo padded, squish, a fixed box (issue 16)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from catalens.config import load_config
from catalens.embed.factory import create_backbone
from catalens.ingest.images import Preprocess, load_rgb, resize_crop

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def _photo() -> Image.Image:
    """200 x 100: a green stripe on the left 10 px, red up to x=100, blue after."""
    a = np.zeros((100, 200, 3), np.uint8)
    a[:, :100] = RED
    a[:, 100:] = BLUE
    a[:, :10] = GREEN
    return Image.fromarray(a)


def _close(px, colour, tol=40) -> bool:
    return bool(np.all(np.abs(px.astype(int) - np.array(colour)) <= tol))


def test_center_crop_loses_the_ends_of_the_long_side():
    px = resize_crop(_photo(), Preprocess(size=64, resize=64, interpolation="nearest"))
    assert px.shape == (64, 64, 3)
    assert not any(_close(px[r, c], GREEN) for r in range(64) for c in range(64))  # the stripe is cut off
    assert _close(px[32, 5], RED) and _close(px[32, 60], BLUE)


def test_pad_keeps_the_whole_photo_on_white():
    px = resize_crop(_photo(), Preprocess(size=64, resize=64, interpolation="nearest", crop="pad"))
    assert px.shape == (64, 64, 3)
    assert _close(px[2, 32], (255, 255, 255)) and _close(px[61, 32], (255, 255, 255))  # bands above and below
    assert _close(px[32, 1], GREEN) and _close(px[32, 20], RED) and _close(px[32, 60], BLUE)
    assert (px[:, :, 1] > 200).all(axis=1).sum() >= 30  # 32 white rows (16 above, 16 below)


def test_squish_stretches_the_whole_photo():
    px = resize_crop(_photo(), Preprocess(size=64, resize=64, interpolation="nearest", crop="squish"))
    assert _close(px[0, 1], GREEN) and _close(px[63, 1], GREEN)  # the stripe, full height
    assert _close(px[5, 20], RED) and _close(px[5, 60], BLUE)


def test_box_cuts_the_fractions_first():
    pre = Preprocess(size=32, resize=32, interpolation="nearest", crop="box", box=(0.0, 0.0, 0.5, 1.0))
    px = resize_crop(_photo(), pre)  # the left half, 100 x 100: green stripe then red, no blue
    assert _close(px[16, 0], GREEN) and _close(px[16, 20], RED)
    assert not any(_close(px[r, c], BLUE) for r in range(32) for c in range(32))


def test_load_rgb_applies_the_mode_to_jpeg_bytes():
    buf = io.BytesIO()
    _photo().save(buf, "PNG")
    px = load_rgb(buf.getvalue(), Preprocess(size=64, resize=64, crop="pad"))
    assert _close(px[2, 32], (255, 255, 255), 10) and _close(px[32, 60], BLUE, 10)


def test_stored_description_is_backward_compatible():
    old = {"size": 224, "resize": 256, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}
    pre = Preprocess.from_dict(old)
    assert pre.crop == "center" and pre.box is None
    assert pre.to_dict() == old  # centre-crop models write exactly what they wrote before: same cache keys
    boxed = Preprocess(crop="box", box=(0.1, 0.0, 0.9, 1.0))
    assert boxed.to_dict()["crop"] == "box" and boxed.to_dict()["box"] == [0.1, 0.0, 0.9, 1.0]
    assert Preprocess.from_dict(json.loads(json.dumps(boxed.to_dict()))) == boxed
    assert Preprocess.from_dict({**old, "crop": "pad"}).crop == "pad"


def test_bad_modes_and_boxes_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="preprocess crop 'zoom' is not one of center, pad, squish, box"):
        Preprocess(crop="zoom")
    with pytest.raises(ValueError, match=r"crop box \(0.5, 0, 0.4, 1\) must be 4 fractions \[x0, y0, x1, y1\]"):
        Preprocess(crop="box", box=(0.5, 0, 0.4, 1))
    with pytest.raises(ValueError, match="crop 'box' needs box"):
        load_config(overrides=[{"backbone": {"crop": "box"}}])
    with pytest.raises(ValueError, match="box is only used with crop 'box' .crop is 'pad'."):
        load_config(overrides=[{"backbone": {"crop": "pad", "box": [0, 0, 1, 1]}}])


def test_backbones_carry_the_mode_and_have_their_own_cache_key():
    plain = create_backbone("efficientnet_lite0", "random")
    padded = create_backbone("efficientnet_lite0", "random", crop_pct=1.0, crop="pad")
    assert padded.preprocess.crop == "pad" and padded.preprocess.size == padded.preprocess.resize == 224
    assert padded.describe()["preprocess"]["crop"] == "pad"
    assert padded.fingerprint() != plain.fingerprint()
    multi = create_backbone("efficientnet_lite0+efficientnet_lite1@256", "random", crop="squish")
    assert multi.preprocess.crop == "squish"


def test_cli_crop_flag_and_trained_model_keep_the_mode(tmp_path):
    from catalens.cli import build_parser
    from catalens.commands._common import config_from_args
    from catalens.model.load import load_model
    from catalens.synthetic import make_folder_dataset
    from catalens.train.pipeline import train

    args = build_parser().parse_args(["train", "D", "--out", "M", "--crop", "pad", "--crop-pct", "1"])
    cfg = config_from_args(args)
    assert cfg.backbone.crop == "pad" and cfg.backbone.crop_pct == 1.0
    data = make_folder_dataset(tmp_path / "data", n_per_class=4, size=64)
    cfg = load_config(overrides=[{"tracking": False, "engine": {"progress": False, "runtime": "eager", "workers": 0},
                                  "head": {"epochs": 5}, "backbone": {"weights": "random", "image_size": 64,
                                                                     "crop": "squish"}}])
    train(data, tmp_path / "m", cfg, log=lambda *a: None)
    desc = json.loads((tmp_path / "m" / "model.json").read_text())
    assert desc["backbone"]["preprocess"]["crop"] == "squish"
    model = load_model(tmp_path / "m")
    assert model.preprocess.crop == "squish"


@pytest.mark.parametrize("crop,box", [("pad", None), ("squish", None), ("box", (0.1, 0.0, 0.6, 1.0))])
def test_both_jpeg_decoders_cut_the_same_square(crop, box):
    """A DCT-scaled decode (libjpeg-turbo) keeps the full-resolution geometry: same crop as Pillow's."""
    pytest.importorskip("simplejpeg")
    rng = np.random.default_rng(0)
    a = np.kron(rng.integers(0, 256, (30, 60, 3)), np.ones((20, 20, 1))).astype(np.uint8)  # 600 x 1200 blocks
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=95)
    pre = Preprocess(size=96, resize=96, crop=crop, box=box)
    turbo = load_rgb(buf.getvalue(), pre, jpeg="simplejpeg").astype(int)
    pil = load_rgb(buf.getvalue(), pre, jpeg="pillow").astype(int)
    assert turbo.shape == pil.shape == (96, 96, 3)
    assert np.abs(turbo - pil).mean() < 4  # decoders and scale steps differ a little; the geometry does not
