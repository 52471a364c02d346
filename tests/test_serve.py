"""The HTTP server, end to end: a real uvicorn process on 127.0.0.1, called with httpx.

Predictions over HTTP must equal in-process ONNX Runtime predictions for the same photo; every
kind of bad input must get its 4xx status and error code, and leave the server healthy.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_export import real_photos, shared_model

from catalens.serve.metrics import parse_exposition


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model: Path, *args: str, log: Path | None = None, ready_timeout: float = 180.0):
    """``catalens serve MODEL`` in a subprocess on a free loopback port; always stopped."""
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", CATALENS_NO_MALLOC_TUNING="1", PYTHONUNBUFFERED="1")
    out = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "catalens", "serve", str(model), "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "warning", *args], env=env, stdout=out,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}" +
                                   (f": {Path(log).read_text()[-2000:]}" if log else ""))
            try:
                if httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("server not ready in time")
            time.sleep(0.3)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log:
            out.close()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return shared_model(tmp_path_factory)


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with running_server(model, "--max-upload-mb", "1", "--max-images", "8", "--max-wait-ms", "20",
                        "--max-batch", "16", log=log) as (url, proc):
        yield url


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def onnx_model(model):
    from catalens.export.onnx import OnnxModel

    return OnnxModel(model / "model.onnx", threads=1, backend="auto")  # as the server runs it


@pytest.fixture(scope="module")
def photos(model) -> list[bytes]:
    """Real photos when the shared data is there, else photos of the synthetic catalogue."""
    try:
        files = real_photos(4)
    except pytest.skip.Exception:
        files = sorted((model.parent / "data" / "images").glob("*.jpg"))[:4]
    return [f.read_bytes() for f in files]


def expected(onnx_model, data: bytes) -> dict[str, np.ndarray]:
    return {k: v[0] for k, v in onnx_model.predict_bytes([data]).items()}


def err(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
    return body["error"]


def metrics(client) -> dict:
    return parse_exposition(client.get("/metrics").text)


def metric(m: dict, name: str, **labels) -> float:
    return m.get((name, frozenset(labels.items())), 0.0)


# ----------------------------------------------------------------------------- /v1/predict

def test_predict_multipart_equals_in_process_onnx(client, onnx_model, photos):
    r = client.post("/v1/predict", files={"file": ("photo.jpg", photos[0], "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "model" and len(body["images"]) == 1
    img = body["images"][0]
    assert img["file"] == "photo.jpg" and img["index"] == 0
    ref = expected(onnx_model, photos[0])
    tasks = {t.name: t for t in onnx_model.tasks}
    for name in ("department", "category"):
        t = tasks[name]
        top = img["classes"][name]
        assert len(top) == min(5, t.n_outputs)
        order = np.argsort(-ref[name], kind="stable")[:len(top)]
        assert [c["label"] for c in top] == [t.classes[j] for j in order]
        np.testing.assert_allclose([c["prob"] for c in top], ref[name][order], atol=1e-5)
    thr = tasks["pattern"].threshold_array()
    got = img["tags"]["pattern"]
    assert [g["tag"] for g in got] == tasks["pattern"].classes
    np.testing.assert_allclose([g["prob"] for g in got], ref["pattern"], atol=1e-5)
    np.testing.assert_allclose([g["threshold"] for g in got], thr, atol=1e-6)
    assert [g["present"] for g in got] == [bool(p >= h) for p, h in zip(ref["pattern"], thr)]
    (h,) = img["hierarchy"]
    assert h["levels"] == ["department", "category"]
    assert h["path"] == [tasks["department"].classes[int(ref["department"].argmax())],
                         tasks["category"].classes[int(ref["category"].argmax())]]
    assert isinstance(h["known"], bool)
    tm = img["timings"]
    assert tm["decode_ms"] > 0 and tm["inference_ms"] > 0 and tm["total_ms"] >= tm["inference_ms"]
    assert tm["batch_size"] >= 1


def test_predict_several_files_raw_body_and_top_k(client, onnx_model, photos):
    files = [("file", (f"p{i}.jpg", p, "image/jpeg")) for i, p in enumerate(photos[:3])]
    r = client.post("/v1/predict", files=files, data={"top_k": "2"})
    assert r.status_code == 200, r.text
    imgs = r.json()["images"]
    assert [i["file"] for i in imgs] == ["p0.jpg", "p1.jpg", "p2.jpg"]
    for img, p in zip(imgs, photos[:3]):
        assert len(img["classes"]["category"]) == 2
        ref = expected(onnx_model, p)
        assert abs(img["classes"]["category"][0]["prob"] - float(ref["category"].max())) < 1e-5
    raw = client.post("/v1/predict?top_k=1", content=photos[1], headers={"content-type": "image/jpeg"})
    assert raw.status_code == 200
    (img,) = raw.json()["images"]
    assert img["file"] == "body" and len(img["classes"]["department"]) == 1
    assert img["classes"]["category"][0] == imgs[1]["classes"]["category"][0] or \
        abs(img["classes"]["category"][0]["prob"] - imgs[1]["classes"]["category"][0]["prob"]) < 1e-5


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def bad_requests(photo: bytes) -> list[tuple[str, dict, int, str]]:
    """(label, httpx request kwargs, status, error code) for every kind of bad input."""
    b64 = base64.b64encode(photo).decode()
    big = b"\xff\xd8" + os.urandom(2 * 2**20)
    return [
        ("empty body", dict(method="POST", url="/v1/predict"), 400, "empty_body"),
        ("empty raw image", dict(method="POST", url="/v1/predict", content=b"",
                                 headers={"content-type": "image/jpeg"}), 400, "empty_body"),
        ("empty file part", dict(method="POST", url="/v1/predict", files={"file": ("e.jpg", b"", "image/jpeg")}),
         422, "empty"),
        ("not an image", dict(method="POST", url="/v1/predict",
                              files={"file": ("notes.jpg", b"hello, this is text", "image/jpeg")}), 422, "not_an_image"),
        ("truncated jpeg", dict(method="POST", url="/v1/predict",
                                files={"file": ("t.jpg", photo[: len(photo) // 3], "image/jpeg")}), 422, "truncated"),
        ("decompression bomb", dict(method="POST", url="/v1/predict", content=_png_claiming(30000, 30000),
                                    headers={"content-type": "image/png"}), 422, "decompression_bomb"),
        ("wrong content type", dict(method="POST", url="/v1/predict", content=b"x=1",
                                    headers={"content-type": "text/plain"}), 415, "unsupported_media_type"),
        ("json to /v1/predict", dict(method="POST", url="/v1/predict", json={"instances": []}), 415,
         "unsupported_media_type"),
        ("multipart without boundary", dict(method="POST", url="/v1/predict", content=b"--x\r\n",
                                            headers={"content-type": "multipart/form-data"}), 400, "bad_multipart"),
        ("multipart without files", dict(method="POST", url="/v1/predict", files={"note": (None, "hi")}), 400,
         "no_images"),
        ("too many images", dict(method="POST", url="/v1/predict",
                                 files=[("file", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(9)]), 413,
         "too_many_images"),
        ("huge upload", dict(method="POST", url="/v1/predict", content=big,
                             headers={"content-type": "image/jpeg"}), 413, "too_large"),
        ("huge chunked upload", dict(method="POST", url="/v1/predict",
                                     content=(big[i:i + 65536] for i in range(0, len(big), 65536)),
                                     headers={"content-type": "image/jpeg"}), 413, "too_large"),
        ("bad top_k", dict(method="POST", url="/v1/predict?top_k=0", content=photo,
                           headers={"content-type": "image/jpeg"}), 400, "bad_parameter"),
        ("unknown model tf", dict(method="POST", url="/v1/models/nope:predict", json={"instances": [{"b64": b64}]}),
         404, "model_not_found"),
        ("unknown model kserve", dict(method="POST", url="/v2/models/nope/infer", json={}), 404, "model_not_found"),
        ("unknown model metadata", dict(method="GET", url="/v2/models/nope"), 404, "model_not_found"),
        ("malformed json", dict(method="POST", url="/v1/models/model:predict", content=b"{\"instances\": [",
                                headers={"content-type": "application/json"}), 400, "bad_json"),
        ("bad base64", dict(method="POST", url="/v1/models/model:predict", json={"instances": [{"b64": "@@@!"}]}),
         400, "bad_base64"),
        ("wrong json shape", dict(method="POST", url="/v1/models/model:predict", json={"images": [b64]}), 400,
         "bad_request"),
        ("url instead of bytes", dict(method="POST", url="/v1/models/model:predict",
                                      json={"instances": [{"b64": "http://example.com/a.jpg"}]}), 400,
         "url_not_supported"),
        ("tf non-image", dict(method="POST", url="/v1/models/model:predict",
                              json={"instances": [{"b64": base64.b64encode(b"GIF89a nope").decode()}]}), 422,
         "not_an_image"),
        ("kserve wrong datatype", dict(method="POST", url="/v2/models/model/infer", json={"inputs": [
            {"name": "image", "shape": [1], "datatype": "FP32", "data": [1.0]}]}), 400, "bad_request"),
        ("kserve shape mismatch", dict(method="POST", url="/v2/models/model/infer", json={"inputs": [
            {"name": "image", "shape": [2], "datatype": "BYTES", "data": [b64]}]}), 400, "bad_request"),
        ("kserve bad base64", dict(method="POST", url="/v2/models/model/infer", json={"inputs": [
            {"name": "image", "shape": [1], "datatype": "BYTES", "data": ["***"]}]}), 400, "bad_base64"),
        ("kserve unknown output", dict(method="POST", url="/v2/models/model/infer", json={
            "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}],
            "outputs": [{"name": "colour"}]}), 400, "bad_request"),
        ("unknown route", dict(method="GET", url="/v1/nothing"), 404, "not_found"),
        ("wrong method", dict(method="GET", url="/v1/predict"), 405, "method_not_allowed"),
    ]


def test_every_bad_input_gets_its_4xx_code_and_message(server, photos):
    for label, kw, status, code in bad_requests(photos[0]):
        with httpx.Client(base_url=server, timeout=60) as c:  # a fresh connection: 413 closes it
            r = c.request(**kw)
        assert r.status_code == status, (label, r.status_code, r.text[:300])
        e = err(r)
        assert e["code"] == code, (label, e)
        assert len(e["message"]) > 15, (label, e)
    with httpx.Client(base_url=server, timeout=60) as c:  # and the server is fine afterwards
        assert c.get("/v2/health/ready").json() == {"ready": True}
        r = c.post("/v1/predict", files={"file": ("ok.jpg", photos[0], "image/jpeg")})
        assert r.status_code == 200 and r.json()["images"][0]["classes"]


def test_error_messages_say_what_was_wrong(client, photos):
    r = client.post("/v1/predict", files={"file": ("t.jpg", photos[0][: len(photos[0]) // 3], "image/jpeg")})
    e = err(r)
    assert e["file"] == "t.jpg" and e["index"] == 0 and "truncated" in e["message"]
    r = client.post("/v1/predict", content=b"abc", headers={"content-type": "text/csv"})
    assert "multipart/form-data" in err(r)["message"]
    with httpx.Client(base_url=client.base_url, timeout=60) as c:
        e = err(c.post("/v1/predict", content=b"\0" * (2 * 2**20), headers={"content-type": "image/png"}))
    assert "--max-upload-mb" in e["message"] and e["limit_bytes"] == 2**20
    r = client.post("/v2/models/other/infer", json={})
    assert "'model'" in err(r)["message"]


# ----------------------------------------------------------------------------- TF-Serving and KServe

def test_tf_serving_predict_shapes_and_values(client, onnx_model, photos):
    b64 = [base64.b64encode(p).decode() for p in photos[:2]]
    r = client.post("/v1/models/model:predict", json={"instances": [{"b64": b64[0]}, {"image_bytes": {"b64": b64[1]}}]})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 2
    for pred, p in zip(preds, photos[:2]):
        ref = expected(onnx_model, p)
        classes = [t for t in onnx_model.tasks if t.kind == "class"]
        assert set(pred) == {t.name for t in onnx_model.tasks} | {f"{t.name}_label" for t in classes} | \
            {f"{t.name}_accept" for t in classes} | {"unknown_score", "unknown"}  # no title model: no conflict
        for t in onnx_model.tasks:
            assert len(pred[t.name]) == t.n_outputs
            np.testing.assert_allclose(pred[t.name], ref[t.name], atol=1e-5)
        for t in classes:  # the decided label (no hierarchy decoding in this model: the argmax)
            assert pred[f"{t.name}_label"] == t.classes[int(np.argmax(ref[t.name]))]
    col = client.post("/v1/models/model:predict", json={"inputs": {"image": [{"b64": b64[0]}]}})
    assert col.status_code == 200
    outs = col.json()["outputs"]
    np.testing.assert_allclose(outs["category"][0], preds[0]["category"], atol=1e-5)
    status = client.get("/v1/models/model").json()
    assert status["model_version_status"][0]["state"] == "AVAILABLE"
    meta = client.get("/v1/models/model/metadata").json()
    assert meta["metadata"]["catalens"]["tasks"][1]["classes"] == onnx_model.tasks[1].classes


def test_kserve_v2_infer_json_and_binary(client, onnx_model, photos):
    b64 = [base64.b64encode(p).decode() for p in photos[:2]]
    req = {"id": "req-7", "inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": b64}]}
    r = client.post("/v2/models/model/infer", json=req)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "model" and body["id"] == "req-7" and body["model_version"] == "1"
    outs = {o["name"]: o for o in body["outputs"]}
    names = [n for t in onnx_model.tasks for n in ([t.name, f"{t.name}_label"] if t.kind == "class" else [t.name])]
    names += [f"{t.name}_accept" for t in onnx_model.tasks if t.kind == "class"] + ["unknown_score", "unknown"]
    assert list(outs) == names
    assert outs["unknown"]["datatype"] == "BOOL" and outs["unknown_score"]["shape"] == [2]
    refs = [expected(onnx_model, p) for p in photos[:2]]
    for t in (t for t in onnx_model.tasks if t.kind == "class"):
        o = outs[f"{t.name}_label"]
        assert o["datatype"] == "BYTES" and o["shape"] == [2]
        assert o["data"] == [t.classes[int(np.argmax(ref[t.name]))] for ref in refs]
    for t in onnx_model.tasks:
        o = outs[t.name]
        assert o["datatype"] == "FP32" and o["shape"] == [2, t.n_outputs]
        got = np.asarray(o["data"], dtype=np.float32).reshape(o["shape"])
        np.testing.assert_allclose(got, np.stack([ref[t.name] for ref in refs]), atol=1e-5)
    # binary tensor extension: JSON header, then each BYTES element as 4-byte length + raw bytes
    blob = b"".join(struct.pack("<I", len(p)) + p for p in photos[:2])
    header = json.dumps({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(blob)}}],
                         "outputs": [{"name": "category"}]}).encode()
    rb = client.post("/v2/models/model/infer", content=header + blob,
                     headers={"content-type": "application/octet-stream",
                              "inference-header-content-length": str(len(header))})
    assert rb.status_code == 200, rb.text
    (o,) = rb.json()["outputs"]
    assert o["name"] == "category"
    np.testing.assert_allclose(o["data"], outs["category"]["data"], atol=1e-5)
    meta = client.get("/v2/models/model").json()
    assert meta["name"] == "model" and meta["inputs"][0]["datatype"] == "BYTES"
    assert [o["name"] for o in meta["outputs"]] == names
    assert meta["outputs"][2]["shape"] == [-1, onnx_model.tasks[1].n_outputs]
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2/models/model/ready").json()["ready"] is True


def test_openapi_docs_and_web_page_are_served(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/models/{name}:predict", "/v2/models/{name}/infer", "/metrics"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    page = client.get("/").text
    assert '"name": "model"' in page and "<script" in page
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page  # no external assets


# ----------------------------------------------------------------------------- metrics and batching

def test_metrics_count_requests_errors_and_latency(client, photos):
    before = metrics(client)
    for _ in range(3):
        assert client.post("/v1/predict", files={"file": ("a.jpg", photos[0], "image/jpeg")}).status_code == 200
    assert client.post("/v1/predict", files={"file": ("b.jpg", b"nope", "image/jpeg")}).status_code == 422
    after = metrics(client)
    route = "/v1/predict"
    assert metric(after, "catalens_requests_total", route=route, method="POST", status="200") - \
        metric(before, "catalens_requests_total", route=route, method="POST", status="200") == 3
    assert metric(after, "catalens_requests_total", route=route, method="POST", status="422") - \
        metric(before, "catalens_requests_total", route=route, method="POST", status="422") == 1
    assert metric(after, "catalens_errors_total", code="not_an_image") - \
        metric(before, "catalens_errors_total", code="not_an_image") == 1
    assert metric(after, "catalens_request_duration_seconds_count", route=route) - \
        metric(before, "catalens_request_duration_seconds_count", route=route) == 4
    assert metric(after, "catalens_images_total") - metric(before, "catalens_images_total") == 3
    assert metric(after, "catalens_ready") == 1
    text = client.get("/metrics").text
    assert "# TYPE catalens_batch_size histogram" in text and 'le="+Inf"' in text


def test_concurrent_requests_are_micro_batched(server, photos):
    async def fire(n: int):
        async with httpx.AsyncClient(base_url=server, timeout=60) as c:
            return await asyncio.gather(*(c.post("/v1/predict", files={"file": (f"{i}.jpg", photos[i % len(photos)],
                                                                              "image/jpeg")}) for i in range(n)))

    with httpx.Client(base_url=server, timeout=60) as c:
        before = metrics(c)
        responses = asyncio.run(fire(8))
        after = metrics(c)
    assert all(r.status_code == 200 for r in responses)
    sizes = [r.json()["images"][0]["timings"]["batch_size"] for r in responses]
    batches = metric(after, "catalens_batch_size_count") - metric(before, "catalens_batch_size_count")
    singles = metric(after, "catalens_batch_size_bucket", le="1.0") - metric(before, "catalens_batch_size_bucket", le="1.0")
    assert batches < 8 and batches - singles >= 1, (sizes, batches, singles)  # at least one batch of > 1 image
    assert max(sizes) > 1
    assert metric(after, "catalens_images_total") - metric(before, "catalens_images_total") == 8


# ----------------------------------------------------------------------------- life cycle

def test_exports_on_first_serve_and_shuts_down_gracefully(model, tmp_path, photos):
    import shutil

    folder = tmp_path / "fresh-model"
    shutil.copytree(model, folder, ignore=shutil.ignore_patterns("model.onnx", "onnx.json", "*.int8.*"))
    with running_server(folder, "--name", "shop", log=tmp_path / "log.txt") as (url, proc):
        assert (folder / "model.onnx").exists() and json.loads((folder / "onnx.json").read_text())["parity"]["ok"]
        assert httpx.get(url + "/v2/models/shop", timeout=10).status_code == 200
        result = {}

        def slow_request():  # 8 photos in one request: in flight while SIGTERM arrives
            files = [("file", (f"{i}.jpg", photos[i % len(photos)], "image/jpeg")) for i in range(8)]
            result["r"] = httpx.post(url + "/v1/predict", files=files, timeout=60)

        t = threading.Thread(target=slow_request)
        t.start()
        time.sleep(0.15)
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert proc.wait(60) == 0
    r = result["r"]
    assert r.status_code == 200 and len(r.json()["images"]) == 8
    assert r.json()["model"] == "shop"
