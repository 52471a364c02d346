"""JPEG decoding through libjpeg-turbo (simplejpeg): same pictures, notes and problems as Pillow."""
from __future__ import annotations

import io
import types

import numpy as np
import pytest
from PIL import Image

from catalens.ingest import images as im_mod
from catalens.ingest.images import ImageProblem, Preprocess, decode, jpeg_decoder, load_rgb
from tests.conftest import jpeg_bytes

pytestmark = pytest.mark.skipif(im_mod.simplejpeg is None,
                                reason="simplejpeg is not installed (pip install 'catalens[fast]')")

PRE = Preprocess(size=80, resize=96)   # at most the small pictures' short side: no DCT scaling


@pytest.fixture
def spy(monkeypatch):
    """Records every simplejpeg.decode_jpeg call: (min_height, min_width, decoded shape or error)."""
    real = im_mod.simplejpeg
    calls = []

    def decode_jpeg(data, **kw):
        try:
            out = real.decode_jpeg(data, **kw)
        except ValueError as e:
            calls.append((kw.get("min_height"), kw.get("min_width"), str(e)))
            raise
        calls.append((kw.get("min_height"), kw.get("min_width"), out.shape))
        return out

    monkeypatch.setattr(im_mod, "simplejpeg", types.SimpleNamespace(decode_jpeg=decode_jpeg))
    return calls


def _both(data: bytes, pre: Preprocess = PRE, **kw):
    """(pixels, notes) from the Pillow path and from the simplejpeg path."""
    out = []
    for jpeg in ("pillow", "simplejpeg"):
        notes: list[str] = []
        out.append((load_rgb(data, pre, notes=notes, jpeg=jpeg, **kw), notes))
    return out


