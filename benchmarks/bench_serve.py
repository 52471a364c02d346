"""Serving benchmark: HTTP server vs in-process ONNX Runtime, abuse run, int8 vs fp32.

    python benchmarks/bench_serve.py [--model DIR] [--seconds 60] [--clients 16] [--abuse-seconds 20]

Loopback only (the server binds 127.0.0.1 on a free port and is always stopped). Steps:

1. In-process baselines on the clothing-small test photos, same thread count as the server:
   batched ONNX Runtime inference on decoded photos (batch 32), decode + batched inference
   (the same work the server does, minus HTTP), and single-photo latency (decode + batch of 1).
2. ``catalens serve`` in a subprocess (default batching: --max-batch 32 --max-wait-ms 5).
3. Idle latency: one request at a time (p50, p99) vs in-process single-photo latency.
4. Load: ``--clients`` concurrent keep-alive clients posting raw JPEG bodies for ``--seconds``;
   every answer's top label is checked against in-process ONNX Runtime. Throughput vs (1).
5. Abuse: every kind of bad input (empty, non-image, truncated, bomb, wrong type, too large,
   chunked too large, unknown model, bad JSON, bad base64, wrong datatype, JSON nested 100,000
   levels, junk KServe fields, a 16-bit 9400 x 9400 PNG, an 8000 x 8000 progressive JPEG) in a
   loop mixed with good requests; each must get its 4xx code, every good one the right answer,
   no 5xx, and the server must be ready afterwards.
6. Hostile clients: slow clients (half a head, half a body: closed within the timeouts), a 1 MB
   query string (414), a 40 KB header (431), eight 16-bit 9400 x 9400 PNGs in one request (413,
   timed), and an overload burst (``--overload-clients`` clients posting 8 photos each): every
   answer 200 or 503 + Retry-After, 503s counted. The server's memory (RSS) is sampled all along.
7. int8 vs fp32 (``catalens export --int8``) on the whole clothing-small test split.

The model defaults to a linear head on EfficientNet-Lite0 trained on clothing-small, cached in
``~/.cache/catalens/bench/clothing-model`` (trained on first use, a few minutes, not counted).
Tables are printed and stored in docs/benchmarks.md (section ``bench_serve``).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import SHARED_DATA, publish, table  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CACHE_MODEL = Path(os.environ.get("CATALENS_CACHE", Path.home() / ".cache" / "catalens")) / "bench" / "clothing-model"


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if len(xs) else float("nan")


def loadavg() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


# ----------------------------------------------------------------------------- model and photos

def ensure_model(path: Path, data: Path) -> Path:
    if (path / "model.json").exists():
        return path
    from catalens.config import load_config
    from catalens.train.pipeline import train

    log(f"training the benchmark model on {data} into {path} (once; cached)")
    train(data, path, load_config(None, [{"engine": {"progress": False}}]), log=log)
    return path


def test_photos(data: Path) -> list[bytes]:
    files = sorted(p for p in (data / "test").rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return [f.read_bytes() for f in files]


# ----------------------------------------------------------------------------- in-process baselines

class InProcess:
    """The same graph in this process, with the server's thread count."""

    def __init__(self, onnx_path: Path, photos: list[bytes], threads: int) -> None:
        from catalens.export.onnx import OnnxModel
        from catalens.ingest.images import load_rgb

        self.photos, self.threads = photos, threads
        self.m = OnnxModel(onnx_path, threads=threads)
        # no busy-waiting threads while the server is measured next to it (the server runs this way too)
        self.quiet = OnnxModel(onnx_path, threads=threads, spin=False)
        self.pre = self.m.preprocess
        self.load_rgb = load_rgb
        self.pixels = np.stack([load_rgb(b, self.pre) for b in photos])
        probs = self.m.run_hwc(self.pixels)
        first = self.m.tasks[0]
        self.task = first.name
        self.tops = [first.classes[j] for j in probs[first.name].argmax(1)]

    def throughput(self, seconds: float) -> tuple[float, float]:
        """(batched inference on decoded photos, decode in a thread pool + batched inference) img/s."""
        from catalens.export.onnx import to_nchw

        m, pre = self.m, self.pre
        x = to_nchw(np.resize(self.pixels, (32,) + self.pixels.shape[1:]))
        m.run(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            m.run(x)
            n += 32
        infer_ips = n / (time.perf_counter() - t0)
        with ThreadPoolExecutor(max(1, min(4, self.threads))) as pool:
            n, t0, i = 0, time.perf_counter(), 0
            while time.perf_counter() - t0 < seconds:
                chunk = [self.photos[(i + k) % len(self.photos)] for k in range(32)]
                i += 32
                px = np.stack(list(pool.map(lambda b: self.load_rgb(b, pre), chunk)))
                m.run(to_nchw(px))
                n += 32
            pipe_ips = n / (time.perf_counter() - t0)
        return infer_ips, pipe_ips

    def single(self, b: bytes) -> tuple[float, float]:
        """ms for decode + batch of 1, and for the batch of 1 alone."""
        from catalens.export.onnx import to_nchw

        t = time.perf_counter()
        px = self.load_rgb(b, self.pre)[None]
        t1 = time.perf_counter()
        self.quiet.run(to_nchw(px))
        t2 = time.perf_counter()
        return (t2 - t) * 1000, (t2 - t1) * 1000


# ----------------------------------------------------------------------------- server process

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, extra: list[str]) -> subprocess.Popen:
    import httpx

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "catalens", "serve", str(model), "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "warning", *extra], env=env)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server not ready in 300 s")


