"""Greedy dynamic batching: the next batch is cut when the model is free, and long forwards run off the loop.

``@serve.batch`` cuts a batch ``batch_wait_timeout_s`` after its first request, even while the previous
batch is still running: with the forward in a thread it formed batches of ~2 requests under load, so
replicas ran the forward on the event loop, and the loop, which also parses, decodes and answers every
request, sat idle on a core while the model ran. Here a batch is cut only when the model is free, and it
takes everything that queued meanwhile (up to ``max_items`` images).

Where the forward runs: a long one in a worker thread (torch releases the GIL inside large ops), so the
loop keeps accepting and decoding the next requests on the other core. A short one on CPU (expected to take
at most ``wait_s``, by :class:`ForwardCost` fitted to the forwards so far) on the loop: a small model's
many small ops take the GIL back after each one, so a thread overlaps little with the loop, and the hop
costs ~0.1 ms of CPU (1 × 16 single-image clients on 2 cores: +5 % req/s on the replica's own port,
+6 % through Serve's proxy, in a same-run A/B). Blocking the loop that long is what a batch may wait
anyway.

When a batch is cut: as in ``@serve.batch``, a batch whose oldest request is younger than ``wait_s``
waits for more (up to ``wait_s``), so a burst of single-image requests is not cut into many small
forwards; unlike it, the batch waits only while company can come: a request is on its way (announced
with :meth:`GreedyBatcher.incoming` when it arrives, before its parsing and decoding), or fewer
requests are pending than were in the replica at once in the last ``memory_s``. Closed-loop clients
whose answers just left come back within a round trip, and a batch that waits for them pays the
forward's fixed cost (~0.9 ms a forward for ``vit_tiny_offline`` on one CPU thread) once instead of
twice; a lone client's request is never held for company that cannot come.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np


class ForwardCost:
    """CPU seconds of a forward of ``n`` rows, ``a + b·n``, by exponentially weighted least squares.

    A forward has a fixed cost besides its per-row one (``vit_tiny_offline`` on one CPU thread: 1.08 ms at 1
    row, 3.91 ms at 16). Seconds per row averaged over the mostly small batches a trickle of requests makes
    (1.1 ms) predicted 10 ms for a 9-row forward that takes 2.7 ms, and sent it to a thread.

    Args:
        decay: weight kept by the past at each new forward (0.98: the last ~50 forwards count).
    """

    def __init__(self, decay: float = 0.98) -> None:
        self.decay = decay
        self.sums = np.zeros(5)  # Σw, Σw·n, Σw·n², Σw·t, Σw·n·t

    def add(self, n: int, seconds: float) -> None:
        self.sums = self.decay * self.sums + np.array([1.0, n, n * n, seconds, n * seconds])

    def predict(self, n: int) -> float | None:
        """Expected seconds for ``n`` rows; None before any forward."""
        w, sn, snn, st, snt = self.sums
        if w == 0:
            return None
        spread = w * snn - sn * sn  # w² · the weighted variance of n
        if spread <= 1e-6 * w * w:  # one size seen (n₀ rows in t₀): fewer rows take no longer, more ≤ t₀·n/n₀
            return st / w * max(1.0, n * w / sn)
        b = max((w * snt - sn * st) / spread, 0.0)
        return max((st - b * sn) / w, 0.0) + b * n


class GreedyBatcher:
    """Batches ``(N_i, ...)`` arrays from concurrent callers into one call of ``fn`` at a time.

    Args:
        fn: ``(sum N_i, ...) array → (outputs (sum N_i, ...), tag)``; blocking, run in a thread, or on the
            loop when short (``inline``).
        max_items: rows per call; a request larger than this runs alone.
        wait_s: how long a batch may wait, from its oldest request, for company once the model is free.
        memory_s: how long the most requests seen in the replica at once (the peak) counts as the
            company a batch may wait for.
        inline: whether short forwards may run on the loop. Only for CPU models: on a GPU the forward
            is mostly waiting for the device, which the CPU-time estimate does not see.
    """

    def __init__(self, fn: Callable[[np.ndarray], tuple[np.ndarray, Any]], max_items: int = 512,
                 wait_s: float = 0.005, memory_s: float = 0.25, inline: bool = True) -> None:
        self.fn, self.max_items, self.wait_s, self.memory_s, self.inline = fn, max_items, wait_s, memory_s, inline
        self.running = 0  # requests in the forward now
        self.cost = ForwardCost()  # the forward's CPU seconds by rows, fitted as forwards run
        self.peak, self.peak_t = 0, 0.0  # the most requests in the replica at once, and when last seen
        self.pending: deque[tuple[np.ndarray, asyncio.Future, float]] = deque()
        self.wake: asyncio.Event | None = None
        self.task: asyncio.Task | None = None
        self.coming = 0  # requests announced by incoming() and not yet submitted

    @contextmanager
    def incoming(self) -> Iterator[None]:
        """Announce a request that will be submitted after this block (left normally or not)."""
        self.coming += 1
        now, inside = time.monotonic(), self.coming + len(self.pending) + self.running
        if inside >= self._recent_peak(now):
            self.peak, self.peak_t = inside, now
        try:
            yield
        finally:
            self.coming -= 1
            if self.coming == 0 and self.wake is not None:
                self.wake.set()  # a batch waiting for company stops waiting

    def _recent_peak(self, now: float) -> int:
        """The peak, or 0 once it is older than ``memory_s``."""
        return self.peak if now - self.peak_t <= self.memory_s else 0

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
        """Wait until the oldest pending request is ``wait_s`` old, ``max_items`` rows are pending, or no
        request is on its way and as many are pending as the recent peak."""
        while True:
            now = time.monotonic()
            left = self.pending[0][2] + self.wait_s - now
            alone = not self.coming and len(self.pending) >= self._recent_peak(now)
            if left <= 0 or alone or sum(len(x) for x, _, _ in self.pending) >= self.max_items:
                return
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), left)
            except asyncio.TimeoutError:  # noqa: UP041 - a different class before Python 3.11
                return

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, Any]:
        """``fn(x)``, timing the CPU of the thread that runs it (GIL waits excluded)."""
        t0 = time.thread_time()
        out = self.fn(x)
        self.cost.add(len(x), time.thread_time() - t0)
        return out

    async def _run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.pending:
                await self._fill()
                batch = self._take()
                if not batch:
                    continue
                self.running = len(batch)
                xs = np.concatenate([x for x, _ in batch])
                try:
                    expected = self.cost.predict(len(xs)) if self.inline else None
                    if expected is not None and expected <= self.wait_s:
                        out, tag = self._forward(xs)  # short: the thread would cost more than it overlaps
                    else:
                        out, tag = await asyncio.to_thread(self._forward, xs)
                except Exception as e:  # noqa: BLE001 - every caller of the batch gets the error
                    for _, f in batch:
                        if not f.done():
                            f.set_exception(e)
                    continue
                finally:
                    self.running = 0
                start = 0
                for x, f in batch:  # (sum N_i, ...) → each caller's N_i rows
                    if not f.done():
                        f.set_result((out[start : start + len(x)], tag))
                    start += len(x)
