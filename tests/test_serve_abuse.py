"""Hostile and unlucky clients against a real ``catalens serve`` process (issue 13, server items).

Decode bombs below the pixel limit (a 16-bit PNG of 9400 x 9400 px in 190 KB), deeply nested JSON,
junk KServe fields, slow clients (half a head, half a body, nothing at all), huge request lines and
heads, overload (load shedding with 503 + Retry-After), too many connections, HEAD health checks,
the offline API docs, safe JSON in the web page, and metrics summed over ``--workers 2``.
Every answer is checked for its exact status, error code and message.
"""
from __future__ import annotations

import asyncio
import collections
import io
import json
import os
import re
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_serve import err, expected, metric, metrics, running_server

from catalens.serve.app import DecodeCost, decode_cost, script_json

LIMITS = ("--max-decode-mb", "2", "--max-queue", "4", "--max-images", "4", "--max-batch", "4",
          "--head-timeout", "1", "--body-timeout", "1", "--max-upload-mb", "1", "--max-inflight-mb", "1")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from test_export import shared_model

    return shared_model(tmp_path_factory)


@pytest.fixture(scope="module")
def guarded(model, tmp_path_factory):
    """A server with small limits: 2 MiB decode budget, queue of 4 images, 1 s head and body timeouts,
    1 MiB uploads and 1 MiB of request bodies in memory at once."""
    log = tmp_path_factory.mktemp("serve-abuse") / "server.log"
    with running_server(model, *LIMITS, log=log) as (url, _):
        yield url


@pytest.fixture(scope="module")
def photos(model) -> list[bytes]:
    return [f.read_bytes() for f in sorted((model.parent / "data" / "images").glob("*.jpg"))[:4]]


@pytest.fixture(scope="module")
def onnx_model(model):
    from catalens.export.onnx import OnnxModel

    return OnnxModel(model / "model.onnx", threads=1)


def png16(width: int, height: int, value: int = 1000) -> bytes:
    """A 16-bit grayscale PNG (mode I;16): flat, so it compresses to almost nothing."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((height, width), value, dtype=np.uint16)).save(buf, "PNG")
    return buf.getvalue()


def raw_exchange(url: str, data: bytes, wait: float = 6.0) -> tuple[bytes, float]:
    """Send ``data`` on a fresh TCP connection, read until the server closes it: (answer, seconds)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        t0 = time.perf_counter()
        if data:
            s.sendall(data)
        return read_to_end(s), time.perf_counter() - t0


def read_to_end(s: socket.socket) -> bytes:
    """Everything until the server closes the connection (socket.timeout, a failure, if it never does)."""
    out = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return out
        out += chunk


def answer(raw: bytes) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of a raw HTTP/1.1 answer."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


# ----------------------------------------------------------------------------- 1. decode cost

def test_decode_cost_reads_the_header_only_and_counts_peak_bytes_per_pixel():
    from PIL import Image

    big = png16(9400, 9400)
    assert len(big) < 400_000
    t0 = time.perf_counter()
    c = decode_cost(big, 256, 10**9)
    assert time.perf_counter() - t0 < 0.5
    assert c == DecodeCost(9400, 9400, "I;16", 25, "PNG") and c.bytes == 9400 * 9400 * 25   # via float64
    buf = io.BytesIO()
    Image.new("RGB", (4000, 3000), (200, 10, 10)).save(buf, "JPEG")
    # a JPEG is measured after the decoder's 1/8 downscaling that load_rgb asks for (short side >= 256)
    assert decode_cost(buf.getvalue(), 256, 10**9) == DecodeCost(500, 375, "RGB", 6, "JPEG")
    # a progressive JPEG holds all its DCT coefficients (2 bytes each; 4:2:0 chroma: 1.5 per pixel)
    buf = io.BytesIO()
    Image.new("RGB", (4000, 3000), (200, 10, 10)).save(buf, "JPEG", progressive=True, quality=80)
    assert decode_cost(buf.getvalue(), 256, 10**9) == DecodeCost(4000, 3000, "RGB", 3.0, "progressive JPEG")
    buf = io.BytesIO()
    Image.new("RGBA", (300, 200)).save(buf, "PNG")
    assert decode_cost(buf.getvalue(), 256, 10**9).bytes == 300 * 200 * 20      # alpha composited on white


