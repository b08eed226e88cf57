"""``bench-serve --peers``: one model behind mergeserve, a plain Ray Serve app and FastAPI + uvicorn, all up
at once on loopback, measured cell by cell (images per request × closed-loop clients).

Serve's direct ingress and HAProxy are on, as in ``mergeserve serve``, so each Ray app is measured through
the main port (HAProxy) and on its replica's own port (the ``-direct`` peers), and the plain app also behind
Serve's Python proxy (its default ingress; HAProxy's fallback proxy port, the ``plain-proxy`` peer). The
cells are interleaved peer by peer, so drift on a shared machine hits every peer alike.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from .accounting import process_tree
from .harness import DIRECT_PORTS, free_port, json_body, on_sigterm, png_b64, private_ray_env, stop, wait_http
from .loadgen import run_cell
from .peers import ServedModel, plain_serve_app, served_model_args

CELLS: tuple[tuple[int, int], ...] = ((1, 1), (1, 4), (1, 16), (16, 1), (16, 16))  # (images/request, clients)


#: "-direct": the same replica reached on its own port (Serve's direct ingress), not through Serve's proxy
PEERS: tuple[str, ...] = ("mergeserve", "plain", "plain-proxy", "mergeserve-direct", "plain-direct", "fastapi")


TITLES = {"mergeserve": "mergeserve", "plain": "plain Ray Serve", "plain-proxy": "plain, Python proxy",
          "mergeserve-direct": "mergeserve direct", "plain-direct": "plain Serve direct", "fastapi": "FastAPI+uvicorn"}


def inprocess_rate(served: ServedModel, batch: int, threads: int, seconds: float) -> float:
    """Images/s of ``served.forward`` (preprocess + model + softmax, no decoding) at ``batch`` with ``threads``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        size = served.task.image_size
        x = np.random.RandomState(0).randint(0, 255, (batch, 3, size, size)).astype(np.uint8)
        for _ in range(3):
            served.forward(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds and n < 10_000_000:
            served.forward(x)
            n += batch
        return n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)


def _compare(answers: dict[str, list[dict]]) -> tuple[bool, float]:
    """Same labels in the same order and the largest score difference, across every peer's answers."""
    ref = answers[PEERS[0]]
    same, diff = True, 0.0
    for ans in answers.values():
        for a, b in zip(ref, ans):
            ra = a.get("results") or [a.get("predictions")]
            rb = b.get("results") or [b.get("predictions")]
            if None in ra or None in rb:
                return False, float("nan")
            for pa, pb in zip(ra, rb):
                same &= [x["label"] for x in pa] == [x["label"] for x in pb]
                diff = max(diff, *(abs(x["score"] - y["score"]) for x, y in zip(pa, pb)))
        same &= len(ans) == len(ref)
    return same, diff


@dataclass
class Running:
    """The peers, up: ``urls`` per peer (None when that path is not there), what they run."""

    cfg: object
    model_args: dict
    urls: dict[str, str | None]
    info: dict[str, dict]
    fast_proc: subprocess.Popen


@contextmanager
def running_peers(backbone: str, log: Callable[[str], None], tmp: str) -> Iterator[Running]:
    """Start the three peers (all on loopback, one private Ray cluster); stop everything on exit."""
    import ray
    from ray import serve

    from serving.config import ServerConfig

    # both Ray apps' replicas also listen on their own port
    private_ray_env(tmp, direct_port=free_port(span=DIRECT_PORTS))
    cfg = ServerConfig.model_validate({"data_dir": os.path.join(tmp, "data"), "bootstrap": [], "backbone": backbone})
    fast_proc = None
    try:
        t0 = time.perf_counter()
        # logical CPUs only (threads are what Ray sets per actor): on 2 cores the peers' replicas and
        # mergeserve's worker would not all fit in 2 and the last app would wait for the worker to idle out
        ray.init(namespace="mergeserve", include_dashboard=False, log_to_driver=False,
                 num_cpus=max(4, os.cpu_count() or 1))
        signal.signal(signal.SIGTERM, on_sigterm)  # after ray.init, which installs its own
        base, model_args = _start_ray_apps(cfg, log)
        fport = free_port()
        fast_proc = subprocess.Popen([sys.executable, "-m", "benchmarks.serve.peers",
                                      json.dumps({"port": fport, "model": model_args})],
                                     stdout=subprocess.DEVNULL, start_new_session=True)
        wait_http(f"http://127.0.0.1:{fport}/healthz", 300, fast_proc)
        log(f"all {len(PEERS)} peers up in {time.perf_counter() - t0:.1f} s (adapter {model_args['name']})")
        yield Running(cfg, model_args, _urls(base, fport), _info(base, fport), fast_proc)
    finally:
        if fast_proc is not None:
            stop(fast_proc, [], grace=15)
        if ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                ray.shutdown()


def _start_ray_apps(cfg: object, log: Callable[[str], None]) -> tuple[str, dict]:
    """mergeserve (``build_app``) at ``/`` and the plain app at ``/plain`` on the main port: its URL and the
    served model's arguments (mergeserve's active adapter)."""
    import httpx
    from ray import serve

    from serving.app import build_app

    t0 = time.perf_counter()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg.model_dump(mode="json")), name="mergeserve", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/readyz", 300)
    log(f"mergeserve up in {time.perf_counter() - t0:.1f} s")
    ad = httpx.get(f"{base}/v1/adapters", timeout=30).json()
    model_args = served_model_args(cfg.backbone, cfg, next(v for v in ad["versions"] if v["version"] == ad["active"]))
    serve.run(plain_serve_app(model_args, cfg.max_ongoing_requests), name="plain", route_prefix="/plain")
    wait_http(f"{base}/plain/healthz", 300)
    return base, model_args