def _marked(w: int = 120, h: int = 80) -> np.ndarray:
    """A grey picture with a red block at the top-left corner: orientation is easy to see."""
    a = np.full((h, w, 3), 128, np.uint8)
    a[: h // 4, : w // 4] = (230, 20, 20)
    return a


def test_rgb_jpeg_decodes_like_pillow(spy):
    data = jpeg_bytes((40, 160, 90), size=(96, 128), pattern=2, quality=95)
    (ref, ref_notes), (got, notes) = _both(data)
    assert len(spy) == 1 and spy[0][2] == (128, 96, 3)   # 96 px short side: no M/8 keeps it >= 96
    assert got.shape == (80, 80, 3) and notes == ref_notes == []
    assert np.abs(got.astype(int) - ref).max() <= 1


def test_exif_rotated_jpeg(spy):
    exif = Image.Exif()
    exif[0x0112] = 6                       # stored sideways: rotate 90 degrees clockwise to show it
    buf = io.BytesIO()
    Image.fromarray(_marked()).save(buf, "JPEG", quality=95, exif=exif)
    data = buf.getvalue()
    pil, turbo = decode(data, jpeg="pillow"), decode(data, jpeg="simplejpeg")
    assert pil.size == turbo.size == (80, 120)   # upright: width and height swapped
    a = np.asarray(turbo)
    assert a[5, -5, 0] > 200 and a[5, -5, 1] < 60    # the red corner moved to the top right
    assert np.abs(a.astype(int) - np.asarray(pil)).max() <= 1
    (ref, ref_notes), (got, notes) = _both(data)
    assert notes == ref_notes == ["applied EXIF orientation 6"]
    assert np.abs(got.astype(int) - ref).max() <= 1
    assert len(spy) == 2


def test_truncated_jpeg_gives_the_same_problem(spy):
    data = jpeg_bytes(size=(300, 200), pattern=1)
    cut = data[: len(data) // 2]
    problems = []
    for jpeg in ("pillow", "simplejpeg"):
        with pytest.raises(ImageProblem) as e:
            load_rgb(cut, PRE, jpeg=jpeg)
        problems.append((e.value.code, str(e.value)))
    assert problems[0] == problems[1]
    assert problems[1][0] == "truncated" and "image file is truncated" in problems[1][1]
    assert spy == [(96, 96, "Premature end of JPEG file")]   # libjpeg-turbo refused; Pillow named it


def test_grayscale_jpeg_goes_through_simplejpeg(spy):
    data = jpeg_bytes((90, 90, 90), size=(100, 90), pattern=3, mode="L", quality=95)
    (ref, ref_notes), (got, notes) = _both(data)
    assert len(spy) == 1
    assert notes == ref_notes == ["converted L to RGB"]
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()
    assert np.abs(got.astype(int) - ref).max() <= 1


def test_cmyk_jpeg_is_left_to_pillow(spy):
    data = jpeg_bytes((200, 60, 30), size=(100, 90), mode="CMYK", quality=95)
    (ref, ref_notes), (got, notes) = _both(data)
    assert spy == []                        # libjpeg-turbo cannot give RGB from CMYK: Pillow decodes it
    assert notes == ref_notes == ["converted CMYK to RGB"]
    np.testing.assert_array_equal(got, ref)


def test_png_is_left_to_pillow(spy):
    data = jpeg_bytes(size=(80, 80), fmt="PNG")
    (ref, _), (got, _) = _both(data)
    assert spy == []
    np.testing.assert_array_equal(got, ref)


def test_dct_scaling_keeps_the_full_resolution_geometry(spy):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:711, 0:400]
    a = np.stack([128 + 100 * np.sin(xx / 17.0), 128 + 90 * np.cos(yy / 23.0), 100 + 0 * xx], -1)
    a = np.clip(a + rng.normal(0, 3, a.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=92)
    pre = Preprocess(size=224, resize=256)
    (ref, _), (got, _) = _both(buf.getvalue(), pre)
    # libjpeg-turbo decodes at 6/8 (300 x 534: the smallest M/8 keeping both sides >= 256);
    # Pillow's draft cannot halve a 400 px side, so it decodes 400 x 711
    assert spy == [(256, 256, (534, 300, 3))]
    diff = np.abs(got.astype(int) - ref)
    assert diff.mean() < 1.5 and diff.max() <= 12, (diff.mean(), diff.max())


def test_bombs_and_empties_named_as_before():
    data = jpeg_bytes(size=(200, 100))
    for jpeg in ("pillow", "simplejpeg"):
        with pytest.raises(ImageProblem, match=r"^decompression_bomb: 200x100 = 20,000 pixels > limit 10,000;"):
            load_rgb(data, PRE, max_pixels=10_000, jpeg=jpeg)
        with pytest.raises(ImageProblem, match=r"^empty: 0 bytes;"):
            load_rgb(b"", PRE, jpeg=jpeg)
        with pytest.raises(ImageProblem, match=r"^not_an_image: cannot identify image"):
            load_rgb(b"\xff\xd8\xff\xe0 not really", PRE, jpeg=jpeg)


def test_decoder_choice(monkeypatch):
    monkeypatch.delenv("CATALENS_JPEG_DECODER", raising=False)
    assert jpeg_decoder() == "simplejpeg" and jpeg_decoder("pillow") == "pillow"
    monkeypatch.setenv("CATALENS_JPEG_DECODER", "pillow")
    assert jpeg_decoder() == "pillow" and jpeg_decoder("simplejpeg") == "simplejpeg"
    monkeypatch.setenv("CATALENS_JPEG_DECODER", "turbo")
    with pytest.raises(ValueError, match="JPEG decoder must be auto, simplejpeg or pillow, got 'turbo' "
                                         r"\(check CATALENS_JPEG_DECODER\)"):
        jpeg_decoder()
    monkeypatch.setattr(im_mod, "simplejpeg", None)
    monkeypatch.delenv("CATALENS_JPEG_DECODER")
    assert jpeg_decoder() == "pillow" and jpeg_decoder("simplejpeg") == "pillow"


def test_engine_decodes_like_load_rgb(monkeypatch, tmp_path):
    """One decoder everywhere (engine, load_rgb for serving): features never depend on the plan;
    the embedding cache keeps simplejpeg features apart from Pillow's."""
    from catalens.embed.cache import EmbeddingCache
    from catalens.embed.engine import EngineConfig, engine_jpeg, stream_features

    monkeypatch.delenv("CATALENS_JPEG_DECODER", raising=False)
    assert engine_jpeg(EngineConfig()) == jpeg_decoder() == "simplejpeg"
    assert engine_jpeg(EngineConfig(jpeg="pillow")) == "pillow"
    monkeypatch.setenv("CATALENS_JPEG_DECODER", "pillow")
    assert engine_jpeg(EngineConfig()) == jpeg_decoder() == "pillow"
    pil = EmbeddingCache(tmp_path, "fp", 4)
    monkeypatch.delenv("CATALENS_JPEG_DECODER")
    turbo = EmbeddingCache(tmp_path, "fp", 4)
    assert (pil.decoder, pil.dir.name, turbo.decoder, turbo.dir.name) == ("pillow", "fp", "simplejpeg",
                                                                          "fp+simplejpeg")
    with pytest.raises(ValueError, match=r"the embedding cache at .*/fp holds features of JPEGs decoded by pillow, "
                                         r"but the engine decodes with simplejpeg: open the cache with "
                                         r"jpeg='simplejpeg' or run the engine with jpeg='pillow'"):
        next(stream_features(None, types.SimpleNamespace(preprocess=PRE), pil, EngineConfig()))
