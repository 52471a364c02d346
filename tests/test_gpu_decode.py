"""The GPU decode path (catalens.embed.gpu_decode), checked on the CPU (device="cpu").

torchvision's image extension does not load on this machine (a CUDA build of torchvision next to
a CPU torch), so the device decoder here is :func:`pillow_decoder` (same interface, full-resolution
decode); everything around it (routing, geometry, torch resize and crop, problems, the engine's
use of it) is the code a GPU runs."""
from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from catalens.embed import engine as eng
from catalens.embed.decode import routable
from catalens.embed.gpu_decode import decode_batch, pillow_decoder, resize_crop_tensor
from catalens.ingest.catalogue import Catalogue
from catalens.ingest.images import ImageProblem, Preprocess, load_rgb
from tests.conftest import jpeg_bytes

PRE = Preprocess(size=224, resize=256)


def _real_photos(shared_data: Path, n: int) -> list[Path]:
    files = sorted((shared_data / "clothing-small").rglob("*.jpg"))
    return files[:: max(1, len(files) // n)][:n]


def test_device_pixels_match_the_pillow_path_on_real_photos(shared_data):
    datas = [p.read_bytes() for p in _real_photos(shared_data, 100)]
    out = decode_batch(datas, PRE, "cpu", decoder=pillow_decoder())
    assert out.on_device.all() and out.ok.all() and not out.problems
    ref = np.stack([load_rgb(d, PRE, jpeg="pillow") for d in datas]).astype(int)
    diff = np.abs(out.pixels.numpy().astype(int) - ref)
    # measured: mean 0.15, 99th percentile 1, max 6 grey levels (antialiased bicubic in torch vs Pillow)
    assert diff.mean() < 0.3 and np.percentile(diff, 99) <= 1 and diff.max() <= 12


@pytest.mark.parametrize("crop,box", [("squish", None), ("pad", None), ("box", (0.1, 0.0, 0.7, 0.9))])
def test_crop_modes_cut_the_same_square(shared_data, crop, box):
    pre = Preprocess(size=192, resize=224, crop=crop, box=box)   # no DCT draft on 400 px photos (as on the GPU)
    datas = [p.read_bytes() for p in _real_photos(shared_data, 8)]
    got = decode_batch(datas, pre, "cpu", decoder=pillow_decoder()).pixels.numpy().astype(int)
    ref = np.stack([load_rgb(d, pre, jpeg="pillow") for d in datas]).astype(int)
    assert np.abs(got - ref).mean() < 0.6


def test_resize_crop_tensor_is_exact_without_resampling():
    a = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)   # h 30, w 40
    pre = Preprocess(size=20, resize=30)                                         # short side already 30
    got = resize_crop_tensor(torch.from_numpy(a).permute(2, 0, 1), pre).numpy()
    np.testing.assert_array_equal(got, a[5:25, 10:30])


def _exif_rotated() -> bytes:
    im = Image.fromarray(np.full((40, 60, 3), 90, np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def test_other_inputs_go_to_the_cpu_path_with_the_same_problems():
    plain = jpeg_bytes((30, 160, 90), size=(300, 280), pattern=2)
    inputs = {
        "plain": plain,
        "png": jpeg_bytes(fmt="PNG", size=(300, 280)),
        "cmyk": jpeg_bytes(mode="CMYK", size=(300, 280)),
        "rotated": _exif_rotated(),
        "truncated": plain[: len(plain) // 2],
        "empty": b"",
        "text": b"hello, not a photo",
        "bomb": jpeg_bytes(size=(1200, 1000)),
        "refused": jpeg_bytes((200, 200, 20), size=(300, 280)),
    }
    refused = inputs["refused"]

    def device(datas, dev):   # a device decoder that refuses one photo (its batch then goes one by one)
        if any(t.numpy().tobytes() == refused for t in datas):
            raise RuntimeError("nvjpeg: corrupt data")
        return pillow_decoder()(datas, dev)

    pre = Preprocess(size=64, resize=72)
    datas = list(inputs.values())
    out = decode_batch(datas, pre, "cpu", max_pixels=1_000_000, decoder=device, jpeg="pillow")
    assert [k for k, on in zip(inputs, out.on_device) if on] == ["plain"]
    for j, (name, data) in enumerate(inputs.items()):
        notes: list[str] = []
        try:
            ref = load_rgb(data, pre, 1_000_000, notes, jpeg="pillow")
        except ImageProblem as p:
            assert out.problems[j] == (p.code, p.detail) and not out.ok[j], name
            continue
        assert out.ok[j] and out.notes.get(j, ()) == tuple(notes), name
        if not out.on_device[j]:   # decoded by the CPU path: identical pixels
            np.testing.assert_array_equal(out.pixels[j].numpy(), ref, err_msg=name)
    assert {datas.index(v) for k, v in inputs.items() if k in ("truncated", "empty", "text", "bomb")} == \
        set(out.problems)
    assert out.notes[datas.index(inputs["rotated"])] == ("applied EXIF orientation 6",)
    assert routable(inputs["plain"], Preprocess(interpolation="lanczos")) is None   # torch has no lanczos


def _catalogue(paths) -> Catalogue:
    frame = pd.DataFrame({"id": [str(i) for i in range(len(paths))], "path": [str(p) for p in paths]})
    return Catalogue(frame, [], Path("/"), "test")


def test_engine_decodes_on_the_device_only_when_asked(shared_data, tmp_path, monkeypatch, caplog):
    """With a device decode (here: the CPU standing in for CUDA) the engine sends plain JPEGs as
    bytes, decodes them in batches there and infers on the tensors; problems stay the CPU path's."""
    from catalens.embed.factory import create_backbone

    torch.manual_seed(0)
    bb = create_backbone("test_efficientnet", weights="random")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a photo")
    png = tmp_path / "p.png"
    png.write_bytes(jpeg_bytes(fmt="PNG", size=(200, 180)))
    paths = _real_photos(shared_data, 12) + [bad, png]
    cat = _catalogue(paths)
    cfg = eng.EngineConfig(runtime="eager", workers=0, progress=False, jpeg="pillow")
    assert eng._device_decode(cfg, bb.preprocess, "pillow") is None    # no GPU here: the CPU path

    def run(batch):
        x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(batch)
        seen.append(type(batch).__name__)
        with torch.inference_mode():
            return bb.module(x.permute(0, 3, 1, 2).float()).numpy()

    seen: list = []
    monkeypatch.setattr(eng, "engine_runner", lambda *a, **k: run)
    cpu = list(eng.stream_features(cat, bb, None, cfg))
    assert set(seen) == {"ndarray"}
    seen.clear()
    monkeypatch.setattr(eng, "_device_decode", lambda c, pre, jpeg: eng._DeviceDecode(
        pre, pillow_decoder(), torch.device("cpu"), c.max_pixels, jpeg))
    dev = list(eng.stream_features(cat, bb, None, cfg))
    assert set(seen) == {"Tensor"}
    f_cpu, f_dev = cpu[0].features, dev[0].features
    assert (cpu[0].ok == dev[0].ok).all() and dev[0].ok.tolist() == [True] * 12 + [False, True]
    assert cpu[0].problems == dev[0].problems and dev[0].problems[0]["problem"] == "not_an_image"
    cos = (f_cpu * f_dev).sum(1)[:12] / np.linalg.norm(f_cpu[:12], axis=1) / np.linalg.norm(f_dev[:12], axis=1)
    assert cos.min() > 0.99
    np.testing.assert_array_equal(f_cpu[13], f_dev[13])   # the PNG went the CPU path both times

    def unavailable(device):
        raise RuntimeError("torchvision cannot decode JPEGs on cpu (test)")

    import logging

    from catalens.embed import gpu_decode

    monkeypatch.setattr(gpu_decode, "device_decoder", unavailable)
    monkeypatch.setattr(eng, "_device_decode", lambda c, pre, jpeg: eng._DeviceDecode(
        pre, None, torch.device("cpu"), c.max_pixels, jpeg))
    with caplog.at_level(logging.WARNING, logger="catalens.embed.engine"):
        fallback = list(eng.stream_features(cat, bb, None, cfg))
    assert [r.getMessage() for r in caplog.records] == ["decoding JPEGs on the CPU: torchvision cannot decode "
                                                        "JPEGs on cpu (test)"]
    np.testing.assert_array_equal(fallback[0].features, f_cpu)   # every photo took the CPU path
    assert fallback[0].problems == cpu[0].problems


def test_the_cpu_engine_never_imports_the_gpu_path(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(size=(120, 100)))
    code = textwrap.dedent(f"""
        import sys
        import pandas as pd
        from pathlib import Path
        from catalens.embed.engine import EngineConfig, embed_catalogue
        from catalens.embed.factory import create_backbone
        from catalens.ingest.catalogue import Catalogue
        cat = Catalogue(pd.DataFrame({{"id": ["a"], "path": ["{tmp_path / 'a.jpg'}"]}}), [], Path("/"), "t")
        out = embed_catalogue(cat, create_backbone("test_efficientnet", weights="random"), None,
                              EngineConfig(runtime="eager", progress=False))
        assert out.ok.all()
        print("gpu_decode" if "catalens.embed.gpu_decode" in sys.modules else "cpu only")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "cpu only"
