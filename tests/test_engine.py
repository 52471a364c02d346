"""The streaming engine and its inference runtimes."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from catalens.embed import engine as engine_mod
from catalens.embed import runtimes as rt
from catalens.embed.factory import create_backbone
from catalens.embed.cache import EmbeddingCache
from catalens.embed.engine import EngineConfig, embed_catalogue, plan, stream_features
from catalens.ingest.catalogue import Catalogue
from catalens.ingest.images import load_rgb
from tests.conftest import jpeg_bytes

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def tiny():
    """A tiny timm network with random weights (160 px, 256 features): fast on any CPU."""
    torch.manual_seed(0)
    return create_backbone("test_efficientnet", weights="random")


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("efficientnet_lite0")


def _real_photos(n: int) -> list[Path]:
    root = DATA / "clothing-small"
    if not root.exists():
        pytest.skip(f"real photos not found at {root}")
    files = sorted(root.rglob("*.jpg"))
    return files[:: max(1, len(files) // n)][:n]


def _pixels(paths: list[Path], pre) -> np.ndarray:
    return np.stack([load_rgb(p.read_bytes(), pre) for p in paths])


def _catalogue(paths: list) -> Catalogue:
    frame = pd.DataFrame({"id": [str(i) for i in range(len(paths))], "path": [str(p) for p in paths]})
    return Catalogue(frame, [], Path("/"), "test")


# ------------------------------------------------------------------ runtimes

def test_onnx_matches_eager_on_real_pixels(lite0, tmp_path):
    px = _pixels(_real_photos(12), lite0.preprocess)
    rep = rt.runtime_parity(lite0, px, "onnx", cache_dir=tmp_path)
    assert rep["ran"] == "onnx"
    assert rep["max_abs_diff"] < 1e-3, rep
    assert rep["min_cosine"] > 0.99999
    assert rep["nn_agreement"] == 1.0
    # the export is cached under the backbone fingerprint and reused
    files = list(tmp_path.glob("*.onnx"))
    assert [f.name for f in files] == [f"{lite0.fingerprint()}-s224.onnx"]
    runner = rt.make_runner("onnx", lite0.module, 224, cache_dir=tmp_path, fingerprint=lite0.fingerprint())
    assert runner.info["exported"] is False


@pytest.mark.parametrize("runtime", ["eager", "onnx", "bf16", "openvino"])
def test_runtimes_match_eager_tiny(tiny, tmp_path, runtime):
    if runtime == "openvino" and not rt.openvino_available():
        pytest.skip("openvino is not importable (pip install 'catalens[fast]')")
    px = _pixels(_real_photos(8), tiny.preprocess)
    head = np.random.default_rng(0).normal(size=(tiny.feature_dim, 5)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # bf16 emulated on this CPU
        rep = rt.runtime_parity(tiny, px, runtime, head=lambda f: f @ head, cache_dir=tmp_path)
    tol = {"eager": 0.0, "onnx": 1e-4, "bf16": 0.1, "openvino": 1e-4}[runtime]
    assert rep["max_rel_diff"] <= tol, rep
    assert rep["top1_agreement"] >= (0.75 if runtime == "bf16" else 1.0), rep


needs_openvino = pytest.mark.skipif(not rt.openvino_available(),
                                    reason="openvino is not importable (pip install 'catalens[fast]')")


@needs_openvino
def test_openvino_matches_eager_on_real_pixels(lite0, tmp_path):
    px = _pixels(_real_photos(12), lite0.preprocess)
    rep = rt.runtime_parity(lite0, px, "openvino", cache_dir=tmp_path, threads=2)
    assert rep["ran"] == "openvino"
    assert rep["max_abs_diff"] < 1e-4, rep       # fp32 (precision hint f32: no bf16 on CPUs that have it)
    assert rep["min_cosine"] > 0.99999 and rep["nn_agreement"] == 1.0, rep
    # it reads the ONNX export of the same cache, and OpenVINO keeps its compiled blobs there
    assert [f.name for f in tmp_path.glob("*.onnx")] == [f"{lite0.fingerprint()}-s224.onnx"]
    assert list((tmp_path / "openvino").iterdir())
    again = rt.make_runner("openvino", lite0.module, 224, cache_dir=tmp_path, fingerprint=lite0.fingerprint())
    assert again.info["exported"] is False
    # a batch split over two parallel infer requests gives the same features
    two = rt.make_runner("openvino", lite0.module, 224, cache_dir=tmp_path, fingerprint=lite0.fingerprint(),
                         threads=2, streams=2)
    np.testing.assert_allclose(two(px), again(px), atol=1e-5)


@needs_openvino
def test_openvino_int8_calibrated_on_real_photos(lite0, tmp_path):
    px = _pixels(_real_photos(48), lite0.preprocess)
    fp, mod = lite0.fingerprint(), lite0.module
    with pytest.raises(RuntimeError, match=r"runtime 'openvino-int8' needs a model calibrated on real photos, and "
                                           r".*-s224-int8.xml does not exist: run 'catalens export MODEL --openvino-int8' "
                                           r"\(calibrates on the model's training photos; in Python "
                                           r"catalens.embed.runtimes.quantize_openvino\(module, 224, pixels\)"):
        rt.make_runner("openvino-int8", mod, 224, cache_dir=tmp_path, fingerprint=fp)
    with pytest.raises(ValueError, match=r"calibration pixels must be uint8 \(n, 224, 224, 3\), got float32"):
        rt.quantize_openvino(mod, 224, px[:4].astype(np.float32), cache_dir=tmp_path, fingerprint=fp)
    path = rt.quantize_openvino(mod, 224, px[::2], cache_dir=tmp_path, fingerprint=fp)   # calibrate on 24
    assert path == tmp_path / f"{fp}-s224-int8.xml" and path.with_suffix(".bin").exists()
    rep = rt.runtime_parity(lite0, px[1::2], "openvino-int8", cache_dir=tmp_path, fingerprint=fp)   # 24 unseen
    assert rep["ran"] == "openvino-int8"
    assert rep["max_rel_diff"] > 1e-3, rep           # really quantised, not fp32
    assert rep["min_cosine"] > 0.9, rep              # and still close on photos it was not calibrated on (0.945
    # with these 24 on a VNNI CPU, 0.937 on AVX2 only with the overflow fix, 0.894 without it; accuracy on real
    # photos: benchmarks/bench_ceiling.py)


def test_compile_falls_back_to_eager(tiny, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    x = np.random.default_rng(0).integers(0, 256, (2, 160, 160, 3), dtype=np.uint8)
    runner = rt.make_runner("compile", tiny.module, 160)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        out = runner(x)
    np.testing.assert_allclose(out, rt.make_runner("eager", tiny.module, 160)(x), atol=1e-6)


def test_auto_picks_a_runtime_and_remembers_it(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(rt, "cuda_available", lambda: False)  # the CPU choice, also on a GPU machine
    runner, entry = rt.choose_runtime(tiny.module, 160, threads=1, cache_dir=tmp_path, fingerprint="fp-tiny")
    assert runner.name in rt.RUNTIMES and runner.name != "auto"
    assert runner.name == entry["runtime"] and entry["remembered"] is False
    assert set(entry["img_per_s"]) == set(rt.auto_candidates())
    if not rt.has_native_bf16():
        assert "bf16" not in entry["img_per_s"]
    stored = json.loads((tmp_path / "auto-choices.json").read_text())
    (key, saved), = stored.items()
    assert key.startswith("fp-tiny|s160|") and "threads=1" in key and saved["runtime"] == runner.name

    def no_measuring(*a, **k):
        raise AssertionError("a remembered choice must not be measured again")

    monkeypatch.setattr(rt, "measure_runner", no_measuring)
    again = rt.make_runner("auto", tiny.module, 160, threads=1, cache_dir=tmp_path, fingerprint="fp-tiny")
    assert again.name == runner.name and again.info["auto"]["remembered"] is True
    # another thread count is another machine setting: measured afresh
    monkeypatch.undo()
    other, e2 = rt.choose_runtime(tiny.module, 160, threads=2, cache_dir=tmp_path, fingerprint="fp-tiny")
    assert e2["remembered"] is False and len(json.loads((tmp_path / "auto-choices.json").read_text())) == 2
    assert key.endswith(f"|export={rt.EXPORT_REVISION}")
    monkeypatch.setattr(rt, "EXPORT_REVISION", rt.EXPORT_REVISION + 1)   # catalens changed what exports: measured again
    _, e3 = rt.choose_runtime(tiny.module, 160, threads=1, cache_dir=tmp_path, fingerprint="fp-tiny")
    assert e3["remembered"] is False


def test_bf16_only_a_candidate_with_native_support():
    assert "bf16" not in rt.auto_candidates({"avx2", "fma"})
    assert "bf16" in rt.auto_candidates({"avx512f", "avx512_bf16"})
    assert "bf16" in rt.auto_candidates({"amx_bf16"})
    assert rt.auto_candidates(set())[0] == "eager"


def test_engine_default_runtime_is_auto():
    assert EngineConfig().runtime == "auto"


def test_plan_splits_the_cores(monkeypatch):
    monkeypatch.setattr(engine_mod, "cuda_available", lambda: False)
    monkeypatch.setattr(engine_mod, "available_cpus", lambda: 2)
    p = plan(EngineConfig())   # small machines: decode threads alternate with inference
    assert (p.decode, p.workers, p.threads, p.in_flight) == ("threads", 2, 2, 0)
    p = plan(EngineConfig(decode="processes"))
    assert (p.decode, p.workers, p.threads, p.in_flight) == ("processes", 1, 2, 3)
    monkeypatch.setattr(engine_mod, "available_cpus", lambda: 16)
    p = plan(EngineConfig())   # big machines: decode processes overlap inference
    assert (p.decode, p.workers, p.threads) == ("processes", 4, 16)
    assert plan(EngineConfig(workers=3, threads=5, in_flight=2)) == engine_mod.Plan(16, 3, 5, 2, "processes")
    with pytest.raises(ValueError, match="decode must be auto, threads or processes, got 'gpu'"):
        plan(EngineConfig(decode="gpu"))
    assert plan(EngineConfig(), rows=10).workers == 0  # tiny jobs decode in-process


def test_plan_on_a_gpu_gives_every_core_but_one_to_decoding(monkeypatch):
    monkeypatch.setattr(engine_mod, "available_cpus", lambda: 16)
    monkeypatch.setattr(engine_mod, "cuda_available", lambda: True)
    for runtime in ("auto", "cuda", "cuda-bf16"):  # the GPU infers: the cores only decode
        p = plan(EngineConfig(runtime=runtime))
        assert (p.decode, p.workers, p.threads) == ("processes", 15, 16), runtime
    assert plan(EngineConfig(runtime="onnx")).workers == 4  # a CPU runtime keeps the CPU split
    monkeypatch.setattr(engine_mod, "cuda_available", lambda: False)
    assert plan(EngineConfig(runtime="auto")).workers == 4
    monkeypatch.setattr(engine_mod, "available_cpus", lambda: 2)
    assert plan(EngineConfig(runtime="cuda")) == engine_mod.Plan(2, 1, 2, 3, "processes")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")
@pytest.mark.parametrize("name", ["cuda", "cuda-bf16"])
def test_cuda_runtimes_without_a_gpu_say_so(tiny, name):
    with pytest.raises(RuntimeError, match=rf"runtime '{name}' needs a CUDA GPU, and torch .* sees none "
                                           r"\(torch.cuda.is_available\(\) is False\); use runtime 'auto'"):
        rt.make_runner(name, tiny.module, tiny.preprocess.size)


def test_auto_takes_the_gpu_without_measuring(tiny, tmp_path, monkeypatch):
    made = []

    def fake_cuda(module, size, **_):
        made.append(size)
        return rt.Runner("cuda", lambda b: np.zeros((len(b), 4), np.float32), {"device": "Fake GPU"})

    monkeypatch.setattr(rt, "cuda_available", lambda: True)
    monkeypatch.setattr(rt, "cuda_runner", fake_cuda)
    monkeypatch.setattr(rt, "choose_runtime", lambda *a, **k: pytest.fail("auto measured CPU runtimes"))
    r = rt.make_runner("auto", tiny.module, tiny.preprocess.size, cache_dir=tmp_path)
    assert (r.name, made) == ("cuda", [tiny.preprocess.size])
    assert r.info["auto"] == {"runtime": "cuda", "reason": "a CUDA GPU is present", "device": "Fake GPU"}
    assert not list(tmp_path.iterdir())  # nothing measured, nothing remembered


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_eager(tiny):
    px = np.random.default_rng(0).integers(0, 256, (6, tiny.preprocess.size, tiny.preprocess.size, 3), np.uint8)
    ref = rt.make_runner("eager", tiny.module, tiny.preprocess.size)(px)
    got = rt.make_runner("cuda", tiny.module, tiny.preprocess.size)(px)
    assert np.abs(got - ref).max() < 2e-2 * np.abs(ref).max()
    assert next(tiny.module.parameters()).device.type == "cpu"  # the caller's module stays put


# ------------------------------------------------------------------ streaming

@pytest.fixture
def mixed(tmp_path) -> list[str]:
    """Good photos with a zero-byte, a text and a missing .jpg among them."""
    d = tmp_path / "imgs"
    d.mkdir()
    paths = []
    for i in range(22):
        p = d / f"ok{i:02d}.jpg"
        p.write_bytes(jpeg_bytes((20 + 10 * i, 200 - 7 * i, 90), pattern=i % 4))
        paths.append(str(p))
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("this is not a picture\n")
    paths.insert(3, str(d / "empty.jpg"))
    paths.insert(11, str(d / "text.jpg"))
    paths.insert(17, str(d / "missing.jpg"))
    return paths


@pytest.mark.parametrize("workers,decode", [(0, "threads"), (1, "processes"), (2, "threads")])
def test_stream_rows_in_order_with_problems(tiny, mixed, workers, decode):
    cat = _catalogue(mixed)
    cfg = EngineConfig(workers=workers, decode=decode, block_rows=8, batch_size=5, runtime="eager", progress=False)
    blocks = list(stream_features(cat, tiny, None, cfg))
    rows = np.concatenate([b.rows for b in blocks])
    assert rows.tolist() == list(range(len(mixed)))
    problems = {p["row"]: p["problem"] for b in blocks for p in b.problems}
    assert problems == {3: "empty", 11: "not_an_image", 17: "missing"}
    ok = np.concatenate([b.ok for b in blocks])
    assert ok.sum() == 22 and not ok[[3, 11, 17]].any()
    feats = np.concatenate([b.features for b in blocks])
    assert not feats[[3, 11, 17]].any()
    # features equal a direct run of the backbone on the same pixels
    good = [i for i in range(len(mixed)) if ok[i]]
    px = np.stack([load_rgb(Path(mixed[i]).read_bytes(), tiny.preprocess) for i in good])
    np.testing.assert_allclose(feats[good], rt.make_runner("eager", tiny.module, 160)(px), atol=1e-5)


def test_resume_from_partial_cache_gives_identical_features(tiny, mixed, tmp_path):
    cat = _catalogue(mixed)
    cfg = EngineConfig(workers=1, block_rows=6, batch_size=4, runtime="eager", progress=False)
    fresh = embed_catalogue(cat, tiny, None, cfg)

    cache = EmbeddingCache(tmp_path / "cache", tiny.fingerprint(), tiny.feature_dim, flush_every=4)
    embed_catalogue(cat.subset(np.arange(12)), tiny, cache, cfg)   # an interrupted first run
    first = len(EmbeddingCache(tmp_path / "cache", tiny.fingerprint(), tiny.feature_dim))
    assert first == 10  # 12 rows, two of them broken

    cache = EmbeddingCache(tmp_path / "cache", tiny.fingerprint(), tiny.feature_dim, flush_every=4)
    resumed = embed_catalogue(cat, tiny, cache, cfg)
    np.testing.assert_allclose(resumed.features, fresh.features, atol=1e-5)
    assert (resumed.ok == fresh.ok).all()
    assert [(p["row"], p["problem"]) for p in resumed.problems] == [(p["row"], p["problem"]) for p in fresh.problems]
    assert len(EmbeddingCache(tmp_path / "cache", tiny.fingerprint(), tiny.feature_dim)) == 22

    # everything cached: nothing is decoded, features come back identical
    cache = EmbeddingCache(tmp_path / "cache", tiny.fingerprint(), tiny.feature_dim)
    again = embed_catalogue(cat, tiny, cache, cfg)
    np.testing.assert_array_equal(again.features, resumed.features)


def test_onnx_engine_on_real_photos(lite0, tmp_path):
    paths = _real_photos(40)
    cfg = EngineConfig(workers=1, block_rows=16, batch_size=16, runtime="onnx", progress=False,
                       runtime_dir=str(tmp_path))
    emb = embed_catalogue(_catalogue(paths), lite0, None, cfg)
    assert emb.ok.all() and not emb.problems
    ref = rt.make_runner("eager", lite0.module, 224)(_pixels(paths[:8], lite0.preprocess))
    assert np.abs(emb.features[:8] - ref).max() < 1e-3


@needs_openvino
def test_openvino_engine_on_real_photos(lite0, tmp_path):
    """The engine on OpenVINO, with decode threads and with a decode process: the features of eager
    on the pixels load_rgb gives (the same JPEG decoder everywhere), to fp32 precision."""
    paths = _real_photos(40)
    ref = rt.make_runner("eager", lite0.module, 224)(_pixels(paths, lite0.preprocess))
    for workers, decode in [(2, "threads"), (1, "processes")]:
        cfg = EngineConfig(workers=workers, decode=decode, block_rows=16, batch_size=16, runtime="openvino",
                           progress=False, runtime_dir=str(tmp_path))
        emb = embed_catalogue(_catalogue(paths), lite0, None, cfg)
        assert emb.ok.all() and not emb.problems
        assert np.abs(emb.features - ref).max() < 1e-4, decode


@pytest.mark.parametrize("runtime", ["eager", "onnx"])
def test_a_tta_backbone_of_pixel_views_runs_its_plain_network_once_per_view(tiny, tmp_path, runtime):
    """hflip mirrors the decoded pixels, so the engine runs the plain network's own graph twice and averages:
    the TTA module's features (bench_tta: Lite2@300 that way at 40.0 img/s against 23.4 for the graph with
    the view inside it). A view that is not exact on uint8 pixels (zoom interpolates) keeps the module."""
    from catalens.model.tta import with_tta

    paths = _real_photos(6)
    px = _pixels(paths, tiny.preprocess)
    cfg = EngineConfig(workers=0, runtime=runtime, progress=False, runtime_dir=str(tmp_path))
    tta = with_tta(tiny, ["hflip"])
    runner = engine_mod.engine_runner(tta, cfg, 1)
    assert runner.info["views"] == ["hflip"] and runner.name == runtime
    with torch.inference_mode():
        expected = tta.module(torch.from_numpy(px).permute(0, 3, 1, 2).float()).numpy()
    np.testing.assert_allclose(runner(px), expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    emb = embed_catalogue(_catalogue(paths), tta, None, cfg)
    np.testing.assert_allclose(emb.features, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    both = with_tta(tiny, ["hflip", "zoom"])
    zoom = engine_mod.engine_runner(both, cfg, 1)
    assert "views" not in zoom.info   # the module (exported to ONNX too: its crop size is a plain int when traced)
    with torch.inference_mode():
        expected = both.module(torch.from_numpy(px).permute(0, 3, 1, 2).float()).numpy()
    np.testing.assert_allclose(zoom(px), expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_empty_catalogue(tiny):
    assert list(stream_features(_catalogue([]), tiny, None, EngineConfig(runtime="eager", progress=False))) == []


def test_auto_checks_lossy_runtimes_against_fp32(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(rt, "cuda_available", lambda: False)  # the CPU choice, also on a GPU machine
    """bf16 is picked only after its features pass the cosine check against fp32; a failing
    check removes it from the race and says why."""
    _, entry = rt.choose_runtime(tiny.module, 160, threads=1, cache_dir=tmp_path, fingerprint="fp-a",
                                 candidates=["eager", "bf16"], budget_s=0.2)
    assert rt.LOSSY_MIN_COSINE["bf16"] <= entry["min_cosine_vs_fp32"]["bf16"] <= 1.0 and "bf16" not in entry["errors"]
    monkeypatch.setitem(rt.LOSSY_MIN_COSINE, "bf16", 1.5)       # an impossible bar
    runner, entry = rt.choose_runtime(tiny.module, 160, threads=1, cache_dir=tmp_path, fingerprint="fp-b",
                                      candidates=["eager", "bf16"], budget_s=0.2)
    assert runner.name == "eager" and set(entry["img_per_s"]) == {"eager"}
    assert entry["errors"]["bf16"].startswith("accuracy check failed: min feature cosine vs eager 0.9")


def test_streaming_malloc_is_set_on_glibc():
    """ONNX Runtime inference switches glibc to fixed thresholds (flat RSS while streaming)."""
    import platform

    from catalens.runtime import streaming_malloc

    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert streaming_malloc() is expected


@pytest.mark.parametrize("bf16_rate,picked", [(120.0, "eager"), (150.0, "bf16")])
def test_auto_needs_a_clear_win_to_pick_a_lossy_runtime(tiny, tmp_path, monkeypatch, bf16_rate, picked):
    monkeypatch.setattr(rt, "cuda_available", lambda: False)  # the CPU choice, also on a GPU machine
    """bf16 costs accuracy, so it must beat the exact runtime by LOSSY_MARGIN, not just AUTO_MARGIN."""
    rates = {"eager": 100.0, "bf16": bf16_rate}
    monkeypatch.setattr(rt, "measure_runner", lambda r, *a, **k: rates[r.name])
    runner, entry = rt.choose_runtime(tiny.module, 160, threads=1, cache_dir=tmp_path, fingerprint=f"fp-{picked}",
                                      candidates=["eager", "bf16"], budget_s=0.1)
    assert runner.name == entry["runtime"] == picked


# ------------------------------------------------------------------ lossy runtimes and the embedding cache

def test_runtime_precision_names_the_lossy_runtimes(tmp_path):
    assert {n: rt.runtime_precision(n) for n in ("eager", "onnx", "openvino", "compile", "cuda", "bf16", "cuda-bf16",
                                                 "openvino-int8", None)} == {
        "eager": "fp32", "onnx": "fp32", "openvino": "fp32", "compile": "fp32", "cuda": "fp32", "bf16": "bf16",
        "cuda-bf16": "bf16", "openvino-int8": "int8", None: "fp32"}
    assert rt.planned_precision("openvino-int8", "fp", 224, 2, tmp_path) == "int8"
    assert rt.planned_precision("auto", "fp", 224, 2, tmp_path) == "fp32"        # nothing remembered yet
    rt._remember("fp", 224, 2, tmp_path, {"runtime": "bf16"})
    assert rt.planned_precision("auto", "fp", 224, 2, tmp_path) == "bf16"        # auto's remembered choice
    assert rt.planned_precision("auto", "fp", 224, 1, tmp_path) == "fp32"        # another thread count: not known


def test_cache_folders_per_precision(tmp_path):
    fp32 = EmbeddingCache(tmp_path, "fp", 4, jpeg="pillow")
    assert fp32.precision == "fp32" and fp32.with_precision("fp32") is fp32 and fp32.dir == tmp_path / "fp"
    bf16 = fp32.with_precision("bf16")
    assert (bf16.dir, bf16.precision, bf16.decoder, bf16.dim) == (tmp_path / "fp+bf16", "bf16", "pillow", 4)
    fp32.add(["a"], np.ones((1, 4), np.float32))
    fp32.flush()
    assert "a" in EmbeddingCache(tmp_path, "fp", 4, jpeg="pillow") and "a" not in bf16.with_precision("int8")


def test_a_lossy_runtime_keeps_its_features_apart_in_the_cache(tiny, mixed, tmp_path):
    """A bf16 run neither reads the fp32 features nor hands its own to an fp32 run; it reads its own back."""
    cat, root, fp, dim = _catalogue(mixed), tmp_path / "cache", tiny.fingerprint(), tiny.feature_dim

    def run(runtime):
        cfg = EngineConfig(workers=0, block_rows=8, batch_size=5, runtime=runtime, progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # bf16 emulated on CPUs without native bf16
            return embed_catalogue(cat, tiny, EmbeddingCache(root, fp, dim), cfg)

    bf16 = run("bf16")
    base = EmbeddingCache(root, fp, dim).dir.name   # fp, or fp+simplejpeg where simplejpeg decodes
    assert [p.name for p in root.iterdir()] == [base + "+bf16"]   # the fp32 folder neither read nor created
    fp32 = run("eager")
    ok = fp32.ok
    assert ok.sum() == 22 and (bf16.ok == ok).all()
    rel = np.abs(bf16.features[ok] - fp32.features[ok]).max() / np.abs(fp32.features[ok]).max()
    assert rel > 1e-3, rel   # computed in bf16 (about 1% apart here), not read from the fp32 folder
    assert sorted(p.name for p in root.iterdir()) == [base, base + "+bf16"]
    assert len(EmbeddingCache(root, fp, dim)) == 22 and len(EmbeddingCache(root, fp, dim, precision="bf16")) == 22
    np.testing.assert_array_equal(run("bf16").features, bf16.features)   # read back from its own folder
    np.testing.assert_array_equal(run("eager").features, fp32.features)  # the fp32 features untouched


def test_a_first_auto_that_picks_a_lossy_runtime_writes_to_that_precision(tiny, mixed, tmp_path, monkeypatch):
    """Before its first measurement auto is taken as fp32 (rows already cached are read from there); when it
    picks bf16, the new features go to the bf16 folder, never to the fp32 one."""
    cat, root, fp, dim = _catalogue(mixed), tmp_path / "cache", tiny.fingerprint(), tiny.feature_dim
    cfg = EngineConfig(workers=0, block_rows=8, batch_size=5, runtime="auto", progress=False,
                       runtime_dir=str(tmp_path / "rt"))
    first = embed_catalogue(cat.subset(np.arange(10)), tiny, EmbeddingCache(root, fp, dim),
                            EngineConfig(**{**cfg.__dict__, "runtime": "eager"}))
    assert len(EmbeddingCache(root, fp, dim)) == 9   # rows 0-9, one of them empty
    monkeypatch.setattr(engine_mod, "engine_runner",
                        lambda *a, **k: rt.Runner("bf16", lambda b: np.full((len(b), dim), 7.0, np.float32)))
    out = embed_catalogue(cat, tiny, EmbeddingCache(root, fp, dim), cfg)
    assert (out.features[:10][first.ok] == first.features[first.ok]).all()   # cached fp32 rows, read
    assert (out.features[10:][out.ok[10:]] == 7.0).all()                       # new rows from the bf16 runner
    assert len(EmbeddingCache(root, fp, dim)) == 9                             # fp32 folder: nothing added
    assert len(EmbeddingCache(root, fp, dim, precision="bf16")) == 13   # the 22 good photos less those 9