def stop_server(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


# ----------------------------------------------------------------------------- a lean HTTP/1.1 client

class Conn:
    """One keep-alive connection; much cheaper on CPU than a full client (the server shares the CPUs)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: bytes = b"", ctype: str = "image/jpeg",
                      headers: dict | None = None) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\n{extra}\r\n").encode()
        try:
            self.writer.write(head + body)
            await self.writer.drain()
        except (ConnectionError, OSError):
            pass  # the server may refuse (413) and close before the body is sent: read its answer
        status_line = await self.reader.readline()
        if not status_line:
            await self.close()
            raise ConnectionError("connection closed without a response")
        status = int(status_line.split()[1])
        length, close = 0, False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            k = k.strip().lower()
            if k == "content-length":
                length = int(v)
            elif k == "connection" and v.strip().lower() == "close":
                close = True
        data = await self.reader.readexactly(length)
        if close:
            await self.close()
        return status, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except (ConnectionError, OSError):
                pass
        self.reader = self.writer = None


def top_label(body: bytes, task: str) -> str:
    return json.loads(body)["images"][0]["classes"][task][0]["label"]


async def idle_latency(port: int, local: InProcess, n: int) -> tuple[list[float], list[float], list[float]]:
    """One request at a time, interleaved with the same photo in process (both see the same machine load)."""
    c = Conn(port)
    server, inproc, infer1 = [], [], []
    photos = local.photos
    for k in range(n + 3):
        b = photos[(k * 7) % len(photos)]
        a, i1 = local.single(b)
        t = time.perf_counter()
        status, _ = await c.request("POST", "/v1/predict", b)
        dt = (time.perf_counter() - t) * 1000
        assert status == 200, status
        if k >= 3:  # the first few warm up the connection and the server's pools
            server.append(dt)
            inproc.append(a)
            infer1.append(i1)
    await c.close()
    return server, inproc, infer1


async def load_run(port: int, photos: list[bytes], tops: list[str], task: str, clients: int,
                   seconds: float) -> dict:
    lat, errors, wrong = [], [], 0
    stop = time.perf_counter() + seconds

    async def client(ci: int):
        nonlocal wrong
        c, k = Conn(port), ci * 13
        while time.perf_counter() < stop:
            i = k % len(photos)
            k += 1
            t = time.perf_counter()
            try:
                status, body = await c.request("POST", "/v1/predict", photos[i])
            except Exception as e:  # noqa: BLE001 - counted
                errors.append(f"{type(e).__name__}: {e}")
                await c.close()
                continue
            lat.append((time.perf_counter() - t) * 1000)
            if status != 200:
                errors.append(f"HTTP {status}: {body[:120]!r}")
            elif top_label(body, task) != tops[i]:
                wrong += 1
        await c.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - t0
    return {"requests": len(lat), "errors": errors, "wrong": wrong, "ips": len(lat) / elapsed,
            "p50": pct(lat, 50), "p99": pct(lat, 99), "seconds": elapsed}


# ----------------------------------------------------------------------------- abuse

def png_bomb(w: int = 40000, h: int = 40000) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


async def _chunks(data: bytes, size: int = 65536):
    for i in range(0, len(data), size):
        yield data[i:i + size]


def png16(width: int = 9400, height: int = 9400) -> bytes:
    """A 16-bit grayscale PNG (I;16), flat: 190 KB for 9400 x 9400 px (168 MiB decoded, 2.1 GiB to convert)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((height, width), 1000, dtype=np.uint16)).save(buf, "PNG")
    return buf.getvalue()


