"""catalens serve MODEL [--host 127.0.0.1] [--port 8000] [--workers N] ..."""
from __future__ import annotations


def register(sub) -> None:
    from catalens.commands._common import nonneg_float, port_int, positive_float, positive_int

    p = sub.add_parser("serve", help="serve a model over HTTP (ONNX Runtime, micro-batched)",
                       description="Serve MODEL over HTTP: POST /v1/predict (multipart or raw image), TF-Serving "
                                   "POST /v1/models/NAME:predict, KServe v2 POST /v2/models/NAME/infer, health, "
                                   "GET /metrics (Prometheus), a web page at / and OpenAPI docs at /docs. The "
                                   "ONNX graph is exported first when MODEL has none. Binds 127.0.0.1 unless "
                                   "--host says otherwise.")
    p.add_argument("model", help="model folder (from 'catalens train')")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                                                       "0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=port_int, default=8000)
    p.add_argument("--workers", type=positive_int, default=1, help="server processes (each loads the model)")
    p.add_argument("--name", help="model name in URLs (default: the folder's name)")
    p.add_argument("--int8", action="store_true", help="serve MODEL/model.int8.onnx ('catalens export --int8')")
    p.add_argument("--onnx", metavar="FILE", help="serve this exported graph instead of MODEL/model.onnx")
    p.add_argument("--max-batch", type=positive_int, default=32, help="images per inference batch (default 32)")
    p.add_argument("--max-wait-ms", type=nonneg_float, default=5.0,
                   help="how long a batch waits for more images when more are on their way (default 5)")
    p.add_argument("--max-upload-mb", type=positive_float, default=20.0, help="request body limit in MiB (default 20)")
    p.add_argument("--max-images", type=positive_int, default=64, help="images per request (default 64)")
    p.add_argument("--max-pixels", type=positive_int, help="decompression-bomb limit in pixels (default ~89 M)")
    p.add_argument("--threads", type=positive_int, help="ONNX Runtime threads per worker (default CPUs / workers)")
    p.add_argument("--decode-threads", type=positive_int, help="decode threads per worker (default CPUs, at most 4)")
    p.add_argument("--top-k", type=positive_int, default=5, help="labels per class task in /v1/predict (default 5)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--max-decode-mb", type=float, default=256.0,
                   help="memory one photo may take to decode, in MiB: width x height x bytes per pixel at the "
                        "decoder's peak (6 for RGB, 20 with alpha, 25 for 16-bit) (default 256); bigger photos get "
                        "413 before they are decoded (baseline JPEGs count after the decoder's 1/2-1/8 "
                        "downscaling, progressive ones their DCT coefficients)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="images decoding or waiting for a batch, per worker, beyond which requests get 503 "
                        "with Retry-After (default 256; at least --max-images)")
    p.add_argument("--max-inflight-mb", type=float, default=256.0,
                   help="request bodies held in memory at once, per worker, in MiB, beyond which requests get "
                        "503 with Retry-After (default 256; at least --max-upload-mb)")
    p.add_argument("--max-connections", type=int, default=256,
                   help="open connections per worker beyond which new ones get 503 (default 256)")
    p.add_argument("--head-timeout", type=float, default=10.0,
                   help="seconds a client has to send a request's head (default 10); then 408 and closed")
    p.add_argument("--body-timeout", type=float, default=60.0,
                   help="seconds a client has to send a request's body (default 60); then 408 and closed")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from catalens.export.onnx import ensure_onnx
    from catalens.ingest.images import DEFAULT_MAX_PIXELS
    from catalens.serve.app import ServeSettings, run_server

    model = Path(args.model)
    if not (model / "model.json").exists():
        raise FileNotFoundError(f"'{model}' is not a catalens model folder (no model.json); "
                                f"create one with 'catalens train DATA --out {model}'")
    for flag, v, lo in (("--max-batch", args.max_batch, 1), ("--workers", args.workers, 1),
                        ("--max-images", args.max_images, 1), ("--top-k", args.top_k, 1),
                        ("--max-connections", args.max_connections, 1), ("--max-queue", args.max_queue, 1)):
        if v < lo:
            raise ValueError(f"{flag} must be >= {lo}, got {v}")
    if args.max_upload_mb <= 0 or args.max_wait_ms < 0:
        raise ValueError("--max-upload-mb must be > 0 and --max-wait-ms >= 0")
    for flag, v in (("--max-decode-mb", args.max_decode_mb), ("--head-timeout", args.head_timeout),
                    ("--body-timeout", args.body_timeout)):
        if not v > 0:
            raise ValueError(f"{flag} must be > 0, got {v}")
    if args.max_inflight_mb < args.max_upload_mb:
        raise ValueError(f"--max-inflight-mb ({args.max_inflight_mb:g}) must be at least --max-upload-mb "
                         f"({args.max_upload_mb:g}): otherwise a request of the allowed size could never be served")
    if args.max_queue < args.max_images:
        raise ValueError(f"--max-queue ({args.max_queue}) must be at least --max-images ({args.max_images}): "
                         f"otherwise a request with --max-images photos could never be served")
    if not args.onnx and not args.int8:
        ensure_onnx(model)  # once, before any worker starts
    settings = ServeSettings(model_dir=str(model), name=args.name, onnx=args.onnx, int8=args.int8,
                             max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_upload_mb=args.max_upload_mb,
                             max_images=args.max_images, max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
                             threads=args.threads, decode_threads=args.decode_threads, workers=args.workers,
                             top_k=args.top_k, max_decode_mb=args.max_decode_mb, max_queue=args.max_queue,
                             max_connections=args.max_connections, head_timeout=args.head_timeout,
                             body_timeout=args.body_timeout, max_inflight_mb=args.max_inflight_mb)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {args.host}: the server is reachable from other machines (no authentication)")
    print(f"serving {settings.name or model.resolve().name} on http://{args.host}:{args.port} "
          f"(web page /, API docs /docs, metrics /metrics)", flush=True)
    run_server(settings, host=args.host, port=args.port, log_level=args.log_level)
    return 0
