"""``bench-serve --rss`` / ``--ready``: the default ``mergeserve serve`` as a subprocess, its readiness time and
the summed memory of its processes."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from .accounting import PeakSampler, command_line, process_tree, rss_table
from .harness import DIRECT_PORTS, free_port, json_body, png_b64, private_ray_env, stop, wait_http

IDLE_S = 45.0  # --rss: the server's worker_idle_s and VQA idle delay, so that "at rest" comes in minutes


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
    private_ray_env(tmp)
    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "mergeserve")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-c", "import sys; from mergeserve.cli import main; "
                                                                    "sys.exit(main())"]
    cmd += ["serve", "--data-dir", os.path.join(tmp, "data"), "--port", str(port),
            "--direct-port", str(free_port(span=DIRECT_PORTS)),
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
        wait_http(f"{url}/readyz", deadline_s, proc)
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
        stop(proc, family)
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
    body = json_body(png_b64(16, seed=3))
    question = {"image": png_b64(1, seed=4, size=64)[0], "question": "how many circles are there?"}
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
    while any("VqaModel" in command_line(p) for p in tree()):
        if time.perf_counter() - t0 > IDLE_S + 120:
            raise RuntimeError("the VQA replica did not scale to zero")
        time.sleep(1.0)
