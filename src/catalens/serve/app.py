"""The HTTP server: FastAPI + ONNX Runtime, micro-batched, safe against bad input.

``create_app(ServeSettings(model_dir=...))`` builds the app; ``catalens serve MODEL`` runs it with
uvicorn. On start-up the model's ONNX graph is loaded (exported first when missing or stale) and
warmed up with a batch of 1 and a full batch; only then does uvicorn accept connections.

Request path: the body is read with a byte limit (413 as soon as it is exceeded, nothing
unbounded is buffered) → photos are decoded in a thread pool (EXIF, modes, resize, crop; bombs
refused before decoding) → each image joins the micro-batcher's queue → one ONNX Runtime call
per batch in the inference thread → the response is shaped by the protocol of the route.

Every refusal is ``{"error": {"code": ..., "message": ...}}`` with a 4xx status; see
``docs/serving.md`` for the list. The server never fetches URLs.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from fastapi import Request

from catalens.ingest.images import DEFAULT_MAX_PIXELS, ImageProblem, load_rgb
from catalens.serve import protocols as P
from catalens.serve.batching import MicroBatcher
from catalens.serve.metrics import ServerMetrics

SETTINGS_ENV = "CATALENS_SERVE_SETTINGS"
STATIC = Path(__file__).with_name("static")
IMAGE_STATUS = 422  # a file that arrived but is not a usable photo


@dataclass
class ServeSettings:
    """Everything ``catalens serve`` can be told (also passed to uvicorn workers as JSON)."""

    model_dir: str
    name: str | None = None            # model name in URLs (default: the folder's name)
    onnx: str | None = None            # a graph to serve instead of MODEL/model.onnx
    int8: bool = False                 # serve MODEL/model.int8.onnx
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_upload_mb: float = 20.0
    max_images: int = 64               # images per request
    max_pixels: int = DEFAULT_MAX_PIXELS
    threads: int | None = None         # ONNX Runtime intra-op threads (default: CPUs / workers)
    decode_threads: int | None = None  # decode thread pool size (default: CPUs, at most 4)
    workers: int = 1
    top_k: int = 5
    warmup: bool = True

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ServeSettings":
        return cls(**json.loads(text))


def _has_title_model(folder: Path) -> bool:
    """A model folder trained with ``--text`` (its ``text/fusion.json``)."""
    return (folder / "text" / "fusion.json").exists()


class ServerState:
    """The loaded model, the batcher and the pools: created at start-up, closed at shutdown."""

    def __init__(self, settings: ServeSettings) -> None:
        from catalens.runtime import available_cpus

        self.settings = settings
        self.model_dir = Path(settings.model_dir)
        self.name = settings.name or self.model_dir.resolve().name
        cpus = available_cpus()
        self.threads = settings.threads or max(1, cpus // max(1, settings.workers))
        self.decode_threads = settings.decode_threads or max(1, min(4, cpus))
        self.decoding = 0
        self.ready = False
        self.model = None
        self.text = None     # title model fused with the image head (MODEL/text), when the model has one
        self.decoder = None  # probabilities (+ titles) -> answers: the model's one decoder (catalens.model.decode)
        self.batcher: MicroBatcher | None = None
        self.decode_pool: ThreadPoolExecutor | None = None
        self.metrics = ServerMetrics(queue_depth=lambda: self.batcher.depth if self.batcher else 0)
        self.started = time.time()

    # ------------------------------------------------------------------ life cycle
    def graph_path(self) -> Path:
        from catalens.export.onnx import default_onnx_path, ensure_onnx

        s = self.settings
        if s.onnx:
            return Path(s.onnx)
        if s.int8:
            path = default_onnx_path(self.model_dir, int8=True)
            if not path.exists():
                raise FileNotFoundError(f"no {path.name} in {self.model_dir}: create it with "
                                        f"'catalens export {self.model_dir} --int8'")
            return path
        return ensure_onnx(self.model_dir)

    async def startup(self) -> None:
        from catalens.export.onnx import OnnxModel
        from catalens.model.decode import Decoder

        loop = asyncio.get_running_loop()
        self.decoder = await loop.run_in_executor(None, Decoder.from_folder, self.model_dir)
        self.text = self.decoder.text
        path = await loop.run_in_executor(None, self.graph_path)
        self.model = await loop.run_in_executor(None, lambda: OnnxModel(path, threads=self.threads, spin=False))
        if [t.to_dict() for t in self.model.tasks] != [t.to_dict() for t in self.decoder.tasks]:
            raise RuntimeError(f"the graph '{path}' does not predict the tasks of '{self.model_dir}/model.json' "
                               f"(another model's export?); export it again with 'catalens export {self.model_dir}'")
        if self.settings.warmup:
            size = self.model.size
            rng = np.random.default_rng(0)
            for n in sorted({1, self.settings.max_batch}):
                x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
                await loop.run_in_executor(None, self.model.run_hwc, x, self.settings.max_batch)
        self.decode_pool = ThreadPoolExecutor(max_workers=self.decode_threads, thread_name_prefix="catalens-decode")
        self.batcher = MicroBatcher(self._infer, self.settings.max_batch, self.settings.max_wait_ms,
                                    expected=lambda: self.decoding, on_batch=self._on_batch)
        await self.batcher.start()
        self.metrics.info.set(1, self.name, path.name, str(self.threads))
        self.ready = True
        self.metrics.ready.set(1)

    async def shutdown(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        if self.batcher is not None:
            await self.batcher.stop()  # finishes queued images
        if self.decode_pool is not None:
            self.decode_pool.shutdown(wait=True)

    def titles_note(self, titles) -> str | None:
        """What the server did with the request's titles (None when it sent none)."""
        if titles is None:
            return None
        return "fused" if self.text is not None else self._ignored_titles

    @cached_property
    def _ignored_titles(self) -> str:
        """Why titles are ignored (read from the model folder once, not per request)."""
        if any(_has_title_model(m) for m in (self.model_dir / "members").glob("*")):
            return ("ignored: the server fuses titles for single models only; 'catalens predict' and "
                    "'catalens evaluate' fuse them for this ensemble's members")
        return "ignored: this model has no title model (train with --text)"

    def _fuse(self, probs: list[dict], titles: list[str | None]) -> list[dict]:
        batch = {k: np.stack([p[k] for p in probs]) for k in probs[0]}    # {task: (n, C)}
        fused = self.decoder.fuse(batch, titles)
        return [{k: v[i] for k, v in fused.items()} for i in range(len(probs))]

    def answers(self, results: list[tuple[dict, dict]], top_k: int):
        """The decoder's answers for the images of one request (``results`` of :meth:`predict`)."""
        batch = {t.name: np.stack([p[t.name] for p, _ in results]) for t in self.decoder.tasks}  # {task: (n, C)}
        return self.decoder.decode(batch, top_k)

    # ------------------------------------------------------------------ prediction
    def _infer(self, batch_hwc: np.ndarray) -> dict[str, np.ndarray]:
        from catalens.export.onnx import to_nchw

        return self.model.run(to_nchw(batch_hwc))

    def _on_batch(self, n: int, seconds: float, waits: list[float]) -> None:
        m = self.metrics
        m.batch_size.observe(n)
        m.inference.observe(seconds)
        m.images.inc(amount=n)
        for w in waits:
            m.queue_wait.observe(w)

    def _decode(self, data: bytes) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        px = load_rgb(data, self.model.preprocess, max_pixels=self.settings.max_pixels)
        return px, (time.perf_counter() - t0) * 1000.0

    def check_ready(self) -> None:
        if not self.ready:
            raise P.ApiError(503, "not_ready", "the model is loading or the server is shutting down; retry shortly")

    def check_name(self, name: str) -> None:
        if name != self.name:
            raise P.ApiError(404, "model_not_found", f"no model named '{name}'; this server serves '{self.name}'")

    async def predict(self, images: list[bytes], names: list[str] | None = None,
                      titles: list[str | None] | None = None) -> list[tuple[dict, dict]]:
        """Decode and predict; returns per image ``(probs, timings)``; bad photos raise 4xx ApiError.
        With ``titles`` (one per image) and a model with a title model, probabilities are fused."""
        self.check_ready()
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        self.decoding += len(images)

        async def decode_one(data: bytes):
            try:
                return await loop.run_in_executor(self.decode_pool, self._decode, data)
            finally:
                self.decoding -= 1

        decoded = await asyncio.gather(*(decode_one(d) for d in images), return_exceptions=True)
        for i, r in enumerate(decoded):
            if isinstance(r, BaseException):
                name = names[i] if names else f"image {i}"
                if isinstance(r, ImageProblem):
                    raise P.ApiError(IMAGE_STATUS, r.code, f"{name}: {_problem_message(r)}", index=i, file=name)
                if isinstance(r, MemoryError):
                    raise P.ApiError(413, "too_large", f"{name}: the image is too large to decode", index=i, file=name)
                raise P.ApiError(IMAGE_STATUS, "undecodable", f"{name}: cannot decode ({type(r).__name__}: {r})",
                                 index=i, file=name)
        for _, ms in decoded:
            self.metrics.decode.observe(ms / 1000.0)
        try:
            results = await asyncio.gather(*(self.batcher.submit(px) for px, _ in decoded))
        except RuntimeError as e:
            raise P.ApiError(503, "not_ready", str(e)) from None
        if titles is not None and self.text is not None:
            fused = await loop.run_in_executor(None, self._fuse, [p for p, _ in results], titles)
            results = [(p, info) for p, (_, info) in zip(fused, results)]
        total = (time.perf_counter() - t0) * 1000.0
        out = []
        for (probs, info), (_, dms) in zip(results, decoded):
            out.append((probs, {"decode_ms": round(dms, 2), "queue_ms": round(info.queue_ms, 2),
                                "inference_ms": round(info.inference_ms, 2), "batch_size": info.batch_size,
                                "total_ms": round(total, 2)}))
        return out


