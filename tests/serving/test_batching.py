"""GreedyBatcher: each caller gets its own rows, batches are cut when the model is free, errors reach every
caller of their batch and nobody else."""

import asyncio
import threading
import time

import numpy as np
import pytest

from serving.batching import ForwardCost, GreedyBatcher


def _spin(cpu_s: float) -> None:
    """Burn ``cpu_s`` of this thread's CPU (not sleep: the batcher times the thread's CPU)."""
    t0 = time.thread_time()
    while time.thread_time() - t0 < cpu_s:
        pass


def _rows(n: int, start: int) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float32)[:, None]


def test_each_caller_gets_its_own_rows_and_the_tag():
    calls = []

    def fn(x: np.ndarray) -> tuple[np.ndarray, int]:
        calls.append(len(x))
        return x * 2, 7

    async def main() -> list:
        b = GreedyBatcher(fn, max_items=512, wait_s=0.05)
        return await asyncio.gather(*(b(_rows(n, 100 * i)) for i, n in enumerate((1, 3, 16, 2))))

    out = asyncio.run(main())
    for (rows, tag), (i, n) in zip(out, enumerate((1, 3, 16, 2))):
        assert tag == 7
        np.testing.assert_array_equal(rows, _rows(n, 100 * i) * 2)
    assert calls == [22]  # all four arrived within wait_s of the first: one forward


def test_next_batch_takes_everything_that_queued_while_the_model_ran():
    release, started, calls = threading.Event(), threading.Event(), []

    def fn(x: np.ndarray) -> tuple[np.ndarray, int]:
        calls.append(len(x))
        started.set()
        release.wait(5)
        return x + 1, 0

    async def main() -> list:
        b = GreedyBatcher(fn, max_items=512, wait_s=0.0)
        first = asyncio.ensure_future(b(_rows(1, 0)))
        while not started.is_set():  # the model is busy with the first request
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(b(_rows(2, 10 * i))) for i in range(1, 6)]
        await asyncio.sleep(0.05)  # with @serve.batch these would have been cut into batches by now
        release.set()
        return [await first] + [await r for r in rest]

    out = asyncio.run(main())
    assert calls == [1, 10]  # the five queued requests went in one forward, after the first finished
    np.testing.assert_array_equal(out[3][0], _rows(2, 30) + 1)


def test_max_items_splits_batches_and_a_large_request_runs_alone():
    calls = []

    def fn(x: np.ndarray) -> tuple[np.ndarray, int]:
        calls.append(len(x))
        return x, 0

    async def main() -> list:
        b = GreedyBatcher(fn, max_items=8, wait_s=0.05)
        return await asyncio.gather(*(b(_rows(n, 0)) for n in (4, 4, 4, 20, 1)))

    out = asyncio.run(main())
    assert [len(r) for r, _ in out] == [4, 4, 4, 20, 1]
    assert calls == [8, 4, 20, 1] and max(c for c in calls if c != 20) <= 8


def test_an_error_reaches_every_caller_of_its_batch_and_the_batcher_keeps_going():
    def fn(x: np.ndarray) -> tuple[np.ndarray, int]:
        if (x < 0).any():
            raise ValueError("bad rows")
        return x, 1

    async def main() -> tuple:
        b = GreedyBatcher(fn, max_items=512, wait_s=0.05)
        bad = await asyncio.gather(b(_rows(2, 0)), b(-_rows(1, 1)), return_exceptions=True)
        good = await b(_rows(3, 0))
        return bad, good

    bad, good = asyncio.run(main())
    assert all(isinstance(r, ValueError) for r in bad)  # same forward: both get the error
    assert good[1] == 1 and len(good[0]) == 3


def test_a_cancelled_caller_does_not_disturb_the_others():
    release = threading.Event()

    def fn(x: np.ndarray) -> tuple[np.ndarray, int]:
        release.wait(5)
        return x, 0

    async def main() -> np.ndarray:
        b = GreedyBatcher(fn, max_items=512, wait_s=0.0)
        first = asyncio.ensure_future(b(_rows(1, 0)))
        await asyncio.sleep(0.01)
        gone, kept = asyncio.ensure_future(b(_rows(5, 0))), asyncio.ensure_future(b(_rows(2, 7)))
        await asyncio.sleep(0.01)
        gone.cancel()
        release.set()
        await first
        with pytest.raises(asyncio.CancelledError):
            await gone
        return (await kept)[0]

    np.testing.assert_array_equal(asyncio.run(main()), _rows(2, 7))


def _timed(b: GreedyBatcher, x: np.ndarray):
    async def go():
        t0 = asyncio.get_running_loop().time()
        out = await b(x)
        return out, asyncio.get_running_loop().time() - t0
    return go()


def test_a_lone_request_is_not_held_for_company_that_cannot_come():
    calls = []

    def fn(x: np.ndarray) -> tuple[np.ndarray, int]:
        calls.append(len(x))
        return x, 0

    async def main() -> float:
        b = GreedyBatcher(fn, wait_s=5.0)  # nobody announced: no reason to wait the 5 s
        _, took = await _timed(b, _rows(1, 0))
        return took

    assert asyncio.run(main()) < 2.5 and calls == [1]


