"""Greedy dynamic batching: the next batch is cut when the model is free, and the forward runs off the loop.

``@serve.batch`` cuts a batch ``batch_wait_timeout_s`` after its first request, even while the previous
batch is still running: with the forward in a thread it formed batches of ~2 requests under load, so
replicas ran the forward on the event loop, and the loop, which also parses, decodes and answers every
request, sat idle on a core while the model ran. Here a batch is cut only when the model is free, and it
takes everything that queued meanwhile (up to ``max_items`` images); the forward runs in a worker thread
(torch releases the GIL), so the loop keeps accepting and decoding the next requests on the other core.
As in ``@serve.batch``, a batch whose oldest request is younger than ``wait_s`` waits for more (up to
``wait_s``), so a burst of single-image requests is not cut into many small forwards; unlike it, the
batch waits only while a request is on its way (announced with :meth:`GreedyBatcher.incoming` when it
arrives, before its parsing and decoding): a lone client's request is never held for company that
cannot come.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np


class GreedyBatcher:
    """Batches ``(N_i, ...)`` arrays from concurrent callers into one call of ``fn`` at a time.

    Args:
        fn: ``(sum N_i, ...) array → (outputs (sum N_i, ...), tag)``; blocking, run in a thread.
        max_items: rows per call; a request larger than this runs alone.
        wait_s: how long a batch may wait, from its oldest request, for requests on their way once the
            model is free.
    """

    def __init__(self, fn: Callable[[np.ndarray], tuple[np.ndarray, Any]], max_items: int = 512,
                 wait_s: float = 0.005) -> None:
        self.fn, self.max_items, self.wait_s = fn, max_items, wait_s
        self.pending: deque[tuple[np.ndarray, asyncio.Future, float]] = deque()
        self.wake: asyncio.Event | None = None
        self.task: asyncio.Task | None = None
        self.coming = 0  # requests announced by incoming() and not yet submitted

    @contextmanager
    def incoming(self) -> Iterator[None]:
        """Announce a request that will be submitted after this block (left normally or not)."""
        self.coming += 1
        try:
            yield
        finally:
            self.coming -= 1
            if self.coming == 0 and self.wake is not None:
                self.wake.set()  # a batch waiting for company stops waiting

    async def __call__(self, x: np.ndarray) -> tuple[np.ndarray, Any]:
        """``fn``'s output rows for ``x`` and the tag of the call that produced them."""
        if self.task is None or self.task.done():
            self.wake = asyncio.Event()
            self.task = asyncio.get_running_loop().create_task(self._run())
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((x, fut, time.monotonic()))
        self.wake.set()
        return await fut

    def _take(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        x, f, _ = self.pending.popleft()
        batch, rows = [(x, f)], len(x)
        while self.pending and rows + len(self.pending[0][0]) <= self.max_items:
            x, f, _ = self.pending.popleft()
            batch.append((x, f))
            rows += len(x)
        return [(x, f) for x, f in batch if not f.cancelled()]

    async def _fill(self) -> None:
        """Wait until the oldest pending request is ``wait_s`` old, ``max_items`` rows are pending or no
        request is on its way."""
        while True:
            left = self.pending[0][2] + self.wait_s - time.monotonic()
            if left <= 0 or not self.coming or sum(len(x) for x, _, _ in self.pending) >= self.max_items:
                return
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), left)
            except asyncio.TimeoutError:  # noqa: UP041 - a different class before Python 3.11
                return

    async def _run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.pending:
                await self._fill()
                batch = self._take()
                if not batch:
                    continue
                try:
                    out, tag = await asyncio.to_thread(self.fn, np.concatenate([x for x, _ in batch]))
                except Exception as e:  # noqa: BLE001 - every caller of the batch gets the error
                    for _, f in batch:
                        if not f.done():
                            f.set_exception(e)
                    continue
                start = 0
                for x, f in batch:  # (sum N_i, ...) → each caller's N_i rows
                    if not f.done():
                        f.set_result((out[start : start + len(x)], tag))
                    start += len(x)
