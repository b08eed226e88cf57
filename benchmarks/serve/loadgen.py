"""Closed-loop HTTP load generators for ``bench-serve`` (each runs in its own process).

Two clients with the same result dict, so one can be checked against the other in the same run:

- ``asyncio`` (the default): one event loop, one keep-alive HTTP/1.1 connection per client, the
  request bytes prebuilt and the response read by ``Content-Length`` (or chunks). A request's time
  runs from its write to its last body byte, so a client's own overhead is ~tens of µs.
- ``threads``: one ``httpx.Client`` per thread, the bench's generator until 2026-12-05. On 2 cores
  it cost ~0.45 ms CPU per request (against the server's ~0.9-1.5 ms), and a thread whose answer had
  arrived could wait for the GIL (16 threads share it) before stopping its clock, so its p99 at 16
  clients was partly its own (``benchmarks/loadgen_ab.py``: 28.8-29.3 ms against 18.1-18.2 ms on the
  same server). ``bench-serve --loadgen threads`` keeps it for comparison.

:func:`run_cell` runs one of them in a subprocess (``python -m benchmarks.serve.loadgen SPEC``) and adds
the CPU the server's processes spent in its measured window.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import numpy as np

from .accounting import command_line, cpu_seconds, role_of


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


class _Tally:
    """Per-client latencies and errors of the requests that end inside the window [t_go, t_go + seconds]."""

    def __init__(self, clients: int, t_go: float, seconds: float) -> None:
        self.clients, self.t_go, self.seconds = clients, t_go, seconds
        self.t_stop = t_go + seconds
        self.lat: list[list[float]] = [[] for _ in range(clients)]
        self.errors, self.warm_errors = [0] * clients, [0] * clients
        self.last_error: str | None = None
        self.cpu: dict[str, float] = {}  # process CPU seconds at the window's edges

    def add(self, i: int, a: float, b: float, error: str | None) -> None:
        """Client ``i``'s request sent at ``a`` ended at ``b``, ``error`` None when it got a 200."""
        if error is not None:
            self.last_error = error[:200]
        if self.t_go <= b <= self.t_stop:
            if error is None:
                self.lat[i].append(b - a)
            else:
                self.errors[i] += 1
        elif b < self.t_go and error is not None:
            self.warm_errors[i] += 1

    def edge(self, what: str, on_window: Callable[[str], None] | None) -> None:
        """The window opens (``what`` "go") or closes ("stop"): note this process's CPU time, tell ``on_window``."""
        self.cpu[what] = time.process_time()
        if on_window:
            on_window(what)

    def stats(self) -> dict:
        xs = sorted(x for c in self.lat for x in c)
        return {
            "clients": self.clients,
            "seconds": self.seconds,
            "requests": len(xs),
            "rps": len(xs) / self.seconds,
            "p50_ms": 1e3 * percentile(xs, 50),
            "p99_ms": 1e3 * percentile(xs, 99),
            "mean_ms": 1e3 * statistics.fmean(xs) if xs else float("nan"),
            "errors": sum(self.errors),
            "warmup_errors": sum(self.warm_errors),
            "last_error": self.last_error,
            "loadgen_cpu_s": self.cpu["stop"] - self.cpu["go"],
        }


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """One HTTP/1.1 response: (status, body, keep_alive)."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed before the status line")
    status = int(status_line.split(b" ", 2)[1])
    length, chunked, keep = None, False, True
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value:
            chunked = True
        elif name == b"connection" and value == b"close":
            keep = False
    if chunked:
        parts = []
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()  # the blank line after the last chunk (no trailers sent here)
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        return status, b"".join(parts), keep
    if length is None:  # body runs to the close
        return status, await reader.read(), False
    return status, await reader.readexactly(length), keep


def aio_loadgen(url: str, body: bytes, clients: int, warmup: float, seconds: float, timeout: float = 30.0,
                max_requests: int = 1_000_000, on_window: Callable[[str], None] | None = None) -> dict:
    """``clients`` closed-loop clients POSTing ``body`` to ``url`` from one asyncio loop.

    Same contract and result as :func:`thread_loadgen`: stats of the requests completed inside the
    window that opens ``warmup`` s after the start and lasts ``seconds``.
    """
    u = urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    async def client(i: int, tally: _Tally) -> None:
        conn = None
        for _ in range(max_requests):
            a = time.perf_counter()
            if a >= tally.t_stop:
                break
            error = None
            try:
                if conn is None:
                    conn = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
                conn[1].write(request)
                status, text, keep = await asyncio.wait_for(_read_response(conn[0]), timeout)
                if status != 200:
                    error = f"HTTP {status}: {text[:200].decode(errors='replace')}"
                if not keep:
                    conn[1].close()
                    conn = None
            except (OSError, ValueError, IndexError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
                error = f"{type(e).__name__}: {e}"
                if conn is not None:
                    conn[1].close()
                conn = None
            tally.add(i, a, time.perf_counter(), error)
        if conn is not None:
            conn[1].close()

    async def window(tally: _Tally) -> None:
        await asyncio.sleep(max(0.0, tally.t_go - time.perf_counter()))
        tally.edge("go", on_window)
        await asyncio.sleep(max(0.0, tally.t_stop - time.perf_counter()))
        tally.edge("stop", on_window)

    async def main() -> dict:
        tally = _Tally(clients, time.perf_counter() + warmup, seconds)
        await asyncio.gather(window(tally), *(client(i, tally) for i in range(clients)))
        return tally.stats()

    return asyncio.run(main())


def thread_loadgen(url: str, body: bytes, clients: int, warmup: float, seconds: float, timeout: float = 30.0,
                   max_requests: int = 1_000_000, on_window: Callable[[str], None] | None = None) -> dict:
    """``clients`` closed-loop clients POSTing ``body`` to ``url``; stats of requests completed in the window.

    The window opens ``warmup`` s after the start and lasts ``seconds``; ``on_window("go"/"stop")`` is
    called at its edges. Each client stops at the window's end or after ``max_requests`` requests.
    """
    import httpx

    t_go = time.perf_counter() + warmup
    tally = _Tally(clients, t_go, seconds)
    t_stop = tally.t_stop
    headers = {"content-type": "application/json"}

    def client(i: int) -> None:
        with httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=1)) as h:
            for _ in range(max_requests):
                a = time.perf_counter()
                if a >= t_stop:
                    break
                error = None
                try:
                    r = h.post(url, content=body, headers=headers)
                    if r.status_code != 200:
                        error = f"HTTP {r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as e:
                    error = f"{type(e).__name__}: {e}"
                tally.add(i, a, time.perf_counter(), error)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(max(0.0, t_go - time.perf_counter()))
    tally.edge("go", on_window)
    time.sleep(max(0.0, t_stop - time.perf_counter()))
    tally.edge("stop", on_window)
    for t in threads:
        t.join(timeout + 5)
    return tally.stats()


LOADGENS: dict[str, Callable[..., dict]] = {"asyncio": aio_loadgen, "threads": thread_loadgen}



def run_cell(spec: dict, server: Callable[[int], list]) -> dict:
    """One cell: the load generator (``spec`` as for :func:`main`) in a subprocess, and the
    CPU the processes ``server(loadgen_pid)`` spent in its measured window, by role (``server_cpu_s``)."""
    lg = subprocess.Popen([sys.executable, "-m", "benchmarks.serve.loadgen", json.dumps(spec)],
                          stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        procs = server(lg.pid)
        snaps, lines = [], []
        for line in lg.stdout:
            line = line.strip()
            if line in ("go", "stop"):
                snaps.append(cpu_seconds(procs))
            elif line:
                lines.append(line)
        lg.wait(timeout=spec["warmup"] + spec["seconds"] + 120)
    finally:
        if lg.poll() is None:
            lg.kill()
            lg.wait()
    r = json.loads(lines[-1])
    if len(snaps) == 2:
        by_role: dict[str, float] = {}
        cmds = {p.pid: command_line(p) for p in procs}
        for pid, c1 in snaps[1].items():
            role = role_of(cmds.get(pid, ""))
            by_role[role] = by_role.get(role, 0.0) + c1 - snaps[0].get(pid, c1)
        r["server_cpu_s"] = by_role
    return r


def main(spec: dict) -> None:
    """Run the load generator ``spec`` names; print the window's edges ("go", "stop") and the result as JSON."""
    with open(spec["body_file"], "rb") as f:
        body = f.read()

    def edge(what: str) -> None:
        print(what, flush=True)

    gen = LOADGENS[spec.get("loadgen", "asyncio")]
    r = gen(spec["url"], body, spec["clients"], spec["warmup"], spec["seconds"], on_window=edge)
    print(json.dumps(r), flush=True)


if __name__ == "__main__":  # run_cell's subprocess: `python -m benchmarks.serve.loadgen SPEC_JSON`
    main(json.loads(sys.argv[1]))
