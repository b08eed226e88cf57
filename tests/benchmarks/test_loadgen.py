"""The bench's load generators (``benchmarks/serve/loadgen.py``), parametrized over the registry, on loopback servers.

A tiny FastAPI app on uvicorn in a thread stands in for a peer (mergeserve's decoder and response shape, as
the peers run them). Raw asyncio servers check what uvicorn never sends: chunked bodies, ``Connection:
close``, a connection dropped mid-answer.
"""

import asyncio
import threading
import time

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI

from benchmarks.serve.harness import free_port, json_body, png_b64
from benchmarks.serve.loadgen import LOADGENS, aio_loadgen, run_cell
from benchmarks.serve.peers import PeerRequest, respond
from serving.archive import Limits, decode_images


def _tiny_app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/classify")
    def classify(req: PeerRequest) -> dict:
        x = decode_images(req.raws(), 32, Limits())
        probs = np.full((len(x), 10), 0.1, dtype=np.float32)
        probs[:, 3] = 0.5
        return respond(probs, [str(i) for i in range(10)], req.top_k, req.image is not None, 0)

    return app


@pytest.fixture(scope="module")
def tiny_url():
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_tiny_app(), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    t.join(10)


@pytest.mark.parametrize("kind", sorted(LOADGENS))
def test_loadgen_counts_answers_in_the_window_and_errors_apart(kind, tiny_url):
    gen = LOADGENS[kind]
    edges = []
    for n_img in (1, 4):
        r = gen(f"{tiny_url}/v1/classify", json_body(png_b64(n_img)), clients=2, warmup=0.2, seconds=0.8,
                on_window=edges.append)
        assert r["requests"] > 0 and r["errors"] == 0 and r["warmup_errors"] == 0, r
        assert r["p50_ms"] <= r["p99_ms"] and r["rps"] == r["requests"] / 0.8
        assert r["loadgen_cpu_s"] > 0
    assert edges == ["go", "stop", "go", "stop"]
    bad = gen(f"{tiny_url}/nope", b"{}", clients=1, warmup=0.0, seconds=0.3)
    assert bad["requests"] == 0 and bad["errors"] > 0 and "404" in bad["last_error"]


@pytest.mark.parametrize("kind", sorted(LOADGENS))
def test_loadgen_max_requests_bounds_each_client(kind, tiny_url):
    r = LOADGENS[kind](f"{tiny_url}/v1/classify", json_body(png_b64(1)), clients=3, warmup=0.0, seconds=5.0,
                       max_requests=4)
    assert r["requests"] == 12 and r["errors"] == 0


def test_run_cell_runs_the_generator_in_a_subprocess_and_counts_server_cpu(tiny_url, tmp_path):
    """``python -m benchmarks.serve.loadgen``: the window's edges come back, the server's CPU is taken at them."""
    import psutil

    body = tmp_path / "body.json"
    body.write_bytes(json_body(png_b64(1)))
    spec = {"url": f"{tiny_url}/v1/classify", "body_file": str(body), "clients": 2, "warmup": 0.2, "seconds": 0.8}
    r = run_cell(spec, lambda lg_pid: [psutil.Process()])  # this process serves tiny_url
    assert r["requests"] > 0 and r["errors"] == 0, r
    assert len(r["server_cpu_s"]) == 1 and sum(r["server_cpu_s"].values()) > 0  # one process, one role


def _raw_server(answer: bytes, close_after: bool) -> tuple[str, threading.Event]:
    """An HTTP/1.1 server that reads each request (by Content-Length) and sends ``answer`` verbatim."""
    port = free_port()
    ready, done = threading.Event(), threading.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                n = int(next(h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")))
                await reader.readexactly(n)
                writer.write(answer)
                await writer.drain()
                if close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def main() -> None:
        srv = await asyncio.start_server(handle, "127.0.0.1", port)
        ready.set()
        while not done.is_set():
            await asyncio.sleep(0.02)
        srv.close()

    threading.Thread(target=asyncio.run, args=(main(),), daemon=True).start()
    assert ready.wait(5)
    return f"http://127.0.0.1:{port}/x", done


CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n"
CLOSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
TO_EOF = b"HTTP/1.1 200 OK\r\n\r\n{}"  # no length: the body runs to the close
TRUNCATED = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}"  # the server closes 98 bytes short


@pytest.mark.parametrize(("answer", "close_after", "ok"), [
    (CHUNKED, False, True), (CLOSE, True, True), (TO_EOF, True, True), (TRUNCATED, True, False)],
    ids=["chunked", "connection-close", "body-to-eof", "truncated"])
def test_asyncio_loadgen_reads_every_framing_and_reconnects(answer, close_after, ok):
    url, done = _raw_server(answer, close_after)
    try:
        r = aio_loadgen(url, b'{"image": "x"}', clients=2, warmup=0.0, seconds=0.5, timeout=2.0, max_requests=5)
    finally:
        done.set()
    if ok:  # every request answered, on a kept or a fresh connection
        assert r["requests"] == 10 and r["errors"] == 0, r
    else:
        assert r["requests"] == 0 and r["errors"] == 10 and "IncompleteRead" in r["last_error"], r
