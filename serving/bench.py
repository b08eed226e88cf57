"""``mergeserve bench-serve``: measure the server and print tables.

1. Inference throughput of the bare backbone, the backbone with the adapter *merged* into its weights
   (what replicas serve) and with peft's unmerged LoRA layers, in-process, batch 32.
2. Through HTTP on a fresh in-process server (temp data dir, ``--clients`` concurrent clients):
   steady-state latency, latency while a domain is ingested and swapped in (the swap pause), failed
   requests, and the time from ``POST /v1/domains`` to the swap.
"""

from __future__ import annotations

import argparse
import base64
import copy
import io
import os
import statistics
import tempfile
import threading
import time

import numpy as np
import torch


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def throughput(backbone: str, batch: int = 32, seconds: float = 2.0, rounds: int = 5) -> list[tuple[str, float]]:
    """Images/s for bare, merged and unmerged-LoRA forward passes."""
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

    from training.data.export import export_domain

    from .app import build_app

    data = tempfile.mkdtemp(prefix="mergeserve-bench-")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    """CLI flags of ``mergeserve bench-serve``."""
    p.add_argument("--backbone", default="vit_tiny_offline", help="backbone for the throughput table")
    p.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients (default 4)")
    p.add_argument("--steady", type=float, default=15.0, help="seconds of steady-state load (default 15)")
    p.add_argument("--domain", default="sklearn", help="digits5 domain ingested during the load")
    p.add_argument("--skip-http", action="store_true", help="only the in-process throughput table")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``mergeserve bench-serve``."""
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