@pytest.mark.parametrize("announced_fails", [False, True])
def test_a_batch_waits_for_an_announced_request_and_only_for_it(announced_fails):
    calls = []

    def fn(x: np.ndarray) -> tuple[np.ndarray, int]:
        calls.append(len(x))
        return x, 0

    async def main() -> float:
        b = GreedyBatcher(fn, wait_s=5.0)
        go = asyncio.Event()

        async def second() -> None:
            with b.incoming():  # parsing / decoding: on its way
                await go.wait()
                if announced_fails:
                    raise ValueError("bad image")
            await b(_rows(2, 10))

        task = asyncio.ensure_future(second())
        await asyncio.sleep(0)  # the second request is announced
        first = asyncio.ensure_future(_timed(b, _rows(1, 0)))
        await asyncio.sleep(0.05)
        assert not first.done() and calls == []  # held for the announced request
        go.set()
        (_, _), took = await first
        await asyncio.gather(task, return_exceptions=True)
        return took

    took = asyncio.run(main())
    assert took < 2.5  # released by the arrival (or the failure), not by the 5 s wait
    assert calls == ([1] if announced_fails else [3])


@pytest.mark.parametrize("memory_s", [60.0, 0.0])
def test_a_batch_waits_for_the_company_seen_a_moment_ago_and_forgets_it(memory_s):
    """Two clients, closed loop: when one comes back first it waits for the other (the peak was two)
    unless the peak is forgotten; either way it is released by the arrival, not by the 5 s wait."""
    calls = []

    def fn(x: np.ndarray) -> tuple[np.ndarray, int]:
        calls.append(len(x))
        return x, 0

    async def request(b: GreedyBatcher, x: np.ndarray) -> float:
        t0 = asyncio.get_running_loop().time()
        with b.incoming():
            await asyncio.sleep(0)
        await b(x)
        return asyncio.get_running_loop().time() - t0

    async def main() -> float:
        b = GreedyBatcher(fn, wait_s=5.0, memory_s=memory_s)
        await asyncio.gather(request(b, _rows(1, 0)), request(b, _rows(1, 1)))  # peak: two at once
        await asyncio.sleep(0.01)
        first = asyncio.ensure_future(request(b, _rows(1, 2)))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(request(b, _rows(1, 3)))
        return max(await asyncio.gather(first, second))

    took = asyncio.run(main())
    assert took < 2.5
    assert calls == ([2, 2] if memory_s else [2, 1, 1])


@pytest.mark.parametrize("cpu_s, inline, on_loop", [(0.0, True, True), (0.03, True, False), (0.0, False, False)])
def test_a_short_forward_runs_on_the_loop_and_a_long_one_in_a_thread(cpu_s, inline, on_loop):
    """The first forward (cost unknown) runs in a thread; later ones on the loop when their expected CPU
    time fits in ``wait_s`` and the batcher may run them there (a CPU model)."""
    threads = []

    def fn(x: np.ndarray) -> tuple[np.ndarray, int]:
        threads.append(threading.get_ident())
        _spin(cpu_s)
        return x, 0

    async def main() -> int:
        b = GreedyBatcher(fn, wait_s=0.005, inline=inline)
        for i in range(3):
            await b(_rows(1, i))
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert threads[0] != loop_thread
    assert all((t == loop_thread) == on_loop for t in threads[1:])


@pytest.mark.parametrize("decay", [0.9, 0.98, 1.0])
def test_forward_cost_recovers_a_fixed_plus_per_row_cost(decay):
    cost = ForwardCost(decay)
    assert cost.predict(4) is None
    for n in (1, 3, 1, 9, 2, 16, 5):
        cost.add(n, 0.0009 + 0.0002 * n)
    for n in (1, 8, 64):
        assert cost.predict(n) == pytest.approx(0.0009 + 0.0002 * n, rel=1e-6)


def test_forward_cost_with_one_size_seen_bounds_from_above():
    """n₀ rows in t₀: fewer rows are predicted at t₀ (never less), more at t₀·n/n₀ (the fixed cost is
    paid once, so the truth is below)."""
    cost = ForwardCost()
    for _ in range(3):
        cost.add(4, 0.002)
    assert cost.predict(1) == pytest.approx(0.002)
    assert cost.predict(8) == pytest.approx(0.004)


def test_a_batch_whose_fixed_cost_dominates_runs_on_the_loop():
    """4 ms a forward + 0.5 ms a row, wait 10 ms: after 1- and 2-row forwards an 8-row one (8 ms) fits and
    runs on the loop, a 16-row one (12 ms) does not. Seconds per row averaged (~3.5 ms) would have sent
    the 8-row forward to a thread (28 ms expected)."""
    threads = []

    def fn(x: np.ndarray) -> tuple[np.ndarray, int]:
        threads.append(threading.get_ident())
        _spin(0.004 + 0.0005 * len(x))
        return x, 0

    async def main() -> int:
        b = GreedyBatcher(fn, wait_s=0.01)
        for i, n in enumerate((1, 2, 1, 2, 8, 16)):
            await b(_rows(n, i))
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert threads[4] == loop_thread and threads[5] != loop_thread
