"""Micro-batching: requests that arrive together share one forward pass.

Each request hands its decoded images to :meth:`MicroBatcher.submit` and awaits their
probabilities. One worker task takes the first waiting request, waits up to ``window_s``
for more (or until the largest batch is full), runs them as one call of ``predict`` in a
single model thread, and hands each request its rows. While a forward pass runs, new
requests queue up and go together into the next one, so under load batches grow by
themselves and an idle server adds at most ``window_s`` of latency.

Each row's result depends only on its image and the batch shape it ran at
(:meth:`springfield.inference.Classifier.probabilities_of_arrays`), never on its neighbours.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("springfield.serve")


class QueueFull(Exception):
    """The batcher already holds ``max_queue`` images: the request should come back later."""


class ModelError(Exception):
    """The forward pass raised: a fault of the server, not of the request's images."""


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
    failures: int = 0


class MicroBatcher:
    """Run ``predict(images (N, H, W, 3)) -> (N, C)`` for concurrent requests, batched.

    ``sizes`` are the batch shapes ``predict`` runs (:attr:`Classifier.batch_sizes`): a
    forward pass takes the longest run of waiting requests that fills one of them without
    padding where it can (5 waiting single images: 4 now, 1 next), since a padded row costs
    as much as a real one. ``enabled=False`` runs each request's images on their own (one
    call per request, still one at a time), which is what ``serve --no-batching`` and the
    benchmark compare against. Call :meth:`start` inside the running event loop and
    :meth:`stop` at shutdown.
    """

    def __init__(
        self,
        predict: Callable[[np.ndarray], np.ndarray],
        *,
        sizes: Sequence[int],
        window_s: float = 0.002,
        enabled: bool = True,
        max_queue: int | None = None,
    ) -> None:
        self._predict = predict
        self.sizes = tuple(sorted(sizes))
        self.max_batch = self.sizes[-1]
        self.window_s = window_s
        self.enabled = enabled
        # Images waiting (not yet in a forward pass); beyond it submit() refuses at once
        # rather than holding more memory. None: no bound (the app always sets one).
        self.max_queue = max_queue
        self.stats = BatchStats()
        self._pending: deque[_Job] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flushing = False
        # One thread runs the model: JAX releases the GIL while it computes, so the event
        # loop keeps accepting and decoding uploads meanwhile.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="springfield-model")

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run())

    def flush(self) -> None:
        """From now on run waiting images at once, without waiting out ``window_s`` (the
        server is shutting down: requests in progress should finish soon). Any thread."""

        def now() -> None:
            self._flushing = True
            if self._wake is not None:
                self._wake.set()

        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(now)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._thread.shutdown(wait=True)

    async def submit(self, images: np.ndarray) -> np.ndarray:
        """Probabilities ``(N, C)`` of one request's images, once their batch has run.

        Raises:
            QueueFull: ``max_queue`` images are already waiting.
            ModelError: the forward pass failed (its type and message, one line).
        """
        if self._wake is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        if self.max_queue is not None and self._waiting_images() + len(images) > self.max_queue:
            raise QueueFull(f"{self._waiting_images()} images already wait for the model")
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Job(images, future))
        self._wake.set()
        return await future

    def _waiting_images(self) -> int:
        return sum(len(j.images) for j in self._pending)

    async def _next_jobs(self) -> list[_Job]:
        while not self._pending:
            self._wake.clear()
            await self._wake.wait()
        if not self.enabled:
            return [self._pending.popleft()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.window_s
        while self._waiting_images() < self.max_batch and not self._flushing:
            left = deadline - loop.time()
            if left <= 0:
                break
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), left)
        # The longest prefix of whole requests that fits the largest size; then, if that
        # leaves padding, the prefix that fills the largest size it can fill exactly.
        jobs = [self._pending.popleft()]
        n = len(jobs[0].images)
        while self._pending and n + len(self._pending[0].images) <= self.max_batch:
            job = self._pending.popleft()
            jobs.append(job)
            n += len(job.images)
        fill = max((b for b in self.sizes if b <= n), default=n)
        while len(jobs) > 1 and n > fill:
            job = jobs.pop()
            self._pending.appendleft(job)
            n -= len(job.images)
        return jobs

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [j for j in await self._next_jobs() if not j.future.done()]
            if not jobs:  # clients that went away
                continue
            images = np.concatenate([j.images for j in jobs])
            try:
                probs = await loop.run_in_executor(self._thread, self._predict, images)
            except Exception as e:  # noqa: BLE001 - handed to each waiting request
                first = (str(e).strip().splitlines() or [""])[0][:300]
                reason = f"{type(e).__name__}: {first}" if first else type(e).__name__
                # One line: the operator learns what failed without a traceback per request.
                log.error("forward pass of %d images failed: %s", len(images), reason)
                self.stats.failures += 1
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(ModelError(reason))
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


__all__ = ["BatchStats", "MicroBatcher", "ModelError", "QueueFull"]