def progressive_jpeg(side: int = 8000) -> bytes:
    """A progressive 4:4:4 JPEG: decoding it holds every DCT coefficient (8000 px: 366 MiB), whatever the output size."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (120, 30, 200)).save(buf, "JPEG", progressive=True, quality=80, subsampling=0)
    return buf.getvalue()


_HOSTILE_FILES: dict[str, bytes] = {}


def hostile_file(kind: str) -> bytes:
    if kind not in _HOSTILE_FILES:
        _HOSTILE_FILES[kind] = png16() if kind == "png16" else progressive_jpeg()
    return _HOSTILE_FILES[kind]


def abuse_cases(photo: bytes, name: str, limit: int) -> list[tuple[str, dict, int, str]]:
    b64 = base64.b64encode(photo).decode()
    big = b"\xff\xd8" + os.urandom(limit + 1024)
    deep = b"[" * 100_000 + b"]" * 100_000
    ok = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}
    ks = f"/v2/models/{name}/infer"
    return [
        ("JSON nested 100,000 levels (TF-Serving)", dict(method="POST", url=f"/v1/models/{name}:predict", content=b'{"instances": ' + deep + b"}", headers={"content-type": "application/json"}), 400, "bad_json"),
        ("JSON nested 100,000 levels (KServe)", dict(method="POST", url=ks, content=deep, headers={"content-type": "application/json"}), 400, "bad_json"),
        ("KServe outputs: 5", dict(method="POST", url=ks, json={"inputs": [ok], "outputs": 5}), 400, "bad_request"),
        ("KServe parameters: 5", dict(method="POST", url=ks, json={"inputs": [ok], "parameters": 5}), 400, "bad_request"),
        ("KServe input parameters: [1]", dict(method="POST", url=ks, json={"inputs": [dict(ok, parameters=[1])]}), 400, "bad_request"),
        ("KServe shape [true]", dict(method="POST", url=ks, json={"inputs": [dict(ok, shape=[True])]}), 400, "bad_request"),
        ("16-bit PNG 9400x9400", dict(method="POST", url="/v1/predict", content=hostile_file("png16"), headers={"content-type": "image/png"}), 413, "decode_too_large"),
        ("progressive 4:4:4 JPEG 8000x8000", dict(method="POST", url="/v1/predict", content=hostile_file("progressive"), headers={"content-type": "image/jpeg"}), 413, "decode_too_large"),
        ("top_k=abc", dict(method="POST", url="/v1/predict?top_k=abc", content=photo, headers={"content-type": "image/jpeg"}), 400, "bad_parameter"),
        ("empty body", dict(method="POST", url="/v1/predict", content=b"", headers={"content-type": "image/jpeg"}), 400, "empty_body"),
        ("empty file", dict(method="POST", url="/v1/predict", files={"file": ("e.jpg", b"", "image/jpeg")}), 422, "empty"),
        ("not an image", dict(method="POST", url="/v1/predict", files={"file": ("x.jpg", b"GIF? no, text", "image/jpeg")}), 422, "not_an_image"),
        ("truncated JPEG", dict(method="POST", url="/v1/predict", content=photo[: len(photo) // 3], headers={"content-type": "image/jpeg"}), 422, "truncated"),
        ("decompression bomb", dict(method="POST", url="/v1/predict", content=png_bomb(), headers={"content-type": "image/png"}), 422, "decompression_bomb"),
        ("wrong content type", dict(method="POST", url="/v1/predict", content=photo, headers={"content-type": "text/plain"}), 415, "unsupported_media_type"),
        ("too large", dict(method="POST", url="/v1/predict", content=big, headers={"content-type": "image/jpeg"}), 413, "too_large"),
        ("too large, chunked", dict(method="POST", url="/v1/predict", content=_chunks(big), headers={"content-type": "image/jpeg"}), 413, "too_large"),
        ("unknown model", dict(method="POST", url="/v1/models/nope:predict", json={"instances": [{"b64": b64}]}), 404, "model_not_found"),
        ("malformed JSON", dict(method="POST", url=f"/v1/models/{name}:predict", content=b'{"instances": [', headers={"content-type": "application/json"}), 400, "bad_json"),
        ("bad base64", dict(method="POST", url=f"/v2/models/{name}/infer", json={"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]}), 400, "bad_base64"),
        ("URL instead of bytes", dict(method="POST", url=f"/v1/models/{name}:predict", json={"instances": [{"b64": "https://example.com/x.jpg"}]}), 400, "url_not_supported"),
        ("wrong datatype", dict(method="POST", url=f"/v2/models/{name}/infer", json={"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": [0.5]}]}), 400, "bad_request"),
    ]


async def abuse_run(base: str, photos: list[bytes], tops: list[str], task: str, name: str, limit: int,
                    seconds: float, workers: int = 6) -> dict:
    import httpx

    counts: dict[str, list[int]] = {}
    good = {"ok": 0, "wrong": 0, "failed": []}
    unexpected: list[str] = []
    stop = time.perf_counter() + seconds
    rng = random.Random(0)

    async def worker(w: int):
        async with httpx.AsyncClient(base_url=base, timeout=60) as c:
            while time.perf_counter() < stop:
                i = rng.randrange(len(photos))
                if rng.random() < 0.5:
                    r = await c.post("/v1/predict", content=photos[i], headers={"content-type": "image/jpeg"})
                    if r.status_code != 200:
                        good["failed"].append(f"{r.status_code} {r.text[:100]}")
                    elif top_label(r.content, task) == tops[i]:
                        good["ok"] += 1
                    else:
                        good["wrong"] += 1
                    continue
                label, kw, status, code = rng.choice(abuse_cases(photos[i], name, limit))
                try:
                    r = await c.request(**kw)
                    got = (r.status_code, r.json().get("error", {}).get("code"))
                except Exception as e:  # noqa: BLE001 - a refused request must still get its answer
                    got = (0, f"{type(e).__name__}: {e}")
                row = counts.setdefault(label, [0, 0, status])
                row[0] += 1
                if got == (status, code):
                    row[1] += 1
                else:
                    unexpected.append(f"{label}: expected {status}/{code}, got {got}")

    await asyncio.gather(*(worker(w) for w in range(workers)))
    async with httpx.AsyncClient(base_url=base, timeout=60) as c:
        ready = (await c.get("/v2/health/ready")).status_code == 200
        r = await c.post("/v1/predict", content=photos[0], headers={"content-type": "image/jpeg"})
        final_ok = r.status_code == 200 and top_label(r.content, task) == tops[0]
    return {"counts": counts, "good": good, "unexpected": unexpected, "ready": ready, "final_ok": final_ok}


def server_5xx(base: str) -> tuple[float, float]:
    """(5xx answers other than load shedding, 503 overloaded answers) since the server started."""
    import httpx

    from catalens.serve.metrics import parse_exposition

    m = parse_exposition(httpx.get(base + "/metrics", timeout=30).text)
    five = sum(v for (n, labels), v in m.items()
               if n == "catalens_requests_total" and dict(labels).get("status", "").startswith("5"))
    shed = sum(v for (n, labels), v in m.items()
               if n == "catalens_errors_total" and dict(labels).get("code") == "overloaded")
    return five - shed, shed


class RssSampler:
    """Samples a process's resident memory every 0.1 s in a thread: peak per phase, in MB."""

    def __init__(self, pid: int) -> None:
        import threading

        self.pid, self.phase, self.peaks = pid, "start", {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss_mb(self) -> float:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            v = self.rss_mb()
            if v == v:
                self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), v)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return self.peaks