async def _off_loop(parse, body: bytes):
    """Parse small bodies on the loop; big ones (JSON, base64, multipart of MBs) in a thread."""
    if len(body) < 256 * 1024:
        return parse(body)
    return await asyncio.get_running_loop().run_in_executor(None, parse, body)


def _problem_message(p: ImageProblem) -> str:
    from catalens.ingest.images import PROBLEM_FIXES

    what = {"empty": "the file is empty (0 bytes)", "not_an_image": "not an image Pillow can read",
            "truncated": "the image data ends early (truncated file)", "undecodable": "the image data is corrupt",
            "decompression_bomb": "the image has too many pixels (decompression bomb)"}.get(p.code, p.code)
    fix = PROBLEM_FIXES.get(p.code)
    return f"{what}: {p.detail}" + (f"; fix: {fix}" if fix else "")


# ----------------------------------------------------------------------------- ASGI middleware

class MetricsMiddleware:
    """Counts every HTTP request by route template + status and observes its latency."""

    def __init__(self, app, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        m = self.state.metrics
        status = [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        start = time.perf_counter()
        m.in_flight.add(1)
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            m.in_flight.add(-1)
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            m.requests.inc(label, scope.get("method", ""), str(status[0]))
            m.latency.observe(time.perf_counter() - start, label)


# ----------------------------------------------------------------------------- app

_PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                 "description": "one or several photos (JPEG, PNG, WebP, ...)"},
        "top_k": {"type": "integer", "description": "labels per class task (default 5)"}}}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}