def test_16bit_png_over_the_decode_budget_is_refused_fast_before_decoding(guarded, photos, onnx_model):
    big = png16(9400, 9400)
    with httpx.Client(base_url=guarded, timeout=30) as c:
        t0 = time.perf_counter()
        r = c.post("/v1/predict", content=big, headers={"content-type": "image/png"})
        seconds = time.perf_counter() - t0
        assert r.status_code == 413, r.text
        assert err(r) == {"code": "decode_too_large", "index": 0, "file": "body", "limit_bytes": 2 * 2**20,
                          "message": "body: a 9400x9400 PNG (I;16, 25 bytes per pixel while decoding) needs "
                                     "2,106.7 MiB to decode, over the limit of 2 MiB per image (server option "
                                     "--max-decode-mb); send it downscaled to at most 289x289 px or as an 8-bit JPEG"}
        assert seconds < 1.0, seconds
    with httpx.Client(base_url=guarded, timeout=30) as c:   # 413 closes the connection
        files = [("file", (f"b{i}.png", big, "image/png")) for i in range(3)] + \
                [("file", ("ok.jpg", photos[0], "image/jpeg"))]
        t0 = time.perf_counter()
        r = c.post("/v1/predict", files=files)
        assert r.status_code == 413 and err(r)["file"] == "b0.png" and time.perf_counter() - t0 < 1.0
    small = png16(250, 200, 30000)          # 1.2 MiB to decode: within the budget, and answered right
    with httpx.Client(base_url=guarded, timeout=30) as c:
        r = c.post("/v1/predict?top_k=1", content=small, headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        ref = expected(onnx_model, small)
        top = r.json()["images"][0]["classes"]["category"][0]
        assert abs(top["prob"] - float(ref["category"].max())) < 1e-5
        assert c.post("/v1/predict", content=photos[0], headers={"content-type": "image/jpeg"}).status_code == 200


# ----------------------------------------------------------------------------- 2. bodies: pydantic models

def kserve_cases() -> list[tuple[str, dict | bytes, str, str]]:
    ok = {"name": "image", "shape": [1], "datatype": "BYTES", "data": ["AAAA"]}
    deep = b"[" * 100_000 + b"]" * 100_000
    return [
        ("tf nested 100000", b'{"instances": ' + deep + b"}", "/v1/models/model:predict", "bad_json"),
        ("kserve nested 100000", deep, "/v2/models/model/infer", "bad_json"),
        ("outputs number", {"inputs": [ok], "outputs": 5}, "/v2/models/model/infer",
         "the v2 infer request: outputs: Input should be a valid array"),
        ("parameters number", {"inputs": [ok], "parameters": 5}, "/v2/models/model/infer",
         "the v2 infer request: parameters: Input should be an object"),
        ("input parameters list", {"inputs": [dict(ok, parameters=[1, 2])]}, "/v2/models/model/infer",
         "the v2 infer request: inputs.0.parameters: Input should be an object"),
        ("input parameters number", {"inputs": [dict(ok, parameters=3)]}, "/v2/models/model/infer",
         "the v2 infer request: inputs.0.parameters: Input should be an object"),
        ("shape [true]", {"inputs": [dict(ok, shape=[True])]}, "/v2/models/model/infer",
         "the v2 infer request: inputs.0.shape.0: Input should be a valid integer"),
        ("shape whose product overflows int64", {"inputs": [dict(ok, shape=[2**62, 4])]}, "/v2/models/model/infer",
         "18446744073709551616 images in one request; the limit is 4"),
        ("shape [-1]", {"inputs": [dict(ok, shape=[-1])]}, "/v2/models/model/infer",
         "the v2 infer request: inputs.0.shape.0: Input should be greater than or equal to 0"),
        ("outputs list of numbers", {"inputs": [ok], "outputs": [5]}, "/v2/models/model/infer",
         "the v2 infer request: outputs.0: Input should be an object"),
        ("tf instances number", {"instances": 5}, "/v1/models/model:predict",
         "the TF-Serving predict request: instances.list[any]: Input should be a valid array; "
         "instances.dict[str,any]: Input should be an object"),
    ]


def test_nested_json_and_junk_fields_get_400_never_500(guarded):
    with httpx.Client(base_url=guarded, timeout=30) as c:
        for label, body, path, want in kserve_cases():
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = c.post(path, content=content, headers={"content-type": "application/json"})
            e = err(r)
            if "images in one request" in want:
                assert (r.status_code, e) == (413, {"code": "too_many_images", "message": want}), (label, e)
                continue
            assert r.status_code == 400, (label, r.text[:300])
            if want == "bad_json":
                assert e["code"] == "bad_json" and "nested too deeply" in e["message"], (label, e)
            else:
                assert e == {"code": "bad_request", "message": want}, (label, e)
        # the binary extension's JSON header is validated the same way
        header = b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}"
        r = c.post("/v2/models/model/infer", content=header + b"xx",
                   headers={"inference-header-content-length": str(len(header))})
        assert r.status_code == 400 and err(r)["code"] == "bad_json"
        assert c.get("/v2/health/ready").json() == {"ready": True}