async def _raw(port: int, data: bytes, timeout: float) -> tuple[bytes, float]:
    """Send ``data``, read until the server closes: (answer, seconds until closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.perf_counter()
    try:
        writer.write(data)
        await writer.drain()
        out = await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()
    return out, time.perf_counter() - t0


async def hostile_run(port: int, photos: list[bytes], timeout_s: float, clients: int, seconds: float) -> dict:
    """Slow clients, oversized heads, a 16-bit PNG burst in one request, and an overload burst."""
    import httpx

    out: dict = {"unexpected": []}

    def status_of(raw: bytes) -> int:
        return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0

    half_head = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Ty"
    half_body = (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n"
                 + photos[0][:1000])
    slow = await asyncio.gather(*([_raw(port, half_head, 10 * timeout_s) for _ in range(20)]
                                  + [_raw(port, half_body, 10 * timeout_s) for _ in range(20)]), return_exceptions=True)
    closed = [r for r in slow if not isinstance(r, BaseException)]
    out["slow"] = {"clients": len(slow), "closed": len(closed), "max_s": max((s for _, s in closed), default=float("nan")),
                   "statuses": sorted({status_of(raw) for raw, _ in closed})}
    for label, data, want in (("1 MB query string", b"GET /v2/health/live?q=" + b"a" * 2**20 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
                              ("40 KB header", b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-J: " + b"j" * 40_000 + b"\r\n\r\n", 431)):
        raw, _ = await _raw(port, data, 10)
        out[label] = status_of(raw)
        if status_of(raw) != want:
            out["unexpected"].append(f"{label}: expected {want}, got {raw[:80]!r}")
    files = [("file", (f"{i}.png", hostile_file("png16"), "image/png")) for i in range(8)]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
        t0 = time.perf_counter()
        r = await c.post("/v1/predict", files=files)
        out["png16_x8"] = (r.status_code, time.perf_counter() - t0)
        if r.status_code != 413:
            out["unexpected"].append(f"eight 16-bit PNGs: expected 413, got {r.status_code} {r.text[:100]}")
    counts: collections.Counter = collections.Counter()
    served = [0]
    t0 = time.perf_counter()
    stop = t0 + seconds

    async def client(ci: int):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            while time.perf_counter() < stop:
                files = [("file", (f"{k}.jpg", photos[(ci * 8 + k) % len(photos)], "image/jpeg")) for k in range(8)]
                try:
                    r = await c.post("/v1/predict", files=files)
                except httpx.HTTPError as e:
                    counts[f"error {type(e).__name__}"] += 1
                    continue
                counts[r.status_code] += 1
                if r.status_code == 200:
                    served[0] += 8
                elif r.status_code == 503 and r.headers.get("retry-after") == "1":
                    await asyncio.sleep(1.0)      # a polite client waits as told
                elif r.status_code == 503:
                    out["unexpected"].append("503 without Retry-After: 1")
                else:
                    out["unexpected"].append(f"overload: {r.status_code} {r.text[:100]}")

    await asyncio.gather(*(client(i) for i in range(clients)))
    out["overload"] = dict(counts)
    out["overload_ips"] = served[0] / (time.perf_counter() - t0)
    return out


# ----------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="model folder (default: clothing-small model, trained once and cached)")
    ap.add_argument("--seconds", type=float, default=60.0, help="load run length (default 60)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--abuse-seconds", type=float, default=20.0)
    ap.add_argument("--baseline-seconds", type=float, default=8.0)
    ap.add_argument("--overload-seconds", type=float, default=10.0)
    ap.add_argument("--overload-clients", type=int, default=48, help="clients posting 8 photos each (default 48)")
    ap.add_argument("--skip-int8", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="print only, do not update docs/benchmarks.md")
    args = ap.parse_args()

    from catalens.export.onnx import ensure_onnx
    from catalens.runtime import available_cpus

    data = SHARED_DATA / "clothing-small"
    if not data.exists():
        print(f"skipped: real photos not found at {data} (set CATALENS_SHARED_DATA)")
        return 0
    t_start = time.time()
    load_before = loadavg()
    model = ensure_model(args.model or CACHE_MODEL, data)
    onnx_path = ensure_onnx(model, log=log)
    photos = test_photos(data)
    threads = available_cpus()
    log(f"{len(photos)} test photos; {threads} CPUs; load average {load_before}")

    log("in-process baselines ...")
    local = InProcess(onnx_path, photos, threads)
    before = local.throughput(args.baseline_seconds)
    port = free_port()
    limit_mb = 2
    timeout_s = 3.0
    proc = start_server(model, port, ["--max-upload-mb", str(limit_mb), "--head-timeout", str(timeout_s),
                                      "--body-timeout", str(timeout_s)])
    rss = RssSampler(proc.pid)
    try:
        log("idle latency ...")
        rss.phase = "idle and load"
        idle, single, infer1 = asyncio.run(idle_latency(port, local, 60))
        log(f"load: {args.clients} clients for {args.seconds:.0f} s ...")
        load = asyncio.run(load_run(port, photos, local.tops, local.task, args.clients, args.seconds))
        log("abuse ...")
        rss.phase = "abuse"
        hostile_file("png16"), hostile_file("progressive")
        abuse = asyncio.run(abuse_run(f"http://127.0.0.1:{port}", photos, local.tops, local.task,
                                      model.resolve().name, limit_mb * 2**20, args.abuse_seconds))
        log("hostile clients and overload ...")
        rss.phase = "hostile clients and overload"
        hostile = asyncio.run(hostile_run(port, photos, timeout_s, args.overload_clients, args.overload_seconds))
        five_xx, shed = server_5xx(f"http://127.0.0.1:{port}")
        rss.phase = "after"
        idle_after, single_after, _ = asyncio.run(idle_latency(port, local, 20))
    finally:
        peaks = rss.stop()
        rc = stop_server(proc)
    after = local.throughput(args.baseline_seconds)
    load_after = loadavg()
    base = {"infer_ips": (before[0] + after[0]) / 2, "pipeline_ips": (before[1] + after[1]) / 2,
            "single_p50": pct(single, 50), "single_p99": pct(single, 99), "infer1_p50": pct(infer1, 50),
            "task": local.task}

    ratio_pipe = load["ips"] / base["pipeline_ips"]
    ratio_infer = load["ips"] / base["infer_ips"]
    lat_ratio = pct(idle, 50) / base["single_p50"]
    body = [f"Model: `{model.name}` (EfficientNet-Lite0 + linear head, 224 px), ONNX Runtime fp32, {threads} threads; "
            f"clothing-small test photos ({len(photos)}, 400-888 px JPEG). Server: `catalens serve` defaults "
            f"(max batch 32, max wait 5 ms), one worker, loopback. Load average before / after: "
            f"{load_before} | {load_after} (the machine is shared: other processes compete for the CPUs).", "",
            "### Throughput", "",
            table(["setting", "img/s", "server / this"],
                  [["in-process ORT, batch 32, decoded photos (inference only)", base["infer_ips"], f"{ratio_infer:.0%}"],
                   ["in-process decode (thread pool) + ORT batch 32 (the server's work, no HTTP)", base["pipeline_ips"],
                    f"{ratio_pipe:.0%}"],
                   [f"server, {args.clients} concurrent clients, {load['seconds']:.0f} s", load["ips"], "100%"]]), "",
            f"Server under load: {load['requests']} requests, {len(load['errors'])} errors, {load['wrong']} answers "
            f"different from in-process ONNX Runtime; latency p50 {load['p50']:.0f} ms, p99 {load['p99']:.0f} ms. "
            f"Target: >= 80% of the in-process decode + batched inference throughput: "
            f"**{'met' if ratio_pipe >= 0.8 else 'NOT met'}** ({ratio_pipe:.0%}).", "",
            "### Latency, one request at a time", "",
            table(["setting", "p50 ms", "p99 ms"],
                  [["in-process: decode + ORT batch of 1", base["single_p50"], base["single_p99"]],
                   ["in-process: ORT batch of 1 only", base["infer1_p50"], float("nan")],
                   ["server, idle, one photo per request (raw body)", pct(idle, 50), pct(idle, 99)],
                   ["server, idle, after the load and abuse runs", pct(idle_after, 50), pct(idle_after, 99)],
                   ["in-process decode + batch of 1, interleaved with the line above", pct(single_after, 50),
                    pct(single_after, 99)]]), "",
            f"Idle server p50 / in-process p50 = {lat_ratio:.2f}x (target <= 1.5x: "
            f"**{'met' if lat_ratio <= 1.5 else 'NOT met'}**).", "",
            "### Abuse run", "",
            f"{args.abuse_seconds:.0f} s, 6 concurrent clients, half good photos, half bad inputs "
            f"(upload limit {limit_mb} MiB):", "",
            table(["bad input", "sent", "right status + code", "status"],
                  [[k, v[0], v[1], v[2]] for k, v in sorted(abuse["counts"].items())]), "",
            f"Good requests: {abuse['good']['ok']} answered correctly, {abuse['good']['wrong']} wrong, "
            f"{len(abuse['good']['failed'])} failed. Unexpected answers to bad inputs: {len(abuse['unexpected'])}. "
            f"Server ready afterwards: {abuse['ready']}; a final photo answered correctly: {abuse['final_ok']}.", "",
            "### Hostile clients and overload", "",
            f"Slow clients: {hostile['slow']['clients']} connections (half a head, or a head and 1 KB of a 100 KB "
            f"body), head and body timeouts {timeout_s:g} s: {hostile['slow']['closed']} closed by the server, the "
            f"last after {hostile['slow']['max_s']:.1f} s, answers {hostile['slow']['statuses']} (408). "
            f"1 MB query string: {hostile['1 MB query string']}; 40 KB header: {hostile['40 KB header']}. "
            f"Eight 16-bit 9400 x 9400 PNGs (190 KB each, 2.1 GiB each to decode) in one request: "
            f"{hostile['png16_x8'][0]} in {hostile['png16_x8'][1] * 1000:.0f} ms.", "",
            f"Overload: {args.overload_clients} clients posting 8 photos each for {args.overload_seconds:.0f} s "
            f"(--max-queue 256 images), each waiting 1 s after a 503 as its Retry-After says: answers "
            f"{hostile['overload']}, {hostile['overload_ips']:.0f} img/s served meanwhile; every 503 carried "
            f"Retry-After: {not any('Retry-After' in u for u in hostile['unexpected'])}.", "",
            f"Over the whole server run: **{five_xx:.0f} 5xx answers other than load shedding**, {shed:.0f} "
            f"requests shed with 503 overloaded; graceful shutdown exit code {rc}.", "",
            table(["phase", "peak server RSS MB"], [[k, v] for k, v in peaks.items() if k != "start"])]
    problems = load["errors"][:5] + abuse["unexpected"][:5] + abuse["good"]["failed"][:5] + hostile["unexpected"][:5]
    if problems:
        body += ["", "First problems seen: " + "; ".join(problems)]

    if not args.skip_int8:
        from catalens.export.quantize import quantize_int8

        log("int8 ...")
        r = quantize_int8(model, calibration=data, n_calibration=128, eval_limit=None, speed_seconds=6, log=log)
        t = r["tasks"][base["task"]]
        body += ["", "### int8 (static QDQ) vs fp32", "",
                 f"`catalens export --int8`: calibrated on {r['calibration_images']} training photos; measured on the "
                 f"whole {r['split']} split ({r['images']} photos); weights int8 per channel"
                 f"{' (7-bit, reduce_range: no VNNI on this CPU)' if r['reduce_range'] else ''}, activations uint8.", "",
                 table(["graph", "accuracy", "top-1 agreement with fp32", "img/s (batch 32)", "size MB"],
                       [["fp32", t.get("accuracy_fp32", float("nan")), 1.0, r["throughput_fp32_ips"], r["fp32_bytes"] / 1e6],
                        ["int8", t.get("accuracy_int8", float("nan")), t["top1_agreement"], r["throughput_int8_ips"],
                         r["bytes"] / 1e6]]), "",
                 f"Accuracy drop {t.get('accuracy_drop', float('nan')) * 100:+.1f} points (fp32 - int8); "
                 f"speed-up x{r['speedup']:.2f}."]
    body += ["", f"Total benchmark time {time.time() - t_start:.0f} s."]
    text = "\n".join(body)
    publish("bench_serve", "Serving (HTTP server vs in-process ONNX Runtime)", text, write=not args.no_write)
    ok = not load["errors"] and not abuse["unexpected"] and not abuse["good"]["failed"] and abuse["ready"] \
        and abuse["final_ok"] and five_xx == 0 and load["wrong"] == 0 and abuse["good"]["wrong"] == 0 \
        and not hostile["unexpected"] and hostile["slow"]["closed"] == hostile["slow"]["clients"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
