"""The HTTP server: FastAPI + ONNX Runtime, micro-batched, safe against bad input.

``create_app(ServeSettings(model_dir=...))`` builds the app; ``catalens serve MODEL`` runs it with
uvicorn. On start-up the model's ONNX graph is loaded (exported first when missing or stale) and
warmed up with a batch of 1 and a full batch; only then does uvicorn accept connections.

Request path: the body is read with a byte limit and a time limit (413 as soon as it is
exceeded, 408 when it does not arrive in ``body_timeout`` s; nothing unbounded is buffered) →
JSON bodies are validated with pydantic models (:mod:`catalens.serve.protocols`) → the server
sheds load (503 + ``Retry-After``) when more than ``max_queue`` images are decoding or queued →
every photo's header is probed (a few µs): bombs, and photos whose decoded pixels would need more
than ``max_decode_mb`` (pixels × bytes per pixel, after the JPEG decoder's own downscaling) are
refused before anything is decoded → photos are decoded in a thread pool (EXIF, modes, resize,
crop), at most ``decode_threads`` at a time and at most half of them for one request → each image
joins the micro-batcher's queue → one ONNX Runtime call per batch in the inference thread → the
response is shaped by the protocol of the route.

Connections (see :mod:`catalens.serve.connections`): a request head must arrive within
``head_timeout`` s and fit 16 KiB (414/431 beyond), and each worker takes at most
``max_connections`` connections (503 beyond).

Every refusal is ``{"error": {"code": ..., "message": ...}}`` with a 4xx status; see
``docs/serving.md`` for the list. The server never fetches URLs.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from fastapi import Request

from catalens.ingest.images import DEFAULT_MAX_PIXELS, ImageProblem, load_rgb
from catalens.serve import protocols as P
from catalens.serve import schemas as S
from catalens.serve.batching import MicroBatcher, Overloaded
from catalens.serve.metrics import CONTENT_TYPE_LATEST, ServerMetrics

log = logging.getLogger(__name__)
SETTINGS_ENV = "CATALENS_SERVE_SETTINGS"
STATIC = Path(__file__).with_name("static")
IMAGE_STATUS = 422  # a file that arrived but is not a usable photo
RETRY_AFTER_S = 1   # what a shed request is told to wait
DOCS_ASSETS_URL = "/docs-assets"
_BODY_KEY = "catalens_body_bytes"


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
    backend: str = "auto"              # how the graph runs: auto (OpenVINO when installed), onnxruntime, openvino
    max_decode_mb: float = 256.0       # peak memory to decode one image (w x h x bytes per pixel), MiB
    max_queue: int = 256               # images decoding or waiting for a batch before 503 (per worker)
    head_timeout: float = 10.0         # seconds for a request head to arrive
    body_timeout: float = 60.0         # seconds for a request body to arrive
    max_connections: int = 256         # open connections per worker before 503
    max_inflight_mb: float = 256.0     # request bodies held at once per worker (MiB) before 503

    @property
    def max_decode_bytes(self) -> int:
        return int(self.max_decode_mb * 2**20)

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
        self.body_bytes = 0  # request bodies being read or processed (reserve_body)
        self.ready = False
        self.model = None
        self.text = None     # title model fused with the image head (MODEL/text), when the model has one
        self.decoder = None  # probabilities (+ titles) -> answers: the model's one decoder (catalens.model.decode)
        self.batcher: MicroBatcher | None = None
        self.decode_pool: ThreadPoolExecutor | None = None
        self.metrics = ServerMetrics()
        self.decode_slots: asyncio.Semaphore | None = None
        self.probe_pool: ThreadPoolExecutor | None = None
        self.started = time.time()
        self._torch_model = None       # loaded on the first explain=true request (Grad-CAM needs torch)
        self._explain_lock = threading.Lock()

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
        self.model = await loop.run_in_executor(None, lambda: OnnxModel(path, threads=self.threads, spin=False,
                                                                        backend=self.settings.backend))
        if [t.to_dict() for t in self.model.tasks] != [t.to_dict() for t in self.decoder.tasks]:
            raise RuntimeError(f"the graph '{path}' does not predict the tasks of '{self.model_dir}/model.json' "
                               f"(another model's export?); export it again with 'catalens export {self.model_dir}'")
        if self.settings.warmup:
            h, w = self.model.hw
            rng = np.random.default_rng(0)
            for n in sorted({1, self.settings.max_batch}):
                x = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
                await loop.run_in_executor(None, self.model.run_hwc, x, self.settings.max_batch)
        self.decode_pool = ThreadPoolExecutor(max_workers=self.decode_threads, thread_name_prefix="catalens-decode")
        self.probe_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="catalens-probe")
        self.decode_slots = asyncio.Semaphore(self.decode_threads)
        self.batcher = MicroBatcher(self._infer, self.settings.max_batch, self.settings.max_wait_ms,
                                    expected=lambda: self.decoding, on_batch=self._on_batch,
                                    max_queue=self.settings.max_queue)
        await self.batcher.start()
        self.metrics.info.labels(self.name, path.name, str(self.threads)).set(1)
        self.ready = True
        self.metrics.ready.set(1)

    async def shutdown(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        if self.batcher is not None:
            await self.batcher.stop()  # finishes queued images
        for pool in (self.decode_pool, self.probe_pool):
            if pool is not None:
                pool.shutdown(wait=True)
        self.metrics.process_exited()

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

    def answers(self, results: list[tuple[dict, dict]], top_k: int, titles: list[str | None] | None = None):
        """The decoder's answers for the images of one request (``results`` of :meth:`predict`):
        with ``titles`` (one per image) and a model with a title model, the image probabilities are
        fused with the titles and title–image conflicts flagged (:meth:`Decoder.__call__`)."""
        batch = {t.name: np.stack([p[t.name] for p, _ in results]) for t in self.decoder.tasks}  # {task: (n, C)}
        return self.decoder(batch, titles if self.text is not None else None, top_k)

    def explain_task(self, name: str | None) -> str:
        """The class task ``explain=true`` draws (``name``, or the first class task); 400 otherwise."""
        self.check_ready()
        classes = [t.name for t in self.decoder.tasks if t.kind == "class"]
        if not classes:
            raise P.ApiError(400, "explain_unsupported", "explain=true explains a class task; this model has none")
        if name is not None and name not in classes:
            raise P.ApiError(400, "bad_parameter", f"explain_task '{name[:80]}' is not a class task of this model; "
                                                   f"class tasks: {classes}")
        return name or classes[0]

    def _explain_model(self):
        """The torch model Grad-CAM needs, loaded on the first ``explain=true`` request (the
        server itself runs the exported graph)."""
        with self._explain_lock:
            if self._torch_model is None:
                from catalens.model.load import load_model

                log.info(f"explain: loading the torch model of {self.model_dir} for Grad-CAM")
                self._torch_model = load_model(self.model_dir)
            return self._torch_model

    def _explain_one(self, data: bytes, task: str, label: int) -> dict:
        import base64

        from catalens.model.explain import ExplainError, explain_photo

        try:
            png, _ = explain_photo(self._explain_model(), data, task, label, self.settings.max_pixels)
        except ExplainError as e:
            raise P.ApiError(400, "explain_unsupported", f"explain=true: {e}") from None
        except ImportError as e:
            raise P.ApiError(501, "explain_unavailable", f"explain=true needs torch on the server ({e}); "
                                                         f"install catalens with torch") from None
        t = next(t for t in self.decoder.tasks if t.name == task)
        return {"task": task, "label": t.classes[label], "png_base64": base64.b64encode(png).decode("ascii")}

    async def explain(self, data: bytes, task: str, label: int) -> dict:
        """``{"task", "label", "png_base64"}``: the Grad-CAM overlay of one photo for the decided
        ``label`` of ``task``, at the photo's own size (computed in a thread)."""
        return await asyncio.get_running_loop().run_in_executor(None, self._explain_one, data, task, label)

    async def answers_async(self, results: list[tuple[dict, dict]], top_k: int, titles=None):
        """:meth:`answers`; title fusion (TF-IDF of the titles) runs off the event loop."""
        if titles is None or self.text is None:
            return self.answers(results, top_k)
        return await asyncio.get_running_loop().run_in_executor(None, self.answers, results, top_k, titles)

    # ------------------------------------------------------------------ prediction
    def _infer(self, batch_hwc: np.ndarray) -> dict[str, np.ndarray]:
        from catalens.export.onnx import to_nchw

        return self.model.run(to_nchw(batch_hwc))

    def _on_batch(self, n: int, seconds: float, waits: list[float]) -> None:
        m = self.metrics
        m.batch_size.observe(n)
        m.inference.observe(seconds)
        m.images.inc(n)
        for w in waits:
            m.queue_wait.observe(w)
        self._queue_gauge()

    def pending(self) -> int:
        """Images of this worker being decoded (or waiting to be) or waiting for a batch."""
        return self.decoding + (self.batcher.depth if self.batcher else 0)

    def _queue_gauge(self) -> None:
        self.metrics.queue.set(self.pending())

    def _decode(self, data: bytes) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        px = load_rgb(data, self.model.preprocess, max_pixels=self.settings.max_pixels)
        return px, (time.perf_counter() - t0) * 1000.0

    def _probe(self, data: bytes) -> DecodeCost:
        return decode_cost(data, self.model.preprocess.resize, self.settings.max_pixels)

    def shed_if_full(self, n: int) -> None:
        """503 + Retry-After when ``n`` more images would put more than ``max_queue`` in this worker."""
        pending, limit = self.pending(), self.settings.max_queue
        if pending + n > limit:
            self.metrics.shed.inc()
            raise P.ApiError(503, "overloaded", f"the server is busy ({pending} images decoding or queued, "
                                                f"{n} more would pass the limit of {limit}, server option "
                                                f"--max-queue); retry after {RETRY_AFTER_S} s",
                             headers={"Retry-After": str(RETRY_AFTER_S)})

    def reserve_body(self, scope: dict, declared: str | None) -> None:
        """Count a request body against ``max_inflight_mb`` (its Content-Length, or the upload limit when
        chunked) until the request ends (:meth:`release_body`, called by the middleware); 503 beyond."""
        limit = self.settings.max_upload_bytes
        try:
            n = min(int(declared), limit) if declared is not None else limit
        except ValueError:
            n = limit       # read_limited answers the bad header
        n = max(n, 0)
        budget = int(self.settings.max_inflight_mb * 2**20)
        if self.body_bytes + n > budget:
            self.metrics.shed.inc()
            raise P.ApiError(503, "overloaded", f"the server holds {self.body_bytes / 2**20:.1f} MiB of request "
                                                f"bodies, {n / 2**20:.1f} MiB more would pass the limit of "
                                                f"{budget / 2**20:g} MiB (server option --max-inflight-mb); retry "
                                                f"after {RETRY_AFTER_S} s",
                             headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})
        self.body_bytes += n
        scope.setdefault("state", {})[_BODY_KEY] = n

    def release_body(self, scope: dict) -> None:
        self.body_bytes -= (scope.get("state") or {}).pop(_BODY_KEY, 0)

    def check_ready(self) -> None:
        if not self.ready:
            raise P.ApiError(503, "not_ready", "the model is loading or the server is shutting down; retry shortly")

    def check_name(self, name: str) -> None:
        if name != self.name:
            raise P.ApiError(404, "model_not_found", f"no model named '{name}'; this server serves '{self.name}'")

    async def predict(self, images: list[bytes], names: list[str] | None = None) -> list[tuple[dict, dict]]:
        """Decode and predict; returns per image ``(image probs, timings)``; bad photos raise 4xx
        ApiError. Titles are fused by :meth:`answers`."""
        self.check_ready()
        self.shed_if_full(len(images))
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        self.decoding += len(images)   # reserved at once: concurrent requests see them in pending()
        self._queue_gauge()
        try:
            await self._check_costs(images, names)
        except BaseException:
            self.decoding -= len(images)
            self._queue_gauge()
            raise
        own = asyncio.Semaphore(max(1, self.decode_threads // 2))  # leave decode threads to other requests

        async def decode_one(data: bytes):
            async with own, self.decode_slots:
                return await loop.run_in_executor(self.decode_pool, self._decode, data)

        try:   # the images stay counted in pending() until they are in the batcher's queue
            decoded = await asyncio.gather(*(decode_one(d) for d in images), return_exceptions=True)
            self._raise_first_problem(decoded, names)
            for _, ms in decoded:
                self.metrics.decode.observe(ms / 1000.0)
            futures = [self.batcher.enqueue(px) for px, _ in decoded]
        except Overloaded as e:   # not expected: admission (shed_if_full) keeps the queue within its limit
            self.metrics.shed.inc()
            raise P.ApiError(503, "overloaded", f"the server is busy ({e}, server option --max-queue); retry "
                                                f"after {RETRY_AFTER_S} s",
                             headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except RuntimeError as e:
            raise P.ApiError(503, "not_ready", str(e)) from None
        finally:
            self.decoding -= len(images)
            self._queue_gauge()
        results = await asyncio.gather(*futures)
        total = (time.perf_counter() - t0) * 1000.0
        out = []
        for (probs, info), (_, dms) in zip(results, decoded):
            out.append((probs, {"decode_ms": round(dms, 2), "queue_ms": round(info.queue_ms, 2),
                                "inference_ms": round(info.inference_ms, 2), "batch_size": info.batch_size,
                                "total_ms": round(total, 2)}))
        return out

    async def _check_costs(self, images: list[bytes], names: list[str] | None) -> None:
        """Probe every photo's header (bombs, non-images) and refuse those over the decode budget (413)."""
        loop = asyncio.get_running_loop()
        costs = await asyncio.gather(*(loop.run_in_executor(self.probe_pool, self._probe, d) for d in images),
                                     return_exceptions=True)
        self._raise_first_problem(costs, names)
        budget = self.settings.max_decode_bytes
        for i, c in enumerate(costs):
            if c.bytes > budget:
                name = names[i] if names else f"image {i}"
                raise P.ApiError(413, "decode_too_large", f"{name}: {c.describe()} needs {c.bytes / 2**20:,.1f} MiB "
                                 f"to decode, over the limit of {budget / 2**20:g} MiB per image (server option "
                                 f"--max-decode-mb); send it downscaled to at most {c.side_within(budget)} px or "
                                 f"as an 8-bit JPEG", index=i, file=name, limit_bytes=budget)

    @staticmethod
    def _raise_first_problem(results: list, names: list[str] | None) -> None:
        """The first failed probe/decode of a request as a 4xx :class:`ApiError` naming the photo."""
        for i, r in enumerate(results):
            if not isinstance(r, BaseException):
                continue
            name = names[i] if names else f"image {i}"
            if isinstance(r, ImageProblem):
                raise P.ApiError(IMAGE_STATUS, r.code, f"{name}: {_problem_message(r)}", index=i, file=name)
            if isinstance(r, MemoryError):
                raise P.ApiError(413, "too_large", f"{name}: the image is too large to decode", index=i, file=name)
            raise P.ApiError(IMAGE_STATUS, "undecodable", f"{name}: cannot decode ({type(r).__name__}: {r})",
                             index=i, file=name)


@dataclass
class DecodeCost:
    """What decoding a photo will hold in memory: ``bytes`` = width x height x bytes per pixel."""

    width: int
    height: int
    mode: str
    bytes_per_pixel: float
    format: str | None

    @property
    def bytes(self) -> int:
        return int(self.width * self.height * self.bytes_per_pixel)

    def describe(self) -> str:
        return (f"a {self.width}x{self.height} {self.format or 'image'} ({self.mode}, "
                f"{self.bytes_per_pixel:g} bytes per pixel while decoding)")

    def side_within(self, budget: int) -> str:
        """The largest size of the same aspect ratio that fits ``budget``."""
        scale = (budget / self.bytes) ** 0.5
        return f"{int(self.width * scale)}x{int(self.height * scale)}"


def peak_bytes_per_pixel(mode: str, transparency: bool = False) -> int:
    """Peak memory of :func:`catalens.ingest.images.load_rgb` per pixel of an image of this mode: the
    decoded image plus its conversions to 8-bit RGB (16- and 32-bit images go through float64, alpha
    is composited on white). Measured with Pillow 13 on 4000 x 4000 PNGs: RGB 4.4, L 5.1, RGBA and
    LA 20.1, I;16 25 bytes per pixel; rounded up here."""
    from PIL import ImageMode

    if mode.startswith("I;16"):
        return 25
    if mode in ("I", "F"):
        return 27
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and transparency):
        return 20
    m = ImageMode.getmode(mode)
    return max(6, len(m.bands) * np.dtype(m.typestr).itemsize + 3)


def decode_cost(data: bytes, draft_to: int, max_pixels: int) -> DecodeCost:
    """Read a photo's header only (no pixel is decoded) and say how much memory decoding it takes.

    The cost is pixels x :func:`peak_bytes_per_pixel` (a 16-bit PNG: 25 bytes per pixel). Baseline
    JPEGs are measured after the decoder's own downscaling to at least ``draft_to`` px (the same
    ``draft`` that :func:`catalens.ingest.images.load_rgb` applies), so a big one costs 1/64 of its
    pixels. A progressive JPEG keeps every DCT coefficient of the full image while it decodes (2
    bytes each; 3 bytes per pixel with 4:2:0 chroma), whatever the output size. PNG, TIFF, WebP...
    have no reduced decoding in Pillow and cost their full size. Raises :class:`ImageProblem` for
    empty files, non-images and bombs (``max_pixels``)."""
    from catalens.ingest.images import open_image

    im = open_image(data, max_pixels)
    try:
        if im.format == "JPEG" and (im.info.get("progressive") or im.info.get("progression")):
            layers = getattr(im, "layer", None) or [(None, 1, 1, None)]
            hmax, vmax = max(la[1] for la in layers), max(la[2] for la in layers)
            per_pixel = 2 * sum(la[1] * la[2] for la in layers) / (hmax * vmax)
            return DecodeCost(im.size[0], im.size[1], im.mode, per_pixel, "progressive JPEG")
        if im.format == "JPEG":
            im.draft("RGB", (draft_to, draft_to))
        bpp = peak_bytes_per_pixel(im.mode, "transparency" in im.info)
        return DecodeCost(im.size[0], im.size[1], im.mode, bpp, im.format)
    finally:
        im.close()


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
        m.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.state.release_body(scope)
            m.in_flight.dec()
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            m.requests.labels(label, scope.get("method", ""), str(status[0])).inc()
            m.latency.labels(label).observe(time.perf_counter() - start)


# ----------------------------------------------------------------------------- app

_PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                 "description": "one or several photos (JPEG, PNG, WebP, ...)"},
        "top_k": {"type": "integer", "description": "labels per class task (default 5)"},
        "title": {"type": "array", "items": {"type": "string"},
                  "description": "product titles, one per file (models trained with --text)"}}}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}
