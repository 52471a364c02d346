"""Non-square inputs: NAME@HxW / --image-size HxW (height x width), every crop mode, fine-tuning,
export, and the same answer through torch and the graph (issue 16)."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from catalens.config import load_config, parse_input_size
from catalens.embed.backbones import BackboneError
from catalens.embed.factory import _parse_spec, create_backbone
from catalens.ingest.images import Preprocess, load_rgb, resize_crop
from catalens.train.augment import AugmentParams, _store_pre, augment, center_view, random_resized_box
from conftest import real_photo_table
from test_crop_modes import BLUE, GREEN, RED, _close, _photo  # the same wide test photo

SHARED = Path(os.environ.get("CATALENS_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
WHITE = (255, 255, 255)


def test_sizes_parse_as_height_by_width():
    assert _parse_spec("efficientnet_lite0@256x192") == ("efficientnet_lite0", (256, 192))
    assert _parse_spec("efficientnet_lite0@256x256") == ("efficientnet_lite0", 256)  # a square is a side
    assert parse_input_size("301X217") == (301, 217) and parse_input_size([217, 301]) == (217, 301)
    with pytest.raises(BackboneError, match=r"HEIGHTxWIDTH, each a whole number of pixels from 32 to 1024, e.g. "
                                            r"efficientnet_lite0@256 or efficientnet_lite0@256x192"):
        _parse_spec("efficientnet_lite0@256x16")
    assert load_config(overrides=[{"backbone": {"image_size": "256X192"}}]).backbone.image_size == "256x192"
    with pytest.raises(Exception, match="expected a side \\(e.g. 256\\) or HEIGHTxWIDTH"):
        load_config(overrides=[{"backbone": {"image_size": "256 by 192"}}])
    from catalens.cli import build_parser
    from catalens.commands._common import config_from_args

    cfg = config_from_args(build_parser().parse_args(["train", "D", "--out", "M", "--image-size", "256x192"]))
    assert cfg.backbone.image_size == "256x192"
    pre = create_backbone("efficientnet_lite0", weights="random", image_size=cfg.backbone.image_size).preprocess
    assert pre.hw == (256, 192) and pre.resize_hw == (293, 220)  # crop share 0.875 on both axes


def test_description_records_the_width_and_squares_stay_as_before():
    pre = create_backbone("efficientnet_lite0@256x192", weights="random", crop_pct=1.0).preprocess
    d = pre.to_dict()
    assert (d["size"], d["width"], d["resize"]) == (256, 192, 256)
    assert Preprocess.from_dict(d) == pre
    square = create_backbone("efficientnet_lite0@256", weights="random").preprocess
    assert "width" not in square.to_dict() and Preprocess(size=224, resize=256, width=224).width is None
    assert pre.shape_name == "256x192" and square.shape_name == "256"


def test_crop_modes_fill_a_non_square_canvas():
    # a wide photo into a tall input of 64 rows x 32 columns
    center = resize_crop(_photo(), Preprocess(size=64, resize=64, width=32))
    assert center.shape == (64, 32, 3)  # height 64 covered: the photo is 128 wide, its middle 32 kept
    assert _close(center[:, :15], RED) and _close(center[:, 17:], BLUE)
    pad = resize_crop(_photo(), Preprocess(size=64, resize=64, width=32, crop="pad"))
    assert pad.shape == (64, 32, 3)  # the whole photo, 32 x 16, on white above and below
    assert _close(pad[:20], WHITE) and _close(pad[-20:], WHITE)
    assert _close(pad[28:36, 4:14], RED) and _close(pad[28:36, 18:30], BLUE) and pad[28:36, 0, 1].min() > 100
    squish = resize_crop(_photo(), Preprocess(size=64, resize=64, width=32, crop="squish"))
    assert squish.shape == (64, 32, 3) and _close(squish[:, 0], GREEN) and _close(squish[:, -1], BLUE)
    box = resize_crop(_photo(), Preprocess(size=64, resize=64, width=32, crop="box", box=(0.5, 0, 1, 1)))
    assert box.shape == (64, 32, 3) and _close(box, BLUE)  # the blue half only


def _photos(n: int) -> list[bytes]:
    root = SHARED / "clothing-small" / "train"
    if root.exists():  # real photos: mostly 400 x 534 portrait, some landscape
        return [f.read_bytes() for f in sorted(root.rglob("*.jpg"))[:n]]
    out = []
    for i, (w, h) in enumerate([(400, 534), (534, 400), (400, 533)] * n):
        a = np.random.default_rng(i).integers(0, 256, (h // 20 + 1, w // 20 + 1, 3)).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(np.kron(a, np.ones((20, 20, 1), np.uint8))[:h, :w]).save(buf, "JPEG")
        out.append(buf.getvalue())
    return out[:n]


@pytest.mark.parametrize("crop,box", [("center", None), ("pad", None), ("squish", None), ("box", (0.1, 0, 0.9, 1))])
def test_fine_tuning_store_gives_the_predict_pixels(crop, box):
    """The evaluation view of the fine-tuning store is bit-identical to what predict decodes."""
    pre = create_backbone("efficientnet_lite0@256x192", weights="random", crop=crop, box=box).preprocess
    for data in _photos(12):
        px, stored = load_rgb(data, pre), load_rgb(data, _store_pre(pre))
        assert px.shape == (256, 192, 3) and stored.shape == (293, 220, 3)
        assert np.array_equal(center_view(stored, pre.hw), px)


def test_augmented_views_of_a_rectangle():
    rng = np.random.default_rng(0)
    for _ in range(50):
        x0, y0, x1, y1 = random_resized_box(rng, (293, 220), (0.5, 1.0), (3 / 4, 4 / 3))
        assert 0 <= x0 < x1 <= 220 and 0 <= y0 < y1 <= 293
        assert 0.5 * 293 * 220 * 0.97 <= (x1 - x0) * (y1 - y0) <= 293 * 220
    # a square side as a tuple draws the very boxes of the square code path
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    assert [random_resized_box(a, 256, (0.5, 1), (0.75, 4 / 3)) for _ in range(5)] == \
        [random_resized_box(b, (256, 256), (0.5, 1), (0.75, 4 / 3)) for _ in range(5)]
    img = np.random.default_rng(1).integers(0, 256, (293, 220, 3)).astype(np.uint8)
    view = augment(img, np.random.default_rng(2), AugmentParams(size=256, width=192))
    assert view.shape == (256, 192, 3) and view.dtype == np.uint8


def test_side_by_side_backbones_refuse_a_non_square_member():
    with pytest.raises(ValueError,
                       match="share one square decode, and 256x192 is not square"):
        create_backbone("efficientnet_lite0@256x192+efficientnet_lite1", weights="random")


def test_a_model_folder_with_a_bad_width_is_refused(tmp_path):
    from catalens.model.validate import check_backbone
    from catalens.model.validate import ModelFolderError

    desc = create_backbone("efficientnet_lite0@256x192", weights="random").describe()
    check_backbone(desc, "m/model.json")  # a good one passes
    desc["preprocess"]["width"] = 4
    with pytest.raises(ModelFolderError, match=r"backbone.preprocess.width is 4; expected an integer from"):
        check_backbone(desc, "m/model.json")


def test_real_photos_fine_tune_export_and_predict_the_same_through_torch_and_the_graph(tmp_path):
    """End to end at 128 x 96 (height x width) on a few real photos: fine-tuning stores 4 x 3 activation
    maps, the model folder records the width, the exported graph takes (n, 3, 128, 96) and answers
    as torch does."""
    import torch

    from catalens.embed.runtimes import to_tensor
    from catalens.export.onnx import OnnxModel, export_onnx
    from catalens.model.single import CatalensModel
    from catalens.train.pipeline import train

    data, rows = real_photo_table(tmp_path, 5, 2)
    cfg = load_config(overrides=[{"tracking": False, "cache_dir": str(tmp_path / "cache"),
                                  "engine": {"progress": False, "runtime": "eager", "workers": 0},
                                  "backbone": {"name": "efficientnet_lite0@128x96", "crop": "pad"},
                                  "finetune": {"mode": "blocks", "epochs": 1, "views": 1, "workers": 0}}])
    lines: list[str] = []
    train(data, tmp_path / "m", cfg, log=lines.append)
    assert any("views (192, 4, 3)" in line for line in lines)  # 128/32 rows x 96/32 columns
    pre = json.loads((tmp_path / "m" / "model.json").read_text())["backbone"]["preprocess"]
    assert (pre["size"], pre["width"], pre["crop"]) == (128, 96, "pad")
    res = export_onnx(tmp_path / "m", log=lambda *a: None)
    assert res.parity_ok
    assert res.description["input"]["shape"] == ["n", 3, 128, 96]
    photos = [Path(r["path"]).read_bytes() for r in rows[::3]]
    graph = OnnxModel(res.path).predict_bytes(photos)
    model = CatalensModel.load(tmp_path / "m")
    px = np.stack([load_rgb(b, model.backbone.preprocess) for b in photos])
    with torch.inference_mode():
        ref = {k: v.numpy() for k, v in model.pixel_module()(to_tensor(px)).items()}
    np.testing.assert_allclose(graph["label"], ref["label"], rtol=0, atol=1e-5)
    assert (graph["label"].argmax(1) == ref["label"].argmax(1)).all()
