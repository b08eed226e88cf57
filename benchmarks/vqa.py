"""The VQA task's serving numbers. Prints two tables.

1. Questions/s of the offline ViLT in process: bare model, a LoRA adapter folded into its weights (what
   ``VqaModel`` replicas serve) and peft's unmerged LoRA layers; batch 1 and 32, interleaved rounds,
   median reported.
2. Over HTTP (server in process, temp data dir, default config with no bootstrap): ``POST /v1/domains``
   with ``task=vqa`` (the ``count`` family, 600 questions) → swapped, its phases, and what one client
   asking questions in a closed loop saw meanwhile (requests, failures, versions).

    .venv/bin/python benchmarks/vqa.py              # ~3-5 minutes on 2 cores
"""

from __future__ import annotations

import base64
import copy
import os
import socket
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def questions_per_second(batches: tuple[int, ...] = (1, 32), seconds: float = 2.0, rounds: int = 5) -> list[tuple]:
    """(model, batch, questions/s) for bare, merged and unmerged-LoRA ViLT forward passes."""
    import torch

    from training.data.scenes import make_family
    from training.fold import materialise, to_delta
    from training.lora import LoraSettings, get_adapter, set_adapter
    from training.tasks import attach_lora, get_task

    task = get_task("vqa")
    base = task.build_base()
    cfg = LoraSettings()
    pm = attach_lora(task, copy.deepcopy(base), cfg)
    ad = {k: v + 0.01 * torch.randn_like(v) for k, v in get_adapter(pm).items()}
    set_adapter(pm, ad)
    models = {"bare ViLT": base, "adapter folded into weights": materialise(base, to_delta(ad, cfg)),
              "peft LoRA, unmerged": pm.eval()}
    s = make_family("count", max(batches), seed=1)
    rows = []
    with torch.inference_mode():
        for b in batches:
            batch = task.make_batch(s.subset(slice(0, b)))
            rates: dict[str, list[float]] = {k: [] for k in models}
            for _ in range(rounds):  # interleaved: robust to drift on a shared machine
                for name, m in models.items():
                    for _ in range(3):
                        task.forward(m, batch)
                    n, t0 = 0, time.perf_counter()
                    while time.perf_counter() - t0 < seconds:
                        task.forward(m, batch)
                        n += b
                    rates[name].append(n / (time.perf_counter() - t0))
            rows += [(k, b, float(np.median(v))) for k, v in rates.items()]
    return rows


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ingest_while_asking(family: str = "count", n: int = 600) -> dict:
    """Start the server, ingest one VQA family over HTTP while one client keeps asking; the numbers."""
    import httpx
    import ray
    from ray import serve

    from serving.app import build_app
    from training.data.export import export_domain

    data = tempfile.mkdtemp(prefix="mergeserve-vqa-bench-")
    archive = os.path.join(data, f"{family}.tar.gz")
    export_domain("scenes_vqa", family, archive, limit=n)
    one = os.path.join(data, "one.tar.gz")
    export_domain("scenes_vqa", family, one, limit=1, split="test")
    import tarfile

    with tarfile.open(one) as tf:
        img = base64.b64encode(tf.extractfile("images/00000.png").read()).decode()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(namespace="mergeserve", include_dashboard=False, log_to_driver=False)
    port = _free_port()
    t0 = time.time()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"data_dir": data, "bootstrap": [], "vqa": {"bootstrap": []}}), name="mergeserve",
              route_prefix="/")
    ready_s = time.time() - t0
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    body = {"image": img, "question": "how many circles are there?"}
    lat, fails, versions, stop = [], [], [], threading.Event()

    def client() -> None:
        c = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        while not stop.is_set():
            t = time.perf_counter()
            r = c.post("/v1/vqa", json=body)
            lat.append(time.perf_counter() - t)
            if r.status_code != 200:
                fails.append(r.status_code)
            else:
                versions.append(r.json()["adapter_version"])

    th = threading.Thread(target=client)
    th.start()
    time.sleep(3)
    t1 = time.time()
    with open(archive, "rb") as f:
        r = http.post("/v1/domains", data={"name": family, "task": "vqa"}, files={"archive": (archive, f.read())})
    r.raise_for_status()
    job_id = r.json()["job_id"]
    while (job := http.get(f"/v1/jobs/{job_id}").json())["status"] not in ("succeeded", "failed", "rejected"):
        time.sleep(0.2)
    post_to_swapped = time.time() - t1
    time.sleep(2)
    stop.set()
    th.join()
    serve.shutdown()
    ray.shutdown()
    return {"ready_s": ready_s, "status": job["status"], "post_to_swapped_s": post_to_swapped,
            "timings": job["timings"], "gate": job["gate"], "requests": len(lat), "failed": len(fails),
            "versions_monotone": versions == sorted(versions), "first_last": (versions[0], versions[-1]),
            "p50_ms": 1000 * float(np.percentile(lat, 50)), "p99_ms": 1000 * float(np.percentile(lat, 99))}


def main() -> int:
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores\n")
    print(f"{'model':<30}{'batch':>6}{'questions/s':>14}")
    for name, b, rate in questions_per_second():
        print(f"{name:<30}{b:>6}{rate:>14.1f}")
    res = ingest_while_asking()
    print()
    print(f"{'server ready (s)':<36}{res['ready_s']:.1f}")
    print(f"{'job status':<36}{res['status']}")
    print(f"{'POST /v1/domains -> swapped (s)':<36}{res['post_to_swapped_s']:.1f}")
    for k, v in res["timings"].items():
        print(f"{'  ' + k + ' (s)':<36}{v:.2f}")
    print(f"{'gate':<36}new {res['gate']['new']:.3f} vs zero-shot {res['gate']['zero_shot']:.3f}")
    print(f"{'questions during ingest':<36}{res['requests']} ({res['failed']} failed)")
    print(f"{'versions non-decreasing':<36}{res['versions_monotone']} {res['first_last']}")
    print(f"{'latency p50 / p99 (ms)':<36}{res['p50_ms']:.1f} / {res['p99_ms']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