BODY_MODELS = (S.TFPredictRequest, S.KServeInferRequest)  # request schemas added to the OpenAPI components


def _json_body(model, **more_content) -> dict:
    """``openapi_extra`` for a route that reads its JSON body itself (byte and time limits first)."""
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}, **more_content}
    return {"requestBody": {"required": True, "content": content}}


_TF_BODY = _json_body(S.TFPredictRequest)
_KS_BODY = _json_body(S.KServeInferRequest, **{"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"},
    "description": "binary tensor extension: JSON header of Inference-Header-Content-Length bytes, then the data"}})


def _errors(*statuses: int) -> dict:
    """``responses=`` documenting the error body for these statuses."""
    what = {400: "bad request (bad_json, bad_request, bad_parameter, bad_base64, ...)", 404: "unknown model",
            408: "the body did not arrive in time", 413: "too large (body, images, decoded pixels)",
            415: "unsupported Content-Type", 422: "a photo that cannot be used (not_an_image, truncated, ...)",
            503: "overloaded (Retry-After) or not ready"}
    return {s: {"model": S.ErrorResponse, "description": what.get(s, "error")} for s in statuses}


PREDICT_ERRORS = _errors(400, 408, 413, 415, 422, 503)


def create_app(settings: ServeSettings):
    """The FastAPI app serving ``settings.model_dir`` (the model loads in the app's lifespan)."""
    from fastapi import FastAPI, Query
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from catalens.serve.connections import configure

    configure(head_timeout=settings.head_timeout, max_connections=settings.max_connections)
    state = ServerState(settings)

    @asynccontextmanager
    async def lifespan(app):
        await state.startup()
        try:
            yield
        finally:
            await state.shutdown()

    from importlib.metadata import version

    app = FastAPI(title="catalens", version=version("catalens"), lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Product photos to categories and tags. Errors are "
                              "`{\"error\": {\"code\": ..., \"message\": ...}}` with a 4xx status "
                              "(503 with Retry-After when overloaded).")
    app.state.catalens = state
    app.add_middleware(MetricsMiddleware, state=state)
    _offline_docs(app)

    def error_response(status: int, code: str, message: str, headers: dict | None = None, **extra) -> JSONResponse:
        state.metrics.errors.labels(code).inc()
        headers = dict(headers or {})
        if status in (408, 413):
            headers["Connection"] = "close"   # the rest of the body is not read
        return JSONResponse({"error": {"code": code, "message": message, **extra}}, status_code=status,
                            headers=headers or None)

    @app.exception_handler(P.ApiError)
    async def _api_error(request, exc: P.ApiError):
        return error_response(exc.status, exc.code, exc.message, headers=exc.headers, **exc.extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        msg = {404: f"no route {request.method} {request.url.path}; see /docs for the endpoints",
               405: f"{request.method} is not allowed on {request.url.path}; see /docs"}.get(exc.status_code,
                                                                                             str(exc.detail))
        return error_response(exc.status_code, code, msg)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return error_response(400, "bad_parameter", "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                                               for e in exc.errors()))

    @app.exception_handler(Exception)
    async def _internal(request, exc):
        return error_response(500, "internal", f"internal error ({type(exc).__name__}); this is a bug, "
                                               f"please report it")

    async def body(request: Request) -> bytes:
        state.check_ready()
        from starlette.requests import ClientDisconnect

        expect = request.headers.get("expect", "").lower() == "100-continue"
        state.reserve_body(request.scope, request.headers.get("content-length"))
        try:
            return await asyncio.wait_for(P.read_limited(request.stream(), settings.max_upload_bytes,
                                                         request.headers.get("content-length"),
                                                         expect_continue=expect), settings.body_timeout)
        except asyncio.TimeoutError:
            raise P.ApiError(408, "body_timeout", f"the request body did not arrive within {settings.body_timeout:g} "
                                                  f"s (server option --body-timeout); send it faster or in smaller "
                                                  f"requests") from None
        except ClientDisconnect:
            raise P.ApiError(499, "client_closed_request", "the client closed the connection before sending "
                                                           "the whole body") from None

    # ---------------------------------------------------------------- catalens API
    @app.post("/v1/predict", openapi_extra=_PREDICT_BODY, tags=["catalens"], response_model=S.PredictResponse,
              response_model_exclude_unset=True, responses=PREDICT_ERRORS,
              summary="Predict categories and tags for one or several photos")
    async def predict(request: Request,
                      top_k: str | None = Query(None, description="labels per class task, 1-1000 (default: the "
                                                                  "server's --top-k)"),
                      title: str | None = Query(None, description="the product title of a single photo"),
                      explain: bool = Query(False, description="add a Grad-CAM overlay PNG (base64) of each photo, "
                                                               "at the photo's size; needs torch on the server"),
                      explain_task: str | None = Query(None, description="the class task explained (default: "
                                                                         "the first)")):
        t0 = time.perf_counter()
        task = state.explain_task(explain_task) if explain or explain_task else None
        data = await body(request)
        uploads, fields = await _off_loop(lambda b: P.parse_predict_body(b, request.headers.get("content-type"),
                                                                         settings.max_images), data)
        k = P.parse_top_k(top_k if top_k is not None else fields.get("top_k"), settings.top_k)
        sent = fields.get("titles") if "titles" in fields else ([title] if title is not None else None)
        titles = P.check_titles(sent, len(uploads))
        results = await state.predict([u.data for u in uploads], [u.name for u in uploads])
        ans = await state.answers_async(results, k, titles)
        images = [{"index": i, "file": u.name, **state.decoder.record(ans, i), "timings": timings}
                  for i, (u, (_, timings)) in enumerate(zip(uploads, results))]
        if task is not None:
            for img, u, j in zip(images, uploads, ans.label[task]):
                img["explain"] = await state.explain(u.data, task, int(j))
        out = {"model": state.name, "images": images,
               "timings": {"total_ms": round((time.perf_counter() - t0) * 1000.0, 2)}}
        if titles is not None:
            out["titles"] = state.titles_note(titles)
        return out

    # ---------------------------------------------------------------- TF-Serving REST
    @app.get("/v1/models/{name}", tags=["tf-serving"], summary="Model status (TF-Serving)",
             response_model=S.TFModelStatus, responses=_errors(404))
    async def tf_status(name: str):
        state.check_name(name)
        ok = state.ready
        return {"model_version_status": [{"version": "1", "state": "AVAILABLE" if ok else "LOADING",
                                          "status": {"error_code": "OK", "error_message": ""}}]}

    @app.get("/v1/models/{name}/metadata", tags=["tf-serving"], summary="Model metadata: tasks, classes",
             response_model=S.TFModelMetadata, responses=_errors(404, 503))
    async def tf_metadata(name: str):
        state.check_name(name)
        state.check_ready()
        return {"model_spec": {"name": state.name, "version": "1"},
                "metadata": {"catalens": state.model.description}}

    @app.post("/v1/models/{name}:predict", openapi_extra=_TF_BODY, tags=["tf-serving"],
              response_model=S.TFPredictResponse, response_model_exclude_unset=True,
              responses={**PREDICT_ERRORS, **_errors(404)},
              summary="TF-Serving REST predict: {\"instances\": [{\"b64\": ...}]}")
    async def tf_predict(name: str, request: Request):
        state.check_name(name)
        images, fmt, titles = await _off_loop(lambda b: P.parse_tf_request(b, settings.max_images), await body(request))
        results = await state.predict(images)
        return P.tf_response(state.decoder, await state.answers_async(results, 1, titles), fmt)

    # ---------------------------------------------------------------- KServe v2 / Open Inference Protocol
    @app.get("/v2", tags=["kserve-v2"], summary="Server metadata", response_model=S.ServerMetadata)
    async def v2_server():
        return {"name": "catalens", "version": version("catalens"), "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live", tags=["kserve-v2"], response_model=S.Live, summary="Liveness (GET or HEAD)")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready", tags=["kserve-v2"], response_model=S.Ready,
             responses={503: {"model": S.Ready, "description": "not ready yet"}}, summary="Readiness (GET or HEAD)")
    async def ready():
        if not state.ready:
            return JSONResponse({"ready": False}, status_code=503)
        return {"ready": True}

    @app.get("/v2/models/{name}", tags=["kserve-v2"], summary="Model metadata", response_model=S.KServeModelMetadata,
             responses=_errors(404, 503))
    async def v2_metadata(name: str):
        state.check_name(name)
        state.check_ready()
        return P.kserve_metadata(state.name, state.model.tasks, state.model.description, state.text is not None,
                                 state.decoder)

    @app.get("/v2/models/{name}/ready", tags=["kserve-v2"], response_model=S.ModelReady,
             responses={**_errors(404), 503: {"model": S.ModelReady, "description": "not ready yet"}})
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
        results = await state.predict(images)
        ans = await state.answers_async(results, 1, titles)
        out = P.kserve_response(state.name, state.decoder, ans, doc)
        if titles is not None:
            out["parameters"] = {"titles": state.titles_note(titles)}
        return out

    @app.post("/v2/models/{name}/infer", openapi_extra=_KS_BODY, tags=["kserve-v2"],
              response_model=S.KServeInferResponse, response_model_exclude_unset=True,
              responses={**PREDICT_ERRORS, **_errors(404)},
              summary="Open Inference Protocol infer: one BYTES input of encoded photos")
    async def v2_infer(name: str, request: Request):
        return await v2_infer_impl(name, request)

    @app.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=_KS_BODY, tags=["kserve-v2"],
              response_model=S.KServeInferResponse, response_model_exclude_unset=True, include_in_schema=False)
    async def v2_infer_version(name: str, version: str, request: Request):
        return await v2_infer_impl(name, request, version)

    # ---------------------------------------------------------------- operations
    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics (text exposition format)")
    async def metrics():
        state._queue_gauge()
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def index():
        html = (STATIC / "index.html").read_text(encoding="utf-8")
        cfg = {"name": state.name, "tasks": [t.to_dict() for t in state.model.tasks] if state.model else [],
               "max_upload_mb": settings.max_upload_mb, "max_images": settings.max_images,
               "titles": state.text is not None}
        return HTMLResponse(html.replace("/*CATALENS_CONFIG*/null", script_json(cfg)))

    _head_routes(app)
    _openapi_with_body_models(app)
    return app


