"""What every bench-serve run needs around its servers: free loopback ports, a private Ray cluster, waiting
for a URL, stopping a server's processes, request bodies.

Every server listens on 127.0.0.1 only; every Ray cluster started here uses a private ``RAY_TMPDIR`` (never
joining another cluster on the machine).
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import time

import numpy as np

from serving.ports import DIRECT_PORTS, free_port  # noqa: F401  (re-exported: the benchmark scripts import it from here)


def private_ray_env(tmp: str, direct_port: int | None = None) -> None:
    """This process (and its subprocesses): a private Ray temp dir, never another cluster's address, and
    :func:`serving.app.ray_env` (direct ingress from ``direct_port`` when given)."""
    os.environ["RAY_TMPDIR"] = os.path.join(tmp, "ray")
    os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)
    os.environ.pop("RAY_ADDRESS", None)
    from serving.app import ray_env

    ray_env(direct_port)


def wait_http(url: str, deadline_s: float, proc: subprocess.Popen | None = None) -> float:
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


def stop(proc: subprocess.Popen, family: list, grace: float = 60.0) -> None:
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


def png_b64(n: int, seed: int = 0, size: int = 32) -> list[str]:
    """``n`` random ``size``-pixel RGB PNGs, base64 (the same for the same ``seed``)."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.randint(0, 255, (size, size, 3)).astype(np.uint8)).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def json_body(images: list[str]) -> bytes:
    """A ``/v1/classify`` JSON body: ``image`` for one, ``images`` for several."""
    return json.dumps({"image": images[0]} if len(images) == 1 else {"images": images}).encode()


def on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through the finally blocks that stop the servers
