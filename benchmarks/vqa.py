"""The VQA task's serving numbers. Prints two tables.

1. Questions/s of each offline VQA model in process (``film_scenes``, the default, and ``vilt_scenes``): bare
   model, a LoRA adapter folded into its weights (what ``VqaModel`` replicas serve) and peft's unmerged LoRA
   layers; batch 1 and 32, every model and variant interleaved round by round, median reported.
2. Over HTTP (server in process, temp data dir, default config with no bootstrap): ``POST /v1/domains``
   with ``task=vqa`` (a family the default model never trained on: ``where``, 1,250 questions, of which
   the server holds 250 out) → swapped, its phases and gate, and what one client asking questions in a
   closed loop saw meanwhile (requests, failures, versions).

    .venv/bin/python benchmarks/vqa.py                          # ~5 minutes on 2 cores
    .venv/bin/python benchmarks/vqa.py --family count --n 600   # another family / size
"""

from __future__ import annotations

import base64
import copy
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serving.ports import free_port  # noqa: E402


def questions_per_second(batches: tuple[int, ...] = (1, 32), seconds: float = 2.0, rounds: int = 5,
                         models: tuple[str, ...] = ("film_scenes", "vilt_scenes")) -> list[tuple]:
    """(model, variant, batch, questions/s) for bare, merged and unmerged-LoRA forward passes of each model."""
    import torch

    from training.data.scenes import make_family
    from training.fold import materialise, to_delta
    from training.lora import LoraSettings, get_adapter, set_adapter
    from training.tasks import attach_lora, get_task

    cfg = LoraSettings()
    runs = {}
    for name in models:
        task = get_task("vqa", model_name=name)
        base = task.build_base()
        pm = attach_lora(task, copy.deepcopy(base), cfg)
        ad = {k: v + 0.01 * torch.randn_like(v) for k, v in get_adapter(pm).items()}
        set_adapter(pm, ad)
        for variant, m in (("bare", base), ("adapter folded into weights", materialise(base, to_delta(ad, cfg))),
                           ("peft LoRA, unmerged", pm.eval())):
            runs[(name, variant)] = (task, m)
    s = make_family("count", max(batches), seed=1)
    rows = []
    with torch.inference_mode():
        for b in batches:
            # from pixels, as a request comes: film_scenes' trunk runs on every question
            tasks = {name: task for (name, _), (task, _) in runs.items()}  # one batch per model, not per variant
            batches_ = {name: t.make_batch(s.subset(slice(0, b))) for name, t in tasks.items()}
            rates: dict[tuple, list[float]] = {k: [] for k in runs}
            for _ in range(rounds):  # interleaved: robust to drift on a shared machine
                for k, (task, m) in runs.items():
                    for _ in range(3):
                        task.forward(m, batches_[k[0]])
                    n, t0 = 0, time.perf_counter()
                    while time.perf_counter() - t0 < seconds:
                        task.forward(m, batches_[k[0]])
                        n += b
                    rates[k].append(n / (time.perf_counter() - t0))
            rows += [(*k, b, float(np.median(v))) for k, v in rates.items()]
    return rows


def ingest_while_asking(family: str = "where", n: int = 1250) -> dict:
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
        question = json.loads(tf.extractfile("questions.jsonl").readline())["question"]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(namespace="mergeserve", include_dashboard=False, log_to_driver=False)
    port = free_port()
    t0 = time.time()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"data_dir": data, "bootstrap": [], "vqa": {"bootstrap": []}}), name="mergeserve",
              route_prefix="/")
    ready_s = time.time() - t0
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    body = {"image": img, "question": question}
    lat, fails, versions, stop = [], [], [], threading.Event()

    # the VQA replica starts with the first question (vqa.initial_replicas 0): wait for it before measuring
    warm = httpx.post(f"http://127.0.0.1:{port}/v1/vqa", json=body, timeout=600)
    warm.raise_for_status()

    def client() -> None:
        c = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        while not stop.is_set():
            t = time.perf_counter()
            try:
                r = c.post("/v1/vqa", json=body)
            except httpx.HTTPError as e:  # a failed question, counted, not a dead client
                fails.append(type(e).__name__)
                continue
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
    accuracy = http.get("/v1/domains", params={"task": "vqa"}).json()["domains"]  # before the server goes
    serve.shutdown()
    ray.shutdown()
    return {"ready_s": ready_s, "status": job["status"], "post_to_swapped_s": post_to_swapped,
            "timings": job["timings"], "gate": job["gate"], "requests": len(lat), "failed": len(fails),
            "failures": sorted(set(map(str, fails))), "accuracy": accuracy,
            "versions_monotone": versions == sorted(versions), "first_last": (versions[0], versions[-1]),
            "p50_ms": 1000 * float(np.percentile(lat, 50)), "p99_ms": 1000 * float(np.percentile(lat, 99))}


def main(argv: list[str] | None = None) -> int:
    import argparse

    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="where", help="scenes family to ingest (default where: new to film_scenes)")
    p.add_argument("--n", type=int, default=1250, help="questions uploaded (the server holds 20 %% out)")
    p.add_argument("--skip-rates", action="store_true", help="only the ingest over HTTP")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores\n")
    if not args.skip_rates:
        print(f"{'model':<14}{'variant':<30}{'batch':>6}{'questions/s':>14}")
        for name, variant, b, rate in questions_per_second():
            print(f"{name:<14}{variant:<30}{b:>6}{rate:>14.1f}")
    res = ingest_while_asking(args.family, args.n)
    print()
    print(f"{'server ready (s)':<36}{res['ready_s']:.1f}")
    print(f"{'job status':<36}{res['status']}")
    print(f"{'POST /v1/domains -> swapped (s)':<36}{res['post_to_swapped_s']:.1f}")
    for k, v in res["timings"].items():
        print(f"{'  ' + k + ' (s)':<36}{v:.2f}")
    print(f"{'gate':<36}new {res['gate']['new']:.3f} vs zero-shot {res['gate']['zero_shot']:.3f}")
    for d in res["accuracy"]:
        print(f"{'  held-out ' + d['name']:<36}{d['accuracy_now']} ({d['heldout']} questions)")
    print(f"{'questions during ingest':<36}{res['requests']} ({res['failed']} failed {res['failures']})")
    print(f"{'versions non-decreasing':<36}{res['versions_monotone']} {res['first_last']}")
    print(f"{'latency p50 / p99 (ms)':<36}{res['p50_ms']:.1f} / {res['p99_ms']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
