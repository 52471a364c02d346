"""Prometheus metrics for the server, written in the text exposition format (no dependency).

Exposed at ``GET /metrics``:

- ``catalens_requests_total{route,method,status}``  requests answered (route = the route's path
  template, ``unmatched`` for unknown paths)
- ``catalens_request_duration_seconds{route}``       latency histogram (request start → response sent)
- ``catalens_errors_total{code}``                    error responses by error code (``too_large``, ...)
- ``catalens_images_total``                          images predicted
- ``catalens_batch_size``                            images per inference batch (histogram)
- ``catalens_inference_duration_seconds``            ONNX Runtime time per batch (histogram)
- ``catalens_decode_duration_seconds``               decode + resize time per image (histogram)
- ``catalens_queue_wait_seconds``                    time an image waited for its batch (histogram)
- ``catalens_in_flight_requests``, ``catalens_queue_depth``, ``catalens_ready``, ``catalens_model_info``
"""
from __future__ import annotations

import math
import threading
from typing import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple, extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    if float(v).is_integer():
        return str(int(v))
    return repr(float(v))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        super().__init__(name, help, labels)
        self.values: dict[tuple, float] = {}

    def inc(self, *labels, amount: float = 1.0) -> None:
        with self._lock:
            self.values[labels] = self.values.get(labels, 0.0) + amount

    def get(self, *labels) -> float:
        return self.values.get(labels, 0.0)

    def lines(self) -> list[str]:
        out = self.header()
        with self._lock:
            items = sorted(self.values.items())
        if not items and not self.label_names:
            items = [((), 0.0)]
        out += [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in items]
        return out


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = (), fn: Callable[[], float] | None = None):
        super().__init__(name, help, labels)
        self.values: dict[tuple, float] = {}
        self.fn = fn

    def set(self, value: float, *labels) -> None:
        with self._lock:
            self.values[labels] = float(value)

    def add(self, amount: float, *labels) -> None:
        with self._lock:
            self.values[labels] = self.values.get(labels, 0.0) + amount

    def lines(self) -> list[str]:
        out = self.header()
        if self.fn is not None:
            return out + [f"{self.name} {_num(self.fn())}"]
        with self._lock:
            items = sorted(self.values.items()) or ([((), 0.0)] if not self.label_names else [])
        return out + [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in items]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()) -> None:
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self.counts: dict[tuple, list[int]] = {}
        self.sums: dict[tuple, float] = {}

    def observe(self, value: float, *labels) -> None:
        with self._lock:
            counts = self.counts.setdefault(labels, [0] * len(self.buckets))
            for i, b in enumerate(self.buckets):
                if value <= b:
                    counts[i] += 1
                    break
            self.sums[labels] = self.sums.get(labels, 0.0) + value

    def count(self, *labels) -> int:
        return sum(self.counts.get(labels, []))

    def lines(self) -> list[str]:
        out = self.header()
        with self._lock:
            keys = sorted(self.counts) or ([()] if not self.label_names else [])
            snapshot = {k: (list(self.counts.get(k, [0] * len(self.buckets))), self.sums.get(k, 0.0)) for k in keys}
        for k, (counts, total) in snapshot.items():
            cum = 0
            for b, c in zip(self.buckets, counts):
                cum += c
                le = 'le="%s"' % _num(b)
                out.append(f"{self.name}_bucket{_labels(self.label_names, k, le)} {cum}")
            out.append(f"{self.name}_sum{_labels(self.label_names, k)} {_num(total)}")
            out.append(f"{self.name}_count{_labels(self.label_names, k)} {cum}")
        return out


class ServerMetrics:
    """Every metric the server exposes; ``render()`` gives the exposition text."""

    def __init__(self, queue_depth: Callable[[], float] = lambda: 0) -> None:
        self.requests = Counter("catalens_requests_total", "HTTP requests answered, by route template, "
                                "method and status code", ("route", "method", "status"))
        self.latency = Histogram("catalens_request_duration_seconds", "HTTP request latency, request start "
                                 "to response sent", LATENCY_BUCKETS, ("route",))
        self.errors = Counter("catalens_errors_total", "Error responses by error code", ("code",))
        self.images = Counter("catalens_images_total", "Images predicted")
        self.batch_size = Histogram("catalens_batch_size", "Images per inference batch", BATCH_BUCKETS)
        self.inference = Histogram("catalens_inference_duration_seconds", "ONNX Runtime time per batch",
                                   LATENCY_BUCKETS)
        self.decode = Histogram("catalens_decode_duration_seconds", "Decode + resize time per image",
                                LATENCY_BUCKETS)
        self.queue_wait = Histogram("catalens_queue_wait_seconds", "Time an image waited for its batch",
                                    LATENCY_BUCKETS)
        self.in_flight = Gauge("catalens_in_flight_requests", "Requests being handled now")
        self.queue = Gauge("catalens_queue_depth", "Images waiting for a batch", fn=queue_depth)
        self.ready = Gauge("catalens_ready", "1 when the model is loaded and warmed up")
        self.info = Gauge("catalens_model_info", "The model served (value 1)", ("model", "graph", "threads"))
        self._all = [self.requests, self.latency, self.errors, self.images, self.batch_size, self.inference,
                     self.decode, self.queue_wait, self.in_flight, self.queue, self.ready, self.info]

    def render(self) -> str:
        lines: list[str] = []
        for m in self._all:
            lines += m.lines()
        return "\n".join(lines) + "\n"


def parse_exposition(text: str) -> dict[tuple[str, frozenset], float]:
    """Read exposition text back into ``{(name, frozenset(labels.items())): value}`` (for tests/tools)."""
    import re

    out = {}
    pat = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
    lab = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = pat.match(line)
        if not m:
            continue
        labels = frozenset((k, v) for k, v in lab.findall(m.group(3) or ""))
        value = m.group(4)
        out[(m.group(1), labels)] = math.inf if value == "+Inf" else float(value)
    return out