# ----------------------------------------------------------------------------- 3. slow clients

def test_half_a_head_half_a_body_or_nothing_is_dropped_within_the_timeout(guarded):
    raw, seconds = raw_exchange(guarded, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Ty")
    status, headers, body = answer(raw)
    assert (status, body["error"]["code"]) == (408, "head_timeout") and headers["connection"] == "close"
    assert body["error"]["message"] == "the request head did not arrive within 1 s (server option --head-timeout)"
    assert 0.8 < seconds < 3.0, seconds
    raw, seconds = raw_exchange(guarded, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                                         b"Content-Length: 100000\r\n\r\n" + b"\xff\xd8" * 50)
    status, headers, body = answer(raw)
    assert (status, body["error"]["code"]) == (408, "body_timeout") and headers["connection"] == "close"
    assert body["error"]["message"] == ("the request body did not arrive within 1 s (server option --body-timeout); "
                                        "send it faster or in smaller requests")
    assert 0.8 < seconds < 3.0, seconds
    raw, seconds = raw_exchange(guarded, b"")            # connects and sends nothing
    assert raw == b"" and 0.8 < seconds < 3.0, seconds
    with httpx.Client(base_url=guarded, timeout=10) as c:
        assert c.get("/v2/health/live").json() == {"live": True}


# ----------------------------------------------------------------------------- 4. overload

def test_overload_is_shed_with_503_and_retry_after(guarded, photos):
    async def burst():
        limits = httpx.Limits(max_connections=3)
        async with httpx.AsyncClient(base_url=guarded, timeout=60, limits=limits) as c:
            files = [("file", (f"{i}.jpg", p, "image/jpeg")) for i, p in enumerate(photos[:4])]
            return await asyncio.gather(*(c.post("/v1/predict", files=files) for _ in range(12)))

    with httpx.Client(base_url=guarded, timeout=30) as c:
        before = metrics(c)
        responses = asyncio.run(burst())
        after = metrics(c)
    statuses = collections.Counter(r.status_code for r in responses)
    assert set(statuses) == {200, 503} and statuses[200] >= 1 and statuses[503] >= 1, statuses
    for r in responses:
        if r.status_code == 503:
            e = err(r)
            assert e["code"] == "overloaded" and r.headers["retry-after"] == "1"
            assert re.fullmatch(r"the server is busy \(\d+ images decoding or queued, 4 more would pass the limit "
                                r"of 4, server option --max-queue\); retry after 1 s", e["message"]), e
        else:
            assert len(r.json()["images"]) == 4
    assert metric(after, "catalens_shed_total") - metric(before, "catalens_shed_total") == statuses[503]
    assert metric(after, "catalens_errors_total", code="overloaded") - \
        metric(before, "catalens_errors_total", code="overloaded") == statuses[503]


def test_request_bodies_held_in_memory_are_bounded(guarded, photos):
    host, port = guarded.removeprefix("http://").split(":")
    head = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 734003\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=6) as slow:
        slow.sendall(head + b"\xff\xd8")          # 0.7 MiB announced, 2 bytes sent: its reservation holds
        time.sleep(0.3)
        raw, seconds = raw_exchange(guarded, head)
        status, headers, body = answer(raw)
        assert (status, headers["retry-after"], headers["connection"]) == (503, "1", "close")
        assert body["error"] == {"code": "overloaded", "message": (
            "the server holds 0.7 MiB of request bodies, 0.7 MiB more would pass the limit of 1 MiB (server "
            "option --max-inflight-mb); retry after 1 s")}
        assert seconds < 0.5
        assert answer(read_to_end(slow))[0] == 408   # the slow one times out, which frees its share
    with httpx.Client(base_url=guarded, timeout=10) as c:
        assert c.post("/v1/predict", content=photos[0], headers={"content-type": "image/jpeg"}).status_code == 200


