"""``bench-serve``'s default run: in-process throughput of the bare, merged and unmerged-LoRA model, then HTTP
latency on a fresh in-process server while a domain is ingested and swapped in."""

from __future__ import annotations

import copy
import os
import tempfile
import threading
import time

import numpy as np

from .harness import free_port, png_b64, private_ray_env


def throughput(backbone: str, batch: int = 32, seconds: float = 2.0, rounds: int = 5) -> list[tuple[str, float]]:
    """Images/s for bare, merged and unmerged-LoRA forward passes."""
    import torch

    from training.backbones import create_backbone, get_spec, preprocess
    from training.fold import materialise, to_delta
    from training.lora import LoraSettings, attach_lora, get_adapter, set_adapter

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
    from ray import serve

    from serving.app import build_app
    from training.data.export import export_domain

    data = tempfile.mkdtemp(prefix="mergeserve-bench-")
    private_ray_env(data)
    ray.init(namespace="mergeserve", include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"data_dir": data, "bootstrap": []}), name="mergeserve", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    body = {"image": png_b64(1, seed=0)[0]}
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