def script_json(value) -> str:
    """JSON that is safe inside an HTML ``<script>`` element: ``<``, ``>``, ``&`` (and U+2028/9, by
    ``ensure_ascii``) are written as ``\\u`` escapes, so no string in it can close the element, open a
    comment (``<!--``) or start a new ``<script>``; JavaScript reads the same values back."""
    text = json.dumps(value, ensure_ascii=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _offline_docs(app) -> None:
    """``/docs`` (Swagger UI) and ``/redoc`` served with their scripts from the installed
    ``fastapi-offline`` package, under ``/docs-assets``: the pages work without internet."""
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
    from fastapi.responses import HTMLResponse
    from fastapi.staticfiles import StaticFiles

    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=str(docs_assets_dir())), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - API docs",
                                   swagger_js_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui.css",
                                   swagger_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png")

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - API reference",
                              redoc_js_url=f"{root}{DOCS_ASSETS_URL}/redoc.standalone.js",
                              redoc_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png", with_google_fonts=False)


def docs_assets_dir() -> Path:
    """The Swagger UI / ReDoc files shipped by ``fastapi-offline`` (Swagger UI: Apache-2.0, ReDoc: MIT)."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).with_name("static")


def _head_routes(app) -> None:
    """``HEAD`` on every ``GET`` route (health checks, load balancers), kept out of the OpenAPI schema."""
    from fastapi.routing import APIRoute

    for route in [r for r in app.routes if isinstance(r, APIRoute) and r.methods == {"GET"}]:
        app.add_api_route(route.path, route.endpoint, methods=["HEAD"], include_in_schema=False,
                          response_model=None, name=f"{route.name}_head")


def _openapi_with_body_models(app) -> None:
    """The JSON request bodies (read by the routes themselves, after the byte and time limits) get
    their pydantic schemas in ``components.schemas``, where ``openapi_extra`` points."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for ops in schema.get("paths", {}).values():   # bad parameters are 400 bad_parameter here, not 422
                for op in ops.values():
                    if "HTTPValidationError" in json.dumps(op.get("responses", {}).get("422", {})):
                        del op["responses"]["422"]
            comps.pop("HTTPValidationError", None)
            comps.pop("ValidationError", None)
            for model in BODY_MODELS:
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(js.pop("$defs", {}))
                comps[model.__name__] = js
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def create_app_from_env():
    """uvicorn factory for ``--workers N`` (settings come from ``$CATALENS_SERVE_SETTINGS``)."""
    text = os.environ.get(SETTINGS_ENV)
    if not text:
        raise RuntimeError(f"{SETTINGS_ENV} is not set; start the server with 'catalens serve MODEL'")
    return create_app(ServeSettings.from_json(text))


