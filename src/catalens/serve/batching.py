"""Micro-batching: concurrent requests share one ONNX Runtime call.

Each decoded image is put on an asyncio queue with a future. One collector task takes the first
waiting image, then keeps taking images until the batch holds ``max_batch`` images or
``max_wait_ms`` have passed, and runs the batch in a dedicated inference thread (ONNX Runtime
releases the GIL, so the event loop keeps accepting and decoding meanwhile). While a batch runs,
new images queue up, so under load batches fill by themselves.

When nothing else is on its way (no image queued and no request decoding, as told by
``expected()``), the collector does not wait at all: an idle single request pays no batching delay.

The queue is bounded (``max_queue`` images): ``submit`` beyond it raises :class:`Overloaded`
at once, which the server answers with 503 and ``Retry-After`` (load shedding), so memory and
waiting times stay bounded under overload instead of growing until clients time out.

``stop()`` finishes every image already queued before returning (graceful shutdown).
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

_STOP = object()


class Overloaded(RuntimeError):
    """The batcher's queue holds ``max_queue`` images: the caller should shed the request."""


@dataclass
class BatchInfo:
    """Where an image's time went, and with how many others it was run."""

    batch_size: int
    queue_ms: float
    inference_ms: float


@dataclass
class _Item:
    pixels: np.ndarray           # (S, S, 3) uint8
    future: asyncio.Future
    enqueued: float


class MicroBatcher:
    """``await submit(pixels)`` → ``({task: probs (C,)}, BatchInfo)``; batches concurrent submits.

    ``infer``: ``(n, S, S, 3) uint8`` → ``{task: (n, C)}``, called in one background thread.
    ``on_batch(n, seconds, waits)`` is called on the event loop after each batch (metrics);
    ``max_queue``: images that may wait at once (None: unbounded), beyond it :class:`Overloaded`.
    """

    def __init__(self, infer: Callable[[np.ndarray], dict[str, np.ndarray]], max_batch: int = 32,
                 max_wait_ms: float = 5.0, expected: Callable[[], int] = lambda: 0,
                 on_batch: Callable[[int, float, list[float]], None] | None = None,
                 max_queue: int | None = None) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if max_queue is not None and max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must be >= 0")
        self.infer = infer
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.expected = expected
        self.on_batch = on_batch
        self.max_queue = max_queue
        self.queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.batches = 0
        self.images = 0

    @property
    def depth(self) -> int:
        return self.queue.qsize() if self.queue is not None else 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="catalens-infer")
        self._task = asyncio.create_task(self._collect(), name="catalens-batcher")

    def enqueue(self, pixels: np.ndarray) -> asyncio.Future:
        """Queue one image now; the future gets ``(probs, BatchInfo)``. Raises :class:`Overloaded`
        when ``max_queue`` images wait already, RuntimeError when the batcher is not running."""
        if not self.running:
            raise RuntimeError("the batcher is not running (server starting or shutting down)")
        if self.max_queue is not None and self.depth >= self.max_queue:
            raise Overloaded(f"{self.depth} images wait for inference, the limit is {self.max_queue}")
        fut = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(_Item(pixels, fut, time.perf_counter()))
        return fut

    async def submit(self, pixels: np.ndarray) -> tuple[dict[str, np.ndarray], BatchInfo]:
        return await self.enqueue(pixels)

    async def stop(self) -> None:
        """Finish every queued image, then stop the collector and the inference thread."""
        if self._task is None:
            return
        self.queue.put_nowait(_STOP)
        try:
            await self._task
        finally:
            self._pool.shutdown(wait=True)
            self._task = None

    async def _next_batch(self, first: _Item) -> tuple[list[_Item], bool]:
        loop = asyncio.get_running_loop()
        batch, stop = [first], False
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                item = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0 or self.expected() <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            if item is _STOP:
                stop = True
                break
            batch.append(item)
        return batch, stop

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        stop = False
        while not stop:
            first = await self.queue.get()
            if first is _STOP:
                break
            batch, stop = await self._next_batch(first)
            live = [it for it in batch if not it.future.done()]  # cancelled clients are skipped
            if not live:
                continue
            x = np.stack([it.pixels for it in live])
            start = time.perf_counter()
            try:
                probs = await loop.run_in_executor(self._pool, self.infer, x)
            except Exception as e:  # noqa: BLE001 - every waiter gets the error, the loop goes on
                for it in live:
                    if not it.future.done():
                        it.future.set_exception(e)
                continue
            seconds = time.perf_counter() - start
            self.batches += 1
            self.images += len(live)
            waits = [start - it.enqueued for it in live]
            for i, it in enumerate(live):
                if not it.future.done():
                    info = BatchInfo(len(live), waits[i] * 1000.0, seconds * 1000.0)
                    it.future.set_result(({k: v[i] for k, v in probs.items()}, info))
            if self.on_batch is not None:
                self.on_batch(len(live), seconds, waits)
