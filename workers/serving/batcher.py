"""Micro-batching: images from concurrent requests read in one model call.

One thread owns the model runners and is the only caller of onnxruntime. Requests
hand it a job (the runner their images were prepared for, and the images) and await
a future. The thread takes the first job, then whatever else is queued, and, while
other requests are still being read, waits up to ``max_wait`` for them, until
``max_batch`` images are gathered; then it runs them as one batch and resolves each
job's future with its slice of the results. A lone request never waits.

A batch holds the jobs of one runner only. Swapping the model (a moved alias) is
handing new requests a new runner: jobs already prepared for the old one are still
read by it, so no request fails and each answer names the version that read it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from workers.serving.runner import Runner

log = logging.getLogger("captrain.serve")

Results = list[tuple[str, float]]


@dataclass
class _Job:
    runner: Runner
    x: np.ndarray  # (n, H, W) grey, as Runner.prepare gives it
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Results] = field(repr=False)


class Batcher:
    """Gathers jobs into batches of at most ``max_batch`` images, waiting at most
    ``max_wait`` seconds after the first; ``on_batch(size)`` is told each batch run."""

    def __init__(self, max_batch: int = 32, max_wait: float = 0.0,
                 on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch < 1 or max_wait < 0:
            raise ValueError("max_batch must be at least 1 and max_wait at least 0")
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.on_batch = on_batch or (lambda n: None)
        # Read by request handlers, replaced by swap(): an attribute write is atomic.
        self.current: Runner | None = None
        # Requests being read and decoded, not yet queued: counted on the event loop
        # (coming()), read here; an int's read is atomic.
        self.incoming = 0
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="captrain-batcher",
                                        daemon=True)
        self._thread.start()

    def swap(self, runner: Runner) -> None:
        """Hand new requests ``runner``; jobs queued for the one before still read there."""
        old, self.current = self.current, runner
        if old is not None and old is not runner:
            log.info("serving %s (was %s)", runner.label, old.label)

    @contextmanager
    def coming(self) -> Iterator[None]:
        """Count a request as on its way while it is read and decoded: batches wait for
        it (up to max_wait) instead of leaving without it."""
        self.incoming += 1
        try:
            yield
        finally:
            self.incoming -= 1

    async def read(self, runner: Runner, x: np.ndarray) -> Results:
        """Read the (n, H, W) images ``x``, prepared for ``runner``, in batches of at
        most ``max_batch``; (text, confidence) per image, in order."""
        loop = asyncio.get_running_loop()
        futures = []
        for start in range(0, len(x), self.max_batch):
            fut: asyncio.Future[Results] = loop.create_future()
            self._queue.put(_Job(runner, x[start:start + self.max_batch], loop, fut))
            futures.append(fut)
        parts = await asyncio.gather(*futures)
        return [r for part in parts for r in part]

    def close(self) -> None:
        """Stop the thread after the jobs queued before this call."""
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _serve(self) -> None:
        carry: _Job | None = None
        while True:
            first = carry or self._queue.get()
            if first is None:
                return
            batch, carry = self._gather(first)
            self._run(batch)

    def _gather(self, first: _Job) -> tuple[list[_Job], _Job | None]:
        """``first`` and the jobs after it that fit, and the job that did not (or None)."""
        batch, size = [first], len(first.x)
        deadline = time.monotonic() + self.max_wait
        while size < self.max_batch:
            try:
                job = self._queue.get_nowait()  # whatever is queued joins at once
            except queue.Empty:
                # Then wait, up to max_wait, only while requests are on their way (being
                # read and decoded): with none coming, waiting only adds latency.
                left = deadline - time.monotonic()
                if left <= 0 or self.incoming <= 0:
                    break
                try:
                    job = self._queue.get(timeout=min(left, 0.0005))
                except queue.Empty:
                    continue
            if job is None:
                self._queue.put(None)  # close() after this batch
                break
            if job.runner is not first.runner or size + len(job.x) > self.max_batch:
                return batch, job
            batch.append(job)
            size += len(job.x)
        return batch, None

    def _run(self, batch: list[_Job]) -> None:
        x = batch[0].x if len(batch) == 1 else np.concatenate([j.x for j in batch])
        try:
            results = batch[0].runner.run(x)
        except Exception as exc:  # the model failed: every waiting request hears it
            log.exception("batch of %d images failed", len(x))
            for job in batch:
                job.loop.call_soon_threadsafe(_settle, job.future, None, exc)
            return
        self.on_batch(len(x))
        start = 0
        for job in batch:
            part = results[start:start + len(job.x)]
            start += len(job.x)
            job.loop.call_soon_threadsafe(_settle, job.future, part, None)


def _settle(fut: asyncio.Future[Results], value: Results | None,
            exc: BaseException | None) -> None:
    if fut.done():  # the request went away (client disconnect cancels it)
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value or [])
