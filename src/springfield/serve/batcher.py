"""Micro-batching: requests that arrive together share one forward pass.

Each request hands its decoded images to :meth:`MicroBatcher.submit` and awaits their
probabilities. One worker task takes the first waiting request, then keeps collecting
requests for up to ``window_s`` (or until ``max_batch`` images), runs them as one call of
``predict`` in a single model thread, and hands each request its rows. While a forward pass
runs, new requests queue up and go together into the next one, so under load batches grow
by themselves and an idle server adds at most ``window_s`` of latency.

Each row's result depends only on its image and the batch shape it ran at
(:meth:`springfield.inference.Classifier.probabilities_of_arrays`), never on its neighbours.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Job:
    images: np.ndarray
    future: asyncio.Future = field(repr=False)


@dataclass
class BatchStats:
    """Counters for /info: forward passes run and images through them."""

    batches: int = 0
    images: int = 0
    requests: int = 0


class MicroBatcher:
    """Run ``predict(images (N, H, W, 3)) -> (N, C)`` for concurrent requests, batched.

    ``enabled=False`` runs each request's images on their own (one call per request, still
    one at a time), which is what ``serve --no-batching`` and the benchmark compare against.
    Call :meth:`start` inside the running event loop and :meth:`stop` at shutdown.
    """

    def __init__(
        self,
        predict: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch: int,
        window_s: float = 0.002,
        enabled: bool = True,
    ) -> None:
        self._predict = predict
        self.max_batch = max_batch
        self.window_s = window_s
        self.enabled = enabled
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        # One thread runs the model: JAX releases the GIL while it computes, so the event
        # loop keeps accepting and decoding uploads meanwhile.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="springfield-model")

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._thread.shutdown(wait=True)

    async def submit(self, images: np.ndarray) -> np.ndarray:
        """Probabilities ``(N, C)`` of one request's images, once their batch has run."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(images, future))
        return await future

    async def _collect(self, first: _Job) -> list[_Job]:
        jobs, n = [first], len(first.images)
        if not self.enabled:
            return jobs
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.window_s
        while n < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), left)
                except TimeoutError:
                    break
            jobs.append(job)
            n += len(job.images)
        return jobs

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect(await self._queue.get())
            jobs = [j for j in jobs if not j.future.done()]  # clients that went away
            if not jobs:
                continue
            images = np.concatenate([j.images for j in jobs])
            try:
                probs = await loop.run_in_executor(self._thread, self._predict, images)
            except Exception as e:  # noqa: BLE001 - handed to each waiting request
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            self.stats.batches += 1
            self.stats.images += len(images)
            self.stats.requests += len(jobs)
            start = 0
            for j in jobs:
                rows = probs[start : start + len(j.images)]
                start += len(j.images)
                if not j.future.done():
                    j.future.set_result(rows)


__all__ = ["BatchStats", "MicroBatcher"]