def run_server(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
               graceful_timeout: float = 30.0) -> None:
    """Run uvicorn (one process, or ``settings.workers`` processes sharing the port, their metrics
    in a shared ``PROMETHEUS_MULTIPROC_DIR``) with the connection guards of
    :class:`catalens.serve.connections.GuardedH11Protocol`."""
    import signal
    import threading

    import uvicorn

    from catalens.serve.connections import LIMITS, GuardedH11Protocol

    if threading.current_thread() is threading.main_thread():
        # uvicorn finishes in-flight requests on SIGTERM, then re-raises the signal: exit 0 then
        signal.signal(signal.SIGTERM, _exit_cleanly)
    kw = dict(host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_timeout,
              access_log=False, limit_concurrency=None, timeout_keep_alive=5, http=GuardedH11Protocol,
              h11_max_incomplete_event_size=LIMITS.max_head_bytes)
    if settings.workers > 1:
        os.environ[SETTINGS_ENV] = settings.to_json()
        with multiprocess_metrics_dir():
            uvicorn.run("catalens.serve.app:create_app_from_env", factory=True, workers=settings.workers, **kw)
    else:
        uvicorn.run(create_app(settings), **kw)


@contextmanager
def multiprocess_metrics_dir():
    """``PROMETHEUS_MULTIPROC_DIR`` for the workers: a fresh temporary folder, removed at exit; or the
    folder the environment names, cleared of the metric files of earlier runs (``*.db`` only)."""
    import re
    import shutil
    import tempfile

    from catalens.serve.metrics import MULTIPROC_ENV

    given = os.environ.get(MULTIPROC_ENV)
    if given:
        folder = Path(given)
        folder.mkdir(parents=True, exist_ok=True)
        stale = [f for f in folder.iterdir() if re.fullmatch(r"(counter|gauge_\w+|histogram|summary)_\d+\.db", f.name)]
        for f in stale:
            f.unlink()
        if stale:
            log.info("removed %d metric files of an earlier run from %s", len(stale), folder)
        yield folder
        return
    folder = Path(tempfile.mkdtemp(prefix="catalens-metrics-"))
    os.environ[MULTIPROC_ENV] = str(folder)
    try:
        yield folder
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(folder, ignore_errors=True)


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(0)
