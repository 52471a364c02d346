"""ONNX export (parity with torch on decoded photos), int8 quantisation, MLflow pyfunc.

``shared_model`` trains one small model per test session (synthetic catalogue, ~20 s) and is
reused by test_serve.py and test_web_page.py.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from catalens.cli import main
from catalens.embed.runtimes import has_vnni
from catalens.export import quantize

SHARED = Path(os.environ.get("CATALENS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def real_photos(n: int = 8) -> list[Path]:
    """A few real photos (one per class first), or skip when the shared data is absent."""
    root = SHARED / "clothing-small" / "test"
    if not root.exists():
        pytest.skip(f"real photos not found at {root} (set CATALENS_SHARED_DATA)")
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    files = [sorted(c.glob("*.jpg"))[0] for c in classes]
    files += sorted(p for c in classes for p in sorted(c.glob("*.jpg"))[1:3])
    return files[:n]


def shared_model(tmp_path_factory) -> Path:
    """Train (once per session) a small model on a synthetic catalogue, exported to ONNX."""
    from catalens.config import load_config
    from catalens.export.onnx import export_onnx
    from catalens.synthetic import make_catalogue
    from catalens.train.pipeline import train

    base = tmp_path_factory.getbasetemp() / "catalens-serve-model"
    model = base / "model"
    if (model / "model.onnx").exists():
        return model
    data = make_catalogue(base / "data", n_products=150, size=128, seed=3)
    cfg = load_config(None, [{"engine": {"progress": False, "runtime": "eager"}, "head": {"epochs": 30}}])
    train(data, model, cfg, log=lambda *a: None)
    export_onnx(model, log=lambda *a: None)
    return model


@pytest.fixture(scope="session")
def serve_model(tmp_path_factory) -> Path:
    return shared_model(tmp_path_factory)


@pytest.fixture
def model_copy(serve_model, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(serve_model, dst)
    return dst


def torch_probs(model_dir: Path, pixels_hwc: np.ndarray) -> dict[str, np.ndarray]:
    import torch

    from catalens.model.single import CatalensModel
    from catalens.embed.runtimes import to_tensor

    with torch.inference_mode():
        return {k: v.numpy() for k, v in CatalensModel.load(model_dir).pixel_module()(to_tensor(pixels_hwc)).items()}


# ----------------------------------------------------------------------------- export

def test_export_is_self_describing_and_matches_torch_on_training_photos(serve_model):
    from catalens.model.single import CatalensModel
    from catalens.export.onnx import read_description

    info = json.loads((serve_model / "onnx.json").read_text())
    model = CatalensModel.load(serve_model)
    assert info["parity"]["ok"] is True
    assert info["parity"]["max_abs_diff"] < 1e-4
    assert info["parity"]["images"] == 16 and "decoded photos" in info["parity"]["source"]
    desc = info["description"]
    assert desc == read_description(serve_model / "model.onnx")  # also inside the graph
    assert desc["input"] == {**desc["input"], "name": "pixels", "dtype": "uint8", "layout": "NCHW",
                             "shape": ["n", 3, 224, 224]}
    assert [o["name"] for o in desc["outputs"]] == [t.name for t in model.tasks]
    for t, d in zip(model.tasks, desc["tasks"]):
        assert d["classes"] == t.classes and d["parent"] == t.parent and d["thresholds"] == t.thresholds
    assert desc["preprocess"] == model.preprocess.to_dict()
    assert desc["hierarchy"] == [["department", "category"]]
    assert desc["hierarchy_paths"] == model.meta["hierarchy_paths"]


def test_export_parity_on_real_photos_below_1e4(serve_model, tmp_path):
    from catalens.export.onnx import OnnxModel, export_onnx, image_files_pixels

    photos = real_photos(8)
    res = export_onnx(serve_model, tmp_path / "graph.onnx", parity_images=photos, log=lambda *a: None)
    assert res.path.exists() and res.sidecar == tmp_path / "graph.json"
    assert res.parity["images"] == 8 and res.parity["source"] == "given photos"
    assert res.parity["max_abs_diff"] < 1e-4, res.parity
    assert all(v == 1.0 for v in res.parity["top1_agreement"].values())
    stored = json.loads(res.sidecar.read_text())["parity"]
    assert stored["max_abs_diff"] == res.parity["max_abs_diff"]
    # independent check: torch vs ONNX Runtime on the same decoded photos, dynamic batch 1 and 8
    m = OnnxModel(res.path)
    px = image_files_pixels(photos, m.preprocess)
    ref = torch_probs(serve_model, px)
    for batch in (1, 8):
        got = m.run_hwc(px, batch_size=batch)
        for t in m.tasks:
            assert got[t.name].shape == (8, t.n_outputs)
            assert np.abs(got[t.name] - ref[t.name]).max() < 1e-4
    for t in m.tasks:
        if t.kind == "class":
            np.testing.assert_allclose(got[t.name].sum(1), 1.0, atol=1e-5)


def test_graph_takes_uint8_nchw_with_dynamic_batch(serve_model):
    import onnxruntime as ort

    s = ort.InferenceSession(str(serve_model / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = s.get_inputs()
    assert inp.name == "pixels" and inp.type == "tensor(uint8)"
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 224, 224]
    assert [o.name for o in s.get_outputs()] == ["department", "category", "pattern"]
    out = s.run(None, {"pixels": np.zeros((3, 3, 224, 224), np.uint8)})
    assert [o.shape for o in out] == [(3, 4), (3, 9), (3, 4)]


def test_ensure_onnx_exports_when_missing_and_again_when_model_changes(model_copy):
    from catalens.export.onnx import ensure_onnx, read_description

    (model_copy / "model.onnx").unlink()
    (model_copy / "onnx.json").unlink()
    logs = []
    path = ensure_onnx(model_copy, log=logs.append)
    assert path.exists() and "exporting it now" in logs[0]
    assert ensure_onnx(model_copy, log=logs.append) == path and len(logs) == 2  # up to date: no export
    meta = json.loads((model_copy / "model.json").read_text())
    pattern = next(t for t in meta["tasks"] if t["name"] == "pattern")
    pattern["thresholds"] = [0.11, 0.22, 0.33, 0.44]
    (model_copy / "model.json").write_text(json.dumps(meta))
    ensure_onnx(model_copy, log=logs.append)
    assert any("older model.json" in line for line in logs)
    desc = read_description(path)
    assert next(t for t in desc["tasks"] if t["name"] == "pattern")["thresholds"] == [0.11, 0.22, 0.33, 0.44]


def test_cli_export_out_file_and_errors(serve_model, tmp_path, capsys):
    out = tmp_path / "x" / "catalog.onnx"
    assert main(["export", str(serve_model), "--format", "onnx", "--out", str(out), "--parity-images", "4"]) == 0
    text = capsys.readouterr().err   # the CLI logs to stderr
    assert "parity with torch on 4 decoded photos" in text and "OK" in text
    assert out.exists() and (tmp_path / "x" / "catalog.json").exists()
    assert main(["export", str(tmp_path / "nope")]) == 2
    assert f"error: '{tmp_path / 'nope'}' does not exist; create a model with 'catalens train DATA --out " \
           f"{tmp_path / 'nope'}'" in capsys.readouterr().err


def test_cli_export_int8_measures_agreement_accuracy_and_speed(model_copy, capsys):
    from catalens.export.onnx import OnnxModel

    assert main(["export", str(model_copy), "--int8", "--calibration-images", "48", "--eval-limit", "60"]) == 0
    out = capsys.readouterr().err   # the CLI logs to stderr
    assert "int8 vs fp32" in out and "top-1 agreement" in out
    int8 = model_copy / "model.int8.onnx"
    assert int8.exists() and int8.stat().st_size < 0.5 * (model_copy / "model.onnx").stat().st_size
    report = json.loads((model_copy / "onnx.json").read_text())["int8"]
    assert report == json.loads((model_copy / "model.int8.json").read_text())["int8"]
    assert report["calibration_images"] == 48 and report["split"] == "test"
    # the session model is trained on ~100 drawn photos and has thin margins, so int8 flips more of
    # its top-1 answers than a real model does (clothing-small: ~94% agreement, see docs/serving.md)
    dep = report["tasks"]["department"]
    assert dep["top1_agreement"] >= 0.6, report
    assert 0.0 <= dep["accuracy_int8"] <= 1.0 and dep["labelled"] == report["images"] > 10
    assert dep["accuracy_drop"] == pytest.approx(dep["accuracy_fp32"] - dep["accuracy_int8"])
    assert dep["accuracy_int8"] >= 0.5
    assert report["tasks"]["pattern"]["decision_agreement"] >= 0.7
    assert report["throughput_fp32_ips"] > 0 and report["throughput_int8_ips"] > 0 and report["speedup"] > 0
    m = OnnxModel(int8)  # the quantised graph carries the same description, plus how it was quantised
    assert m.description["quantization"]["format"] == "QDQ"
    assert [t.name for t in m.tasks] == ["department", "category", "pattern"]


def test_cli_export_openvino_int8_calibrates_the_runtime_predict_runs(model_copy, tmp_path, monkeypatch, capsys):
    """`--runtime openvino-int8` refuses an uncalibrated model and names the command; `catalens export
    --openvino-int8` calibrates it, measures it, and predict then runs it, its features cached apart (+int8)."""
    import pandas as pd

    from catalens.embed.runtimes import openvino_available

    if not openvino_available():
        pytest.skip("openvino not installed")
    monkeypatch.setenv("CATALENS_CACHE", str(tmp_path / "runtime"))   # ONNX exports, int8 models
    data = Path(json.loads((model_copy / "model.json").read_text())["data"]).parent
    table = pd.read_csv(data / "products.csv", dtype=str)
    photos = [str(p) for i in table.loc[table["split"] == "test", "id"] for p in (data / "images").glob(f"{i}*.jpg")]
    assert len(photos) >= 20   # held-out photos: answers less sure than 1.0, so int8 moves them
    cache = tmp_path / "cache"

    def predict(runtime, out):
        return main(["predict", str(model_copy), *photos, "--out", str(out), "--runtime", runtime, "--cache-dir",
                     str(cache), "--no-progress"])

    assert predict("openvino-int8", tmp_path / "refused.csv") == 2
    assert "does not exist: run 'catalens export MODEL --openvino-int8'" in capsys.readouterr().err
    measured, real = [], quantize.runner_throughput

    def speed(runner, pixels, batch=32, seconds=3.0):   # each runtime really run; its speed set (this CPU's varies)
        measured.append((runner.name, pixels.shape, real(runner, pixels, seconds=0.05) > 0))
        return {"openvino": 100.0, "openvino-int8": 104.0}[runner.name]

    monkeypatch.setattr(quantize, "runner_throughput", speed)
    assert main(["export", str(model_copy), "--openvino-int8", "--calibration-images", "32", "--eval-limit", "40"]) == 0
    report = json.loads((model_copy / "onnx.json").read_text())["openvino_int8"]
    assert report["images"] == 22   # the session model's whole test split (fewer than --eval-limit)
    err = capsys.readouterr().err
    assert "openvino-int8 vs openvino fp32 on 22 photos (test):\n  department: top-1 agreement" in err
    size = (22, 224, 224, 3)   # the held-out photos, decoded for the model's Lite0 at 224 px
    assert measured == [("openvino", size, True), ("openvino-int8", size, True)]
    assert (report["throughput_fp32_ips"], report["throughput_int8_ips"], report["speedup"]) == (100.0, 104.0, 1.04)
    assert "backbone speed 100.0 -> 104.0 img/s (x1.04, batch 32)" in err
    assert quantize.slow_int8_message(1.04, report["overflow_fix"]) in err   # below INT8_WORTH: said so
    assert report["calibration_images"] == 32 and report["runtime"] == "openvino-int8"
    assert report["overflow_fix"] is (not has_vnni())   # 7-bit weights where int8 sums saturate (no VNNI)
    assert Path(report["file"]).exists() and Path(report["file"]).parent == tmp_path / "runtime" / "onnx"
    cat_ = report["tasks"]["category"]
    assert cat_["labelled"] == 22 and cat_["top1_agreement"] >= 0.6 and 1e-3 < cat_["max_abs_diff"] < 1, report
    assert predict("eager", tmp_path / "fp32.csv") == 0
    assert predict("openvino-int8", tmp_path / "int8.csv") == 0
    fp32, int8 = pd.read_csv(tmp_path / "fp32.csv"), pd.read_csv(tmp_path / "int8.csv")
    assert (fp32["path"] == int8["path"]).all() and int8["problem"].isna().all()
    assert (fp32["category_prob"] - int8["category_prob"]).abs().max() > 1e-4   # int8's own features
    fp32_dir, int8_dir = sorted(p.name for p in cache.iterdir())
    assert int8_dir == fp32_dir + "+int8"   # int8 features cached apart from the fp32 ones
    # catalens evaluate through the runtime: the test photos' int8 answers, and its report says so
    assert main(["evaluate", str(model_copy), str(data / "dataset.yaml"), "--report", str(tmp_path / "ev"),
                 "--runtime", "openvino-int8", "--cache-dir", str(cache), "--no-progress"]) == 0
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert ev["context"]["runtime"] == ("openvino-int8 (int8 features: answers can differ from fp32's; catalens "
                                        "export --openvino-int8 measures by how much)")
    assert ev["category"]["n"] == 22 and ev["category"]["accuracy"] == pytest.approx(cat_["accuracy_int8"], abs=0.05)


def test_compare_counts_the_answers_the_decoder_gives():
    """With ``decode`` (the model's hierarchy decoding) agreement and accuracy count the decided answers;
    the other class tasks their argmax."""
    from catalens.export.quantize import compare
    from catalens.tasks import TaskInfo

    tasks = [TaskInfo("sub", "class", ["a", "b"]), TaskInfo("art", "class", ["x", "y", "z"])]

    class Fixed:
        def __init__(self, sub, art):
            self.tasks, self.out = tasks, {"sub": np.array(sub, np.float32), "art": np.array(art, np.float32)}

        def run_hwc(self, pixels):
            return self.out

    fp32 = Fixed([[0.9, 0.1], [0.4, 0.6]], [[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    int8 = Fixed([[0.8, 0.2], [0.6, 0.4]], [[0.3, 0.5, 0.2], [0.1, 0.2, 0.7]])
    labels = {"sub": np.array([0, 1]), "art": np.array([1, 2])}
    px = np.zeros((2, 4, 4, 3), np.uint8)
    plain = compare(fp32, int8, px, labels)["tasks"]
    assert (plain["sub"]["top1_agreement"], plain["art"]["top1_agreement"]) == (0.5, 0.5)
    assert (plain["art"]["accuracy_fp32"], plain["art"]["accuracy_int8"]) == (0.5, 1.0)
    decided = compare(fp32, int8, px, labels, decode=lambda p: {"art": np.array([1, 2])})["tasks"]   # decoder: y, z
    assert decided["art"]["top1_agreement"] == 1.0 and decided["art"]["accuracy_fp32"] == 1.0
    assert decided["sub"] == plain["sub"]   # not decided by the decoder: argmax
    assert decided["art"]["max_abs_diff"] == pytest.approx(0.2)


def test_int8_without_calibration_data_says_what_to_do(model_copy, tmp_path):
    from catalens.export.quantize import quantize_int8

    meta = json.loads((model_copy / "model.json").read_text())
    meta["data"] = str(tmp_path / "gone.yaml")
    (model_copy / "model.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="--calibration DATA"):
        quantize_int8(model_copy, log=lambda *a: None)


# ----------------------------------------------------------------------------- MLflow pyfunc

@pytest.fixture(scope="module")
def logged(serve_model, tmp_path_factory):
    """The session model logged as a pyfunc in a sqlite-backed tracking store under tmp."""
    mlflow = pytest.importorskip("mlflow")
    from catalens.track_pyfunc import log_pyfunc

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    old = {k: os.environ.get(k) for k in ("MLFLOW_ALLOW_FILE_STORE", "MLFLOW_TRACKING_URI")}
    os.environ.update(MLFLOW_ALLOW_FILE_STORE="true", MLFLOW_TRACKING_URI=uri)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        mlflow.set_tracking_uri(uri)
        exp = mlflow.create_experiment("catalens-test", artifact_location=(root / "artifacts").as_uri())
        mlflow.set_experiment(experiment_id=exp)
        info = log_pyfunc(serve_model)
        yield mlflow, uri, info.model_uri, root
    finally:
        os.chdir(cwd)
        mlflow.set_tracking_uri(None)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _pyfunc_input(serve_model):
    import base64

    import pandas as pd

    images = sorted((serve_model.parent / "data" / "images").glob("*.jpg"))[:3]
    raw = [p.read_bytes() for p in images]
    return raw, pd.DataFrame({"image": [base64.b64encode(raw[0]).decode(), raw[1], base64.b64encode(raw[2]).decode(),
                                        base64.b64encode(b"not a photo").decode()]})


def test_mlflow_pyfunc_round_trip(serve_model, logged):
    import pandas as pd

    from catalens.export.onnx import OnnxModel

    mlflow, uri, model_uri, _ = logged
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pyfunc.load_model(model_uri)
    raw, df = _pyfunc_input(serve_model)
    out = loaded.predict(df)
    assert len(out) == 4
    onnx = OnnxModel(serve_model / "model.onnx")
    ref = onnx.predict_bytes(raw)
    dep = next(t for t in onnx.tasks if t.name == "department")
    pattern = next(t for t in onnx.tasks if t.name == "pattern")
    for i in range(3):
        assert out["problem"][i] == ""
        assert out["department"][i] == dep.classes[int(ref["department"][i].argmax())]
        assert abs(out["department_prob"][i] - float(ref["department"][i].max())) < 1e-5
        assert abs(out["pattern_solid_prob"][i] - float(ref["pattern"][i][3])) < 1e-5
        on = [c for c, p, h in zip(pattern.classes, ref["pattern"][i], pattern.threshold_array()) if p >= h]
        assert out["pattern_tags"][i] == ",".join(on)
    assert out["problem"][3].startswith("not_an_image") and pd.isna(out["department"][3])


def test_mlflow_models_serve_answers_invocations(serve_model, logged, tmp_path):
    import base64
    import signal
    import subprocess
    import time

    import httpx

    from catalens.export.onnx import OnnxModel

    _, uri, model_uri, root = logged
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    if not mlflow_cli.exists():
        pytest.skip("mlflow command not installed next to this python")
    sys.path.insert(0, str(Path(__file__).parent))
    from test_serve import free_port

    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, MLFLOW_ALLOW_FILE_STORE="true", HF_HUB_OFFLINE="1",
               PATH=f"{mlflow_cli.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.Popen([str(mlflow_cli), "models", "serve", "-m", model_uri, "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port)], env=env, cwd=root, start_new_session=True,
                            stdout=open(tmp_path / "mlflow.log", "wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "mlflow.log").read_text()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "mlflow models serve not up in 180 s"
            time.sleep(0.5)
        raw = (serve_model.parent / "data" / "images" / "00001.jpg").read_bytes()
        r = httpx.post(f"http://127.0.0.1:{port}/invocations", timeout=60, json={
            "dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(raw).decode()]]}})
        assert r.status_code == 200, r.text
        (pred,) = r.json()["predictions"]
        onnx = OnnxModel(serve_model / "model.onnx")
        ref = onnx.predict_bytes([raw])
        cat = next(t for t in onnx.tasks if t.name == "category")
        assert pred["category"] == cat.classes[int(ref["category"][0].argmax())]
        assert abs(pred["category_prob"] - float(ref["category"][0].max())) < 1e-5
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # mlflow runs uvicorn as a child in this (new) session
            proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_slow_int8_message_says_why_and_what_instead():
    assert quantize.slow_int8_message(0.95, overflow_fix=True) == (
        "openvino-int8 runs x0.95 the speed of openvino fp32 on this CPU (this CPU has no VNNI: int8 products are "
        "summed in saturating 16-bit lanes, so the weights keep 7 bits and int8 saves little); its answers move "
        "without a gain here: keep --runtime auto (or openvino) on this machine")
    assert quantize.slow_int8_message(1.04, overflow_fix=False) == (
        "openvino-int8 runs x1.04 the speed of openvino fp32 on this CPU; its answers move without a gain here: "
        "keep --runtime auto (or openvino) on this machine")
