"""Prometheus metrics for the server, kept by ``prometheus_client``.

Exposed at ``GET /metrics``:

- ``catalens_requests_total{route,method,status}``  requests answered (route = the route's path
  template, ``unmatched`` for unknown paths)
- ``catalens_request_duration_seconds{route}``       latency histogram (request start → response sent)
- ``catalens_errors_total{code}``                    error responses by error code (``too_large``, ...)
- ``catalens_images_total``                          images predicted
- ``catalens_shed_total``                            requests refused with 503 because the queue was full
- ``catalens_batch_size``                            images per inference batch (histogram)
- ``catalens_inference_duration_seconds``            ONNX Runtime time per batch (histogram)
- ``catalens_decode_duration_seconds``               decode + resize time per image (histogram)
- ``catalens_queue_wait_seconds``                    time an image waited for its batch (histogram)
- ``catalens_in_flight_requests``, ``catalens_queue_depth``, ``catalens_ready``, ``catalens_model_info``

With ``PROMETHEUS_MULTIPROC_DIR`` set (``catalens serve --workers N`` sets it to a fresh folder)
every worker writes its values there and a scrape of any worker sums all of them
(``prometheus_client`` multiprocess mode): counters and histograms add up, the in-flight and
queue gauges are summed over live workers, ``catalens_ready`` is the minimum over live workers.
"""
from __future__ import annotations

import math
import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The multiprocess folder when multiprocess mode is on, else None."""
    return os.environ.get(MULTIPROC_ENV) or None


class ServerMetrics:
    """Every metric the server exposes (own registry: several apps in one process do not clash);
    ``render()`` gives the exposition text of this process, or of all workers in multiprocess mode."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("catalens_requests", "HTTP requests answered, by route template, method and "
                                "status code", ("route", "method", "status"), registry=r)
        self.latency = Histogram("catalens_request_duration_seconds", "HTTP request latency, request start to "
                                 "response sent", ("route",), buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("catalens_errors", "Error responses by error code", ("code",), registry=r)
        self.images = Counter("catalens_images", "Images predicted", registry=r)
        self.shed = Counter("catalens_shed", "Requests refused with 503 because the queue was full", registry=r)
        self.batch_size = Histogram("catalens_batch_size", "Images per inference batch", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.inference = Histogram("catalens_inference_duration_seconds", "ONNX Runtime time per batch",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.decode = Histogram("catalens_decode_duration_seconds", "Decode + resize time per image",
                                buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("catalens_queue_wait_seconds", "Time an image waited for its batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("catalens_in_flight_requests", "Requests being handled now", registry=r,
                               multiprocess_mode="livesum")
        self.queue = Gauge("catalens_queue_depth", "Images decoding or waiting for a batch", registry=r,
                           multiprocess_mode="livesum")
        self.ready = Gauge("catalens_ready", "1 when the model is loaded and warmed up (every live worker)",
                           registry=r, multiprocess_mode="livemin")
        self.info = Gauge("catalens_model_info", "The model served (value 1)", ("model", "graph", "threads"),
                          registry=r, multiprocess_mode="max")

    def render(self) -> bytes:
        """Exposition text: this process's registry, or every worker's files in multiprocess mode."""
        folder = multiprocess_dir()
        if folder is None:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=folder)
        return generate_latest(registry)

    @staticmethod
    def process_exited(pid: int | None = None) -> None:
        """Multiprocess mode: drop this (or that) worker's live gauges when it stops."""
        if multiprocess_dir() is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid or os.getpid())


def parse_exposition(text: str) -> dict[tuple[str, frozenset], float]:
    """Read exposition text back into ``{(sample name, frozenset(labels.items())): value}`` (tests, tools)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = math.inf if s.value == math.inf else float(s.value)
    return out