_TF_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "properties": {"instances": {"type": "array", "items": {
        "type": "object", "properties": {"b64": {"type": "string", "description": "base64 image bytes"}}}}}},
    "example": {"instances": [{"b64": "/9j/4AAQSkZJRg..."}]}}}}}
_KS_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"},
    "example": {"id": "1", "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                       "data": ["/9j/4AAQSkZJRg..."]}]}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                 "description": "binary tensor extension: JSON header of "
                                                "Inference-Header-Content-Length bytes, then the data"}}}}


def create_app(settings: ServeSettings):
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    state = ServerState(settings)

    @asynccontextmanager
    async def lifespan(app):
        await state.startup()
        try:
            yield
        finally:
            await state.shutdown()

    from importlib.metadata import version

    app = FastAPI(title="catalens", version=version("catalens"), lifespan=lifespan,
                  description="Product photos to categories and tags. Errors are "
                              "`{\"error\": {\"code\": ..., \"message\": ...}}` with a 4xx status.")
    app.state.catalens = state
    app.add_middleware(MetricsMiddleware, state=state)

    def error_response(status: int, code: str, message: str, **extra) -> JSONResponse:
        state.metrics.errors.inc(code)
        headers = {"Connection": "close"} if status == 413 else None
        return JSONResponse({"error": {"code": code, "message": message, **extra}}, status_code=status,
                            headers=headers)

    @app.exception_handler(P.ApiError)
    async def _api_error(request, exc: P.ApiError):
        return error_response(exc.status, exc.code, exc.message, **exc.extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        msg = {404: f"no route {request.method} {request.url.path}; see /docs for the endpoints",
               405: f"{request.method} is not allowed on {request.url.path}; see /docs"}.get(exc.status_code,
                                                                                             str(exc.detail))
        return error_response(exc.status_code, code, msg)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return error_response(422, "bad_request", "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                                             for e in exc.errors()))

    @app.exception_handler(Exception)
    async def _internal(request, exc):
        return error_response(500, "internal", f"internal error ({type(exc).__name__}); this is a bug, "
                                               f"please report it")

    async def body(request: Request) -> bytes:
        state.check_ready()
        from starlette.requests import ClientDisconnect

        expect = request.headers.get("expect", "").lower() == "100-continue"
        try:
            return await P.read_limited(request.stream(), settings.max_upload_bytes,
                                        request.headers.get("content-length"), expect_continue=expect)
        except ClientDisconnect:
            raise P.ApiError(499, "client_closed_request", "the client closed the connection before sending "
                                                           "the whole body") from None

    # ---------------------------------------------------------------- catalens API
    @app.post("/v1/predict", openapi_extra=_PREDICT_BODY, tags=["catalens"],
              summary="Predict categories and tags for one or several photos")
    async def predict(request: Request, top_k: int | None = None, title: str | None = None):
        t0 = time.perf_counter()
        data = await body(request)
        uploads, fields = await _off_loop(lambda b: P.parse_predict_body(b, request.headers.get("content-type"),
                                                                         settings.max_images), data)
        k = P.parse_top_k(top_k if top_k is not None else fields.get("top_k"), settings.top_k)
        sent = fields.get("titles") if "titles" in fields else ([title] if title is not None else None)
        titles = P.check_titles(sent, len(uploads))
        results = await state.predict([u.data for u in uploads], [u.name for u in uploads], titles)
        ans = state.answers(results, k)
        images = [{"index": i, "file": u.name, **state.decoder.record(ans, i), "timings": timings}
                  for i, (u, (_, timings)) in enumerate(zip(uploads, results))]
        out = {"model": state.name, "images": images,
               "timings": {"total_ms": round((time.perf_counter() - t0) * 1000.0, 2)}}
        if titles is not None:
            out["titles"] = state.titles_note(titles)
        return out

    # ---------------------------------------------------------------- TF-Serving REST
    @app.get("/v1/models/{name}", tags=["tf-serving"], summary="Model status (TF-Serving)")
    async def tf_status(name: str):
        state.check_name(name)
        ok = state.ready
        return {"model_version_status": [{"version": "1", "state": "AVAILABLE" if ok else "LOADING",
                                          "status": {"error_code": "OK", "error_message": ""}}]}

    @app.get("/v1/models/{name}/metadata", tags=["tf-serving"], summary="Model metadata: tasks, classes")
    async def tf_metadata(name: str):
        state.check_name(name)
        state.check_ready()
        return {"model_spec": {"name": state.name, "version": "1"},
                "metadata": {"catalens": state.model.description}}

    @app.post("/v1/models/{name}:predict", openapi_extra=_TF_BODY, tags=["tf-serving"],
              summary="TF-Serving REST predict: {\"instances\": [{\"b64\": ...}]}")
    async def tf_predict(name: str, request: Request):
        state.check_name(name)
        images, fmt = await _off_loop(lambda b: P.parse_tf_request(P.parse_json(b), settings.max_images),
                                      await body(request))
        results = await state.predict(images)
        return P.tf_response(state.decoder, state.answers(results, 1), fmt)

    # ---------------------------------------------------------------- KServe v2 / Open Inference Protocol
    @app.get("/v2", tags=["kserve-v2"], summary="Server metadata")
    async def v2_server():
        return {"name": "catalens", "version": version("catalens"), "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live", tags=["kserve-v2"])
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready", tags=["kserve-v2"])
    async def ready():
        if not state.ready:
            return JSONResponse({"ready": False}, status_code=503)
        return {"ready": True}

    @app.get("/v2/models/{name}", tags=["kserve-v2"], summary="Model metadata")
    async def v2_metadata(name: str):
        state.check_name(name)
        state.check_ready()
        return P.kserve_metadata(state.name, state.model.tasks, state.model.description, state.text is not None)

    @app.get("/v2/models/{name}/ready", tags=["kserve-v2"])
    async def v2_model_ready(name: str):
        state.check_name(name)
        if not state.ready:
            return JSONResponse({"name": name, "ready": False}, status_code=503)
        return {"name": name, "ready": True}

    async def v2_infer_impl(name: str, request: Request, version_: str | None = None):
        state.check_name(name)
        if version_ is not None and version_ != "1":
            raise P.ApiError(404, "model_not_found", f"model '{name}' has version 1 only, not '{version_}'")
        images, doc = await _off_loop(lambda b: P.parse_kserve_request(b, request.headers, settings.max_images),
                                      await body(request))
        titles = P.kserve_titles(doc, len(images))
        results = await state.predict(images, titles=titles)
        out = P.kserve_response(state.name, state.decoder, state.answers(results, 1), doc)
        if titles is not None:
            out["parameters"] = {"titles": state.titles_note(titles)}
        return out

    @app.post("/v2/models/{name}/infer", openapi_extra=_KS_BODY, tags=["kserve-v2"],
              summary="Open Inference Protocol infer: one BYTES input of encoded photos")
    async def v2_infer(name: str, request: Request):
        return await v2_infer_impl(name, request)

    @app.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=_KS_BODY, tags=["kserve-v2"],
              include_in_schema=False)
    async def v2_infer_version(name: str, version: str, request: Request):
        return await v2_infer_impl(name, request, version)

    # ---------------------------------------------------------------- operations
    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics (text exposition format)")
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", include_in_schema=False)
    async def index():
        html = (STATIC / "index.html").read_text(encoding="utf-8")
        cfg = {"name": state.name, "tasks": [t.to_dict() for t in state.model.tasks] if state.model else [],
               "max_upload_mb": settings.max_upload_mb, "max_images": settings.max_images,
               "titles": state.text is not None}
        html = html.replace("/*CATALENS_CONFIG*/null", json.dumps(cfg).replace("</", "<\\/"))
        return HTMLResponse(html)

    return app


def create_app_from_env():
    """uvicorn factory for ``--workers N`` (settings come from ``$CATALENS_SERVE_SETTINGS``)."""
    text = os.environ.get(SETTINGS_ENV)
    if not text:
        raise RuntimeError(f"{SETTINGS_ENV} is not set; start the server with 'catalens serve MODEL'")
    return create_app(ServeSettings.from_json(text))


def run_server(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
               graceful_timeout: float = 30.0) -> None:
    """Run uvicorn (one process, or ``settings.workers`` processes sharing the port)."""
    import uvicorn

    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        # uvicorn finishes in-flight requests on SIGTERM, then re-raises the signal: exit 0 then
        signal.signal(signal.SIGTERM, _exit_cleanly)
    kw = dict(host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_timeout,
              access_log=False, limit_concurrency=None, timeout_keep_alive=5)
    if settings.workers > 1:
        os.environ[SETTINGS_ENV] = settings.to_json()
        uvicorn.run("catalens.serve.app:create_app_from_env", factory=True, workers=settings.workers, **kw)
    else:
        uvicorn.run(create_app(settings), **kw)


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(0)
