"""``mergeserve bench-serve``: measure the server and print tables.

Default:

1. Inference throughput of the bare backbone, the backbone with the adapter *merged* into its weights
   (what replicas serve) and with peft's unmerged LoRA layers, in-process, batch 32 (:mod:`.swap`).
2. Through HTTP on a fresh in-process server (temp data dir, ``--clients`` concurrent clients):
   steady-state latency, latency while a domain is ingested and swapped in (the swap pause), failed
   requests, and the time from ``POST /v1/domains`` to the swap.

``--peers`` (:mod:`.compare`): the same model (``--backbone`` with the server's active adapter folded in,
read from the mergeserve data dir, exactly as a replica builds it) behind mergeserve itself (``build_app``,
one replica), the simplest idiomatic plain Ray Serve app and FastAPI + uvicorn (:mod:`.peers`). A load
generator in its own process (:mod:`.loadgen`, chosen by ``--loadgen``) runs ``N`` closed-loop clients per
cell. Also the server-side CPU time per request, by process role (:mod:`.accounting`), and the in-process
forward rate the batched cell is held against. ``--rss``: the summed RSS (and PSS) of every process of a
default ``mergeserve serve`` (:mod:`.server`). ``--ready``: launch of ``mergeserve serve`` to the first 200
from ``/readyz``.

Every server listens on 127.0.0.1 only; every Ray cluster started here uses a private ``RAY_TMPDIR``
(never joining another cluster on the machine) and is shut down; every subprocess is stopped.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys

from .accounting import format_rss
from .compare import CELLS, peers_bench
from .harness import on_sigterm
from .loadgen import LOADGENS, percentile
from .report import check_targets, format_cpu_table, format_peers_table
from .server import IDLE_S, serve_process_bench
from .swap import http_bench, throughput


def parse_cells(s: str) -> list[tuple[int, int]]:
    """``--cells``: ``"1x1,16x16"`` → ``[(1, 1), (16, 16)]`` (images per request × clients)."""
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
    g.add_argument("--cells", type=parse_cells, default=list(CELLS),
                   help="--peers: images×clients list (default 1x1,1x4,1x16,16x1,16x16)")
    g.add_argument("--loadgen", choices=tuple(LOADGENS), default="asyncio",
                   help="--peers: the client (default asyncio: one event loop, raw HTTP/1.1; threads: one httpx "
                   "client per thread, the generator before 2026-12-05, which cost ~0.5 ms CPU per request)")
    g.add_argument("--rss", action="store_true", help="summed RSS and PSS of every process of the default "
                   "`mergeserve serve`: the peak through its bootstrap training, and at rest")
    g.add_argument("--ready", action="store_true", help="time from launching `mergeserve serve` to 200 on /readyz")


def run_peers(args: argparse.Namespace) -> int:
    """``--peers`` / ``--rss`` / ``--ready``."""
    from training.backbones import get_spec

    weights = get_spec(args.backbone).weights()
    if weights and not os.path.exists(weights):  # the server would pretrain them first (many minutes)
        print(f"backbone weights missing: {weights}; run `mergeserve pretrain` first", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, on_sigterm)
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
            f"{phase:<22}{len(xs):>7}{1e3 * percentile(xs, 50):>10.1f}{1e3 * percentile(xs, 99):>10.1f}"
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