def test_connections_over_the_limit_get_503(model, tmp_path):
    with running_server(model, "--max-connections", "3", log=tmp_path / "log.txt") as (url, _):
        host, port = url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(3)]
        try:
            time.sleep(0.2)
            raw, _ = raw_exchange(url, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, body = answer(raw)
            assert status == 503 and headers["retry-after"] == "1" and body["error"]["code"] == "overloaded"
            assert "more than 3, server option --max-connections" in body["error"]["message"]
        finally:
            for s in idle:
                s.close()
        time.sleep(0.2)
        assert httpx.get(url + "/v2/health/live", timeout=10).json() == {"live": True}


# ----------------------------------------------------------------------------- 5. smaller ones

def test_head_health_long_urls_big_heads_and_bad_parameters(guarded, photos):
    with httpx.Client(base_url=guarded, timeout=10) as c:
        for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/model/ready", "/"):
            r = c.head(path)
            assert r.status_code == 200 and r.content == b"", path
        r = c.post("/v1/predict?top_k=abc", content=photos[0], headers={"content-type": "image/jpeg"})
        assert r.status_code == 400 and err(r) == {"code": "bad_parameter",
                                                   "message": "top_k must be a whole number, got 'abc'"}
    raw, _ = raw_exchange(guarded, b"GET /v2/health/live?q=" + b"a" * 2**20 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = answer(raw)
    assert (status, headers["connection"]) == (414, "close")
    assert body == {"error": {"code": "uri_too_long", "message": "the request line is longer than 16,384 bytes; "
                                                                 "send parameters in the body, not the URL"}}
    raw, _ = raw_exchange(guarded, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"j" * 40_000 + b"\r\n\r\n")
    assert answer(raw)[0] == 431 and answer(raw)[2]["error"]["code"] == "headers_too_large"
    raw, _ = raw_exchange(guarded, b"BLAH\r\n\r\n")
    assert answer(raw)[0] == 400 and answer(raw)[2]["error"]["code"] == "bad_http"


# ----------------------------------------------------------------------------- 6. the web page's JSON

def test_script_json_cannot_break_out_of_the_script_element():
    hostile = {"classes": ["<!--<script>", "</script><b>x</b>", "a & b", "\u2028line"]}
    text = script_json(hostile)
    assert not re.search(r"[<>&\u2028\u2029]", text)
    assert json.loads(text) == hostile


def test_web_page_embeds_hostile_class_names_safely(model, tmp_path):
    folder = hostile_model(model, tmp_path)
    with running_server(folder, log=tmp_path / "log.txt") as (url, _):
        page = httpx.get(url + "/", timeout=10).text
    script = page.split("const CONFIG = ", 1)[1].split(" || {", 1)[0]
    tasks = {t["name"]: t for t in json.loads(script)["tasks"]}
    assert "<" not in script and tasks["pattern"]["classes"][0] == HOSTILE
    assert page.count("<script") == 1 and page.count("</script>") == 1


HOSTILE = "<!--<script>x</script>&amp;"


def hostile_model(model: Path, folder: Path) -> Path:
    """A copy of the model whose first ``pattern`` tag is named :data:`HOSTILE` (the server exports
    its graph on start, so the graph's description says the same)."""
    import shutil

    out = folder / "hostile-model"
    shutil.copytree(model, out, ignore=shutil.ignore_patterns("model.onnx", "onnx.json", "*.int8.*"))
    desc = json.loads((out / "model.json").read_text())
    (task,) = [t for t in desc["tasks"] if t["name"] == "pattern"]
    task["classes"][0] = HOSTILE
    (out / "model.json").write_text(json.dumps(desc))
    return out


# ----------------------------------------------------------------------------- 7. offline API docs

def test_docs_load_their_assets_from_this_server(guarded):
    with httpx.Client(base_url=guarded, timeout=10) as c:
        for page in ("/docs", "/redoc"):
            html = c.get(page).text
            urls = re.findall(r"""(?:src|href)=["']([^"']+)["']|url: ?["']([^"']+)["']""", html)
            urls = [a or b for a, b in urls]
            assert urls and all(u.startswith("/") and not u.startswith("//") for u in urls), urls
            assert "http://" not in html and "https://" not in html
            for u in urls:
                r = c.get(u)
                assert r.status_code == 200 and len(r.content) > 100, u
        assert c.get("/docs-assets/swagger-ui-bundle.js").headers["content-type"].startswith(("text/javascript",
                                                                                               "application/javascript"))
        spec = c.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert {"KServeInferRequest", "KServeInput", "TFPredictRequest", "PredictResponse", "ErrorResponse"} <= set(schemas)
    assert schemas["KServeInput"]["properties"]["shape"]["items"] == {"minimum": 0, "type": "integer"}
    infer = spec["paths"]["/v2/models/{name}/infer"]["post"]
    assert infer["requestBody"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/KServeInferRequest"}
    assert infer["responses"]["200"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/KServeInferResponse"}
    assert infer["responses"]["503"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/ErrorResponse"}
    assert "HTTPValidationError" not in json.dumps(spec)   # bad parameters are 400 bad_parameter, not 422


# ----------------------------------------------------------------------------- 8. metrics over workers

def test_metrics_are_summed_over_workers(model, tmp_path, photos, monkeypatch):
    folder = tmp_path / "prom"
    folder.mkdir()
    (folder / "counter_999999.db").write_bytes(b"stale garbage from an earlier run")
    (folder / "notes.txt").write_text("not ours")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
    with running_server(model, "--workers", "2", log=tmp_path / "log.txt") as (url, proc):
        for i in range(8):   # fresh connections: the kernel spreads them over both workers
            r = httpx.post(url + "/v1/predict", content=photos[i % len(photos)],
                           headers={"content-type": "image/jpeg"}, timeout=60)
            assert r.status_code == 200
        workers = {p.name for p in folder.glob("gauge_livemin_*.db")}   # catalens_ready of each worker
        assert len(workers) == 2, sorted(p.name for p in folder.iterdir())
        assert not (folder / "counter_999999.db").exists() and (folder / "notes.txt").exists()
        deadline = time.time() + 120   # catalens_ready is the minimum over workers: 1 once both are warm
        while metric(scrape(url), "catalens_ready") != 1:
            assert time.time() < deadline, "the second worker never became ready"
            time.sleep(0.5)
        for _ in range(4):   # whichever worker answers the scrape, it reports both
            m = scrape(url)
            assert metric(m, "catalens_requests_total", route="/v1/predict", method="POST", status="200") == 8
            assert metric(m, "catalens_images_total") == 8
            assert metric(m, "catalens_ready") == 1
            info = [v for (name, labels), v in m.items() if name == "catalens_model_info"]
            assert info == [1.0] and ("graph", "model.onnx") in next(k for n, k in m if n == "catalens_model_info")


def scrape(url: str) -> dict:
    with httpx.Client(base_url=url, timeout=10) as c:
        return metrics(c)


# ----------------------------------------------------------------------------- units: batcher bound, metrics folder

def test_batcher_queue_is_bounded():
    from catalens.serve.batching import MicroBatcher, Overloaded

    release = asyncio.Event()

    async def run():
        loop = asyncio.get_running_loop()

        def infer(x):   # blocks the inference thread until the test lets it go
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result()
            return {"t": x.reshape(len(x), -1)[:, :2].astype(np.float32)}

        b = MicroBatcher(infer, max_batch=1, max_wait_ms=0, max_queue=2)
        await b.start()
        px = np.zeros((4, 4, 3), np.uint8)
        first = b.enqueue(px)            # taken by the collector, stuck in infer
        await asyncio.sleep(0.05)
        queued = [b.enqueue(px), b.enqueue(px)]
        with pytest.raises(Overloaded, match=r"^2 images wait for inference, the limit is 2$"):
            b.enqueue(px)
        release.set()
        results = await asyncio.gather(first, *queued)
        await b.stop()
        return results

    results = asyncio.run(run())
    assert len(results) == 3 and all(r[1].batch_size == 1 for r in results)


def test_multiprocess_metrics_folder_is_made_and_removed(monkeypatch, tmp_path):
    from catalens.serve.app import multiprocess_metrics_dir

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with multiprocess_metrics_dir() as folder:
        assert folder.is_dir() and os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(folder)
        (folder / "counter_1.db").write_bytes(b"x")
    assert not folder.exists() and "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    given = tmp_path / "prom"
    given.mkdir()
    for name in ("counter_12.db", "gauge_livesum_12.db", "histogram_3.db", "keep.db", "notes.txt"):
        (given / name).write_bytes(b"x")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(given))
    with multiprocess_metrics_dir() as folder:
        assert folder == given and sorted(p.name for p in given.iterdir()) == ["keep.db", "notes.txt"]
    assert given.is_dir()   # the user's folder stays
