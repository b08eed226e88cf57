"""Faults under load: what clients see while parts of a running server die, and whether accepted jobs survive.

Starts the default server (``mergeserve serve --no-bootstrap``, the product venv next to this Python), keeps
a client loop running (a classify request and a ``GET /v1/adapters`` every ~20 ms, alternately), and for each
scenario kills something, restarting the server where the scenario stops it, with an ingest job in flight
where a job is at stake. Per scenario it prints the requests sent, how they were answered (200, 503 with and
without ``Retry-After``, other statuses), the connections refused or reset, the time from the fault to the
first 200 of both routes again, and how the job ended.

Run: ``.venv-dev/bin/python benchmarks/faults.py`` (~6 minutes on 2 cores; ``--scenarios replica,worker``
for some). Scenarios: replica (SIGKILL the Model replica's process), controller (SIGKILL the controller
actor's process; Ray restarts it), worker (SIGKILL the training worker mid-job), term-tree / kill-tree
(SIGTERM / SIGKILL to the server's process group, then a restart), term-driver / kill-driver (the same to
the ``mergeserve serve`` process alone, then a restart).
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import numpy as np
import psutil
from PIL import Image

from serving.ports import free_port

BIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv", "bin", "mergeserve")
SCENARIOS = ["replica", "controller", "worker", "term-tree", "kill-tree", "term-driver", "kill-driver"]


class Server:
    def __init__(self, root: str) -> None:
        self.root, self.port, self.direct = root, free_port(), free_port()
        self.url, self.proc = f"http://127.0.0.1:{self.port}", None

    def start(self) -> float:
        t0 = time.monotonic()
        cmd = [BIN, "serve", "--data-dir", os.path.join(self.root, "data"), "--port", str(self.port),
               "--direct-port", str(self.direct), "--no-bootstrap"]
        log = open(os.path.join(self.root, "serve.log"), "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while time.monotonic() - t0 < 300:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("the server did not become ready")

    def pid_of(self, title: str) -> int:
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            if " ".join(p.cmdline()).startswith(title):
                return p.pid
        raise LookupError(title)


class Load:
    """The client loop: tallies every answer by kind, and when each route last answered 200."""

    def __init__(self, url: str) -> None:
        buf = io.BytesIO()
        Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3)).astype(np.uint8)).save(buf, "PNG")
        self.body = {"image": base64.b64encode(buf.getvalue()).decode()}
        self.url, self.events = url, []  # (time, route, kind) of every answer or failure
        self.slowest = 0.0  # the longest request since the scenario started (a held request shows here)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=30) as h:
            i = 0
            while not self.stop.is_set():
                route = ("POST", "/v1/classify") if i % 2 == 0 else ("GET", "/v1/adapters")
                i += 1
                t0 = time.monotonic()
                try:
                    r = h.request(route[0], self.url + route[1], json=self.body if route[0] == "POST" else None)
                    kind = str(r.status_code) + ("+RA" if r.status_code == 503 and "retry-after" in r.headers else "")
                except httpx.ConnectError:
                    kind = "refused"
                except httpx.HTTPError as e:
                    kind = type(e).__name__
                self.events.append((time.monotonic(), route[1], kind))
                self.slowest = max(self.slowest, time.monotonic() - t0)
                time.sleep(0.02)

    def window(self, t_fault: float, settle_s: float = 5.0, timeout: float = 300) -> tuple[collections.Counter, float]:
        """Once both routes have answered 200 for ``settle_s`` after the last failure: the answers since the
        last call, and the seconds from the fault to the first 200 after the last failure (0: none failed)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            events = list(self.events)
            bad = [t for t, _, k in events if k != "200" and t >= t_fault]
            last_bad = max(bad, default=t_fault)
            oks = {r: t for t, r, k in events if k == "200" and t > last_bad}
            if len(oks) == 2 and time.monotonic() - last_bad > settle_s:
                first_ok = min(t for t, r, k in events if k == "200" and t > last_bad)
                self.events = self.events[len(events):]
                return collections.Counter(k for _, _, k in events), (first_ok - t_fault) if bad else 0.0
            time.sleep(0.2)
        return collections.Counter(k for _, _, k in self.events), float("nan")