def _urls(base: str, fport: int) -> dict[str, str | None]:
    """Each peer's classify URL (``plain-proxy``: None when HAProxy is off)."""
    from serving.app import direct_ports

    direct = {app: direct_ports(app=app) for app in ("mergeserve", "plain")}
    if not all(direct.values()):
        raise RuntimeError(f"direct ingress ports not found: {direct}")
    # with HAProxy on the main port (ray_env), Serve's Python proxy still runs as its fallback: the plain
    # app through it is the plain app behind Serve's default ingress
    fallback = (os.environ.get("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT")
                if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else None)
    if fallback:
        wait_http(f"http://127.0.0.1:{fallback}/plain/healthz", 120)
    return {"mergeserve": f"{base}/v1/classify", "plain": f"{base}/plain/v1/classify",
            "plain-proxy": f"http://127.0.0.1:{fallback}/plain/v1/classify" if fallback else None,
            "mergeserve-direct": f"http://127.0.0.1:{direct['mergeserve'][0]}/v1/classify",
            "plain-direct": f"http://127.0.0.1:{direct['plain'][0]}/plain/v1/classify",
            "fastapi": f"http://127.0.0.1:{fport}/v1/classify"}


def _info(base: str, fport: int) -> dict[str, dict]:
    import httpx

    return {"plain": httpx.get(f"{base}/plain/info").json(), "fastapi": httpx.get(f"http://127.0.0.1:{fport}/info").json()}


def _same_answers(urls: dict[str, str | None], log: Callable[[str], None]) -> dict:
    """Identical weights and responses: the same requests to every peer, one at a time."""
    import httpx

    imgs = png_b64(16, seed=1)
    probes = [{"image": imgs[0], "top_k": 10}, {"image": imgs[1], "top_k": 3}, {"images": imgs, "top_k": 10}]
    answers = {p: [httpx.post(u, json=b, timeout=60).json() for b in probes] for p, u in urls.items() if u}
    same, diff = _compare(answers)
    log(f"same requests to all peers: labels identical {same}, max |Δscore| {diff:.2g}")
    return {"labels": same, "max_score_diff": diff}


def _inprocess(model_args: dict, threads: list[int], seconds: float, log: Callable[[str], None]) -> dict:
    """In-process forward rates (no decode) at batch 16 and 32 with each of ``threads``."""
    served = ServedModel(model_args)
    rates = {f"b{b}_t{t}": inprocess_rate(served, b, t, seconds) for t in threads for b in (16, 32)}
    log("in-process forward (no decode), images/s: " + ", ".join(f"{k}={v:.0f}" for k, v in rates.items()))
    return rates


def _measure(peer: str, n_img: int, spec: dict, run: Running, log: Callable[[str], None]) -> dict:
    """One peer's cell (the load generator's ``spec``), the server CPU of that peer's processes with it."""
    import psutil

    me, fast = os.getpid(), run.fast_proc.pid
    r = run_cell(spec, lambda lg_pid: ([psutil.Process(fast)] if peer == "fastapi" else
                                       [p for p in process_tree(me) if p.pid not in (lg_pid, fast)]))
    r["images_per_s"] = r["rps"] * n_img
    err = f", {r['errors']} errors ({r['last_error']})" if r["errors"] else ""
    cpu = ", ".join(f"{k} {1e3 * v / max(r['requests'], 1):.2f}"
                    for k, v in sorted(r.get("server_cpu_s", {}).items(), key=lambda kv: -kv[1]) if v > 0.005)
    log(f"  {n_img:>2} img × {spec['clients']:>2} clients  {TITLES[peer]:<16} {r['rps']:8.1f} req/s "
        f"p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms{err}; server CPU ms/request: {cpu}")
    return r


def peers_bench(backbone: str, seconds: float, warmup: float, cells: Sequence[tuple[int, int]],
                log: Callable[[str], None] = print, loadgen_kind: str = "asyncio") -> dict:
    """Start the three peers, check they answer alike, run every cell (peers interleaved), stop everything."""
    import torch

    tmp = tempfile.mkdtemp(prefix="msb-")  # short: Ray's socket paths live under it
    out: dict = {"cells": {}, "setup": {}}
    try:
        with running_peers(backbone, log, tmp) as run:
            threads = {"plain": run.info["plain"]["torch_threads"], "fastapi": run.info["fastapi"]["torch_threads"],
                       "driver": torch.get_num_threads()}
            out["setup"] = {"adapter": run.model_args["name"], "max_ongoing_requests": run.cfg.max_ongoing_requests,
                            "threads": threads, "identical": _same_answers(run.urls, log)}
            for n_img, clients in cells:
                body_file = os.path.join(tmp, f"body-{n_img}.json")
                with open(body_file, "wb") as f:
                    f.write(json_body(png_b64(n_img, seed=2)))
                if n_img > 1 and "inprocess" not in out:
                    out["inprocess_threads"] = threads["plain"]
                    out["inprocess"] = _inprocess(run.model_args, sorted({threads["plain"], threads["driver"]}),
                                                  min(seconds, 5.0), log)
                spec = {"body_file": body_file, "clients": clients, "warmup": warmup, "seconds": seconds,
                        "loadgen": loadgen_kind}
                out["cells"][(n_img, clients)] = {peer: _measure(peer, n_img, {**spec, "url": url}, run, log)
                                                  for peer, url in run.urls.items() if url}
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
