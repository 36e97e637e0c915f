"""Server-side dynamic batching: concurrent requests' images share one ONNX Runtime run. A batch closes when
it holds `max_batch_size` images or its oldest request has waited `max_batch_delay_ms`. Runs happen on their
own threads, never on the event loop, so REST and gRPC keep accepting requests while the accelerator works;
with `batch_concurrency` > 1 the next batch is prepared while the previous one runs (useful on a GPU)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from . import metrics
from .errors import NotReady
from .options import Batching


@dataclass
class _Item:
    images: np.ndarray
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    def __init__(self, run: Callable, batching: Batching, model: str):
        """`run` maps uint8 [N,S,S,3] to a tuple of arrays with N rows each (probabilities, class_index, ...)
        and must be thread-safe when `batching.batch_concurrency` > 1. `model` labels the metrics."""
        self._run, self.model = run, model
        self.max_batch_size = batching.max_batch_size
        self.max_delay_s = batching.max_batch_delay_ms / 1000.0
        self.concurrency = batching.batch_concurrency
        self._executor = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="ort-run")
        self._items: deque[_Item] = deque()
        self._queued_images = 0
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()  # asyncio keeps only weak references to tasks

    async def submit(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        if self._task is None or self._task.done():
            # Created lazily: kserve loads the model before its event loop exists.
            self._wakeup, self._slots = asyncio.Event(), asyncio.Semaphore(self.concurrency)
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="dynamic-batcher")
        future = asyncio.get_running_loop().create_future()
        self._items.append(_Item(images, future))
        self._queued_images += len(images)
        self._wakeup.set()
        return await future

    async def _loop(self) -> None:
        while True:
            while not self._items:
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._slots.acquire()
            # Wait for a full batch, at most until the oldest queued request's deadline.
            deadline = self._items[0].enqueued + self.max_delay_s
            while self._queued_images < self.max_batch_size and time.monotonic() < deadline:
                self._wakeup.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), deadline - time.monotonic())
            batch = self._take()
            if not batch:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _take(self) -> list[_Item]:
        """Pop requests in arrival order while they fit; the first one always goes (a request larger than
        max_batch_size is run alone, in max_batch_size chunks)."""
        batch: list[_Item] = []
        count = 0
        while self._items and not (batch and count + len(self._items[0].images) > self.max_batch_size):
            item = self._items.popleft()
            self._queued_images -= len(item.images)
            if not item.future.done():  # done: the client went away while queued
                batch.append(item)
                count += len(item.images)
        return batch

    async def _execute(self, batch: list[_Item]) -> None:
        try:
            images = batch[0].images if len(batch) == 1 else np.concatenate([it.images for it in batch])
            now = time.monotonic()
            for it in batch:
                metrics.QUEUE_SECONDS.labels(self.model).observe(now - it.enqueued)
            outputs = await asyncio.get_running_loop().run_in_executor(self._executor, self._chunked, images)
        except Exception as exc:  # every waiting request gets the error instead of hanging
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(exc)
            return
        finally:
            self._slots.release()
        offset = 0
        for it in batch:
            if not it.future.done():
                it.future.set_result(tuple(out[offset : offset + len(it.images)] for out in outputs))
            offset += len(it.images)

    def _chunked(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        parts = []
        for start in range(0, len(images), self.max_batch_size):
            chunk, started = images[start : start + self.max_batch_size], time.perf_counter()
            parts.append(self._run(chunk))
            metrics.RUN_SECONDS.labels(self.model).observe(time.perf_counter() - started)
            metrics.BATCH_SIZE.labels(self.model).observe(len(chunk))
        return parts[0] if len(parts) == 1 else tuple(np.concatenate(col) for col in zip(*parts, strict=True))

    def shutdown(self) -> None:
        """Synchronous stop (kserve's model.stop): no new runs; a run in progress finishes; requests still
        queued are told the model is not loaded (they waited for good)."""
        if self._task is not None:
            self._task.cancel()
        while self._items:
            item = self._items.popleft()
            if not item.future.done():
                item.future.set_exception(NotReady(f"model {self.model!r} was unloaded"))
        self._queued_images = 0
        self._executor.shutdown(wait=False)