def ingest(url: str, archive: bytes, name: str) -> str:
    r = httpx.post(f"{url}/v1/domains", data={"name": name, "hyper": '{"steps": 60}'},
                   files={"archive": ("d.tar.gz", archive)}, timeout=60)
    r.raise_for_status()
    return r.json()["job_id"]


def wait_job(url: str, job_id: str, timeout: float = 600) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            j = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
            if j.get("status") in ("succeeded", "failed", "rejected"):
                return j
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    return {"status": "timeout", "attempts": "?"}


def wait_training(url: str, job_id: str) -> None:
    while httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()["progress"]["step"] < 10:
        time.sleep(0.2)


def scenario(name: str, s: Server, load: Load, archive: bytes) -> dict:
    job = None
    if name in ("worker", "term-tree", "kill-tree", "term-driver", "kill-driver"):
        job = ingest(s.url, archive, f"d-{name}")
        wait_training(s.url, job)
    load.events.clear()
    load.slowest = 0.0
    t_fault = time.monotonic()
    if name == "replica":
        os.kill(s.pid_of("ray::ServeReplica:mergeserve:Model"), signal.SIGKILL)
    elif name == "controller":
        os.kill(s.pid_of("ray::Controller"), signal.SIGKILL)
    elif name == "worker":
        os.kill(s.pid_of("ray::Worker"), signal.SIGKILL)
    else:
        sig = signal.SIGTERM if name.startswith("term") else signal.SIGKILL
        (os.killpg if name.endswith("tree") else os.kill)(s.proc.pid, sig)
        s.proc.wait(120)
        s.start()
    answers, recovery = load.window(t_fault)
    ended = wait_job(s.url, job) if job else None
    return {"scenario": name, "answers": answers, "recovery_s": recovery, "slowest_s": load.slowest,
            "job": f"{ended['status']} (attempts {ended['attempts']})" if ended else "-"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated, from " + ",".join(SCENARIOS))
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="faults-")
    archives = {}  # a different digits5 domain for every scenario that ingests: the gate needs something new
    for dom in ("sklearn", "printed", "mnistm", "sketch", "mnist"):
        archive = os.path.join(root, f"{dom}.tar.gz")
        subprocess.run([BIN, "export", "--domain", dom, "--limit", "300", "--out", archive], check=True,
                       capture_output=True)
        archives[dom] = open(archive, "rb").read()
    s = Server(root)
    print(f"server ready in {s.start():.1f} s; logs in {root}/serve.log", flush=True)
    load = Load(s.url)
    rows = []
    try:
        domains = iter(archives.values())
        for name in args.scenarios.split(","):
            rows.append(scenario(name, s, load, next(domains) if name not in ("replica", "controller") else b""))
            print(f"{name}: {dict(rows[-1]['answers'])}, recovered in {rows[-1]['recovery_s']:.1f} s, "
                  f"job {rows[-1]['job']}", flush=True)
            time.sleep(3)
    finally:
        load.stop.set()
        if s.proc.poll() is None:
            s.proc.send_signal(signal.SIGTERM)
            s.proc.wait(120)
    kinds = sorted({k for r in rows for k in r["answers"]})
    print(f"\n| scenario | requests | {' | '.join(kinds)} | recovery s | slowest request s | job |")
    print("|" + " --- |" * (len(kinds) + 5))
    for r in rows:
        a = r["answers"]
        print(f"| {r['scenario']} | {sum(a.values())} | {' | '.join(str(a.get(k, 0)) for k in kinds)} | "
              f"{r['recovery_s']:.1f} | {r['slowest_s']:.1f} | {r['job']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
