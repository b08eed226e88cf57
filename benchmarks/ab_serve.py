"""mergeserve vs the plain Ray Serve app at one cell, alternating, to see a few-percent difference.

One 30 s cell of ``mergeserve bench-serve --peers`` moves ±4 % between runs on 2 shared cores; this
script runs only the two Ray apps, in one cluster, and alternates them ``--rounds`` times (ABBA order)
so drift hits both alike. It prints each round and the mean ratio. The figures below were measured
with the ``threads`` load generator (``--loadgen threads``), the only one until 2026-12-05.

    .venv/bin/python benchmarks/ab_serve.py --images 16 --clients 16 --seconds 8 --rounds 4
    # 2026-12-04, 2 cores (vit_tiny_offline): mergeserve 70.3 req/s, plain 63.2 req/s, ratio 1.11×
    .venv/bin/python benchmarks/ab_serve.py --path direct --images 1 --clients 16 --rounds 6 --seconds 8
    # both apps on their replicas' own ports (Serve's direct ingress, as `mergeserve serve` runs)
    # 2026-12-05, 6 rounds: mergeserve 754.1 req/s, plain 684.5 req/s, ratio 1.10× (0.98× with --path proxy)
    .venv/bin/python benchmarks/ab_serve.py --path haproxy --images 1 --clients 16 --rounds 4 --seconds 8
    # the default path: both apps through the main port, Serve's HAProxy, as `mergeserve serve` runs;
    # 2026-12-05, 4 rounds: mergeserve 912.8 req/s, plain 733.7 req/s, ratio 1.24×
    # --path proxy: both through Serve's Python proxy, with direct ingress off
    # with the asyncio client (the default since 2026-12-05), 4 rounds:
    #   --path haproxy --images 1 --clients 16: mergeserve 1,377.1 req/s, plain 848.3 req/s, ratio 1.62×
    #   --path direct --images 16 --clients 16: mergeserve 218.0 req/s, plain 201.1 req/s, ratio 1.08×
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _local_serve import classify_body, local_mergeserve  # noqa: E402

from benchmarks.serve.accounting import command_line, process_tree, role_of  # noqa: E402
from benchmarks.serve.harness import wait_http  # noqa: E402
from benchmarks.serve.loadgen import LOADGENS, run_cell  # noqa: E402
from benchmarks.serve.peers import plain_serve_app, served_model_args  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=16, help="images per request (default 16)")
    p.add_argument("--clients", type=int, default=16, help="closed-loop clients (default 16)")
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per round and app (default 8)")
    p.add_argument("--rounds", type=int, default=4, help="rounds; the order alternates (default 4)")
    p.add_argument("--backbone", default="vit_tiny_offline")
    p.add_argument("--path", choices=("haproxy", "direct", "proxy"), default="haproxy",
                   help="how requests reach both apps: the main port with Serve's HAProxy in front of the "
                   "replicas' own ports (default, as `mergeserve serve`), those ports directly, or the main "
                   "port with Serve's Python proxy (direct ingress off)")
    p.add_argument("--loadgen", choices=tuple(LOADGENS), default="asyncio",
                   help="the client (default asyncio; threads: the httpx-per-thread generator used until 2026-12-05)")
    args = p.parse_args()

    import httpx
    from ray import serve

    from serving.app import direct_ports

    with local_mergeserve(args.backbone, direct=args.path != "proxy") as (base, cfg, tmp):
        ad = httpx.get(f"{base}/v1/adapters", timeout=30).json()
        active = next(v for v in ad["versions"] if v["version"] == ad["active"])
        model = served_model_args(args.backbone, cfg, active)
        serve.run(plain_serve_app(model, cfg.max_ongoing_requests), name="plain", route_prefix="/plain")
        wait_http(f"{base}/plain/healthz", 300)
        urls = {"mergeserve": f"{base}/v1/classify", "plain": f"{base}/plain/v1/classify"}
        if args.path == "direct":
            port_of = {app: direct_ports(app=app)[0] for app in urls}
            urls = {"mergeserve": f"http://127.0.0.1:{port_of['mergeserve']}/v1/classify",
                    "plain": f"http://127.0.0.1:{port_of['plain']}/plain/v1/classify"}
        procs = process_tree(os.getpid())
        replica = {peer: [q for q in procs if role_of(command_line(q)) == f"replica:{peer}"] for peer in urls}
        body = classify_body(tmp, args.images)
        rps: dict[str, list[float]] = {peer: [] for peer in urls}
        for r in range(args.rounds):
            for peer in ("mergeserve", "plain") if r % 2 == 0 else ("plain", "mergeserve"):
                spec = {"url": urls[peer], "body_file": body, "clients": args.clients, "warmup": 2.0,
                        "seconds": args.seconds, "loadgen": args.loadgen}
                res = run_cell(spec, lambda _, peer=peer: replica[peer])
                rps[peer].append(res["rps"])
                cpu = 1e3 * res.get("server_cpu_s", {}).get(f"replica:{peer}", float("nan")) / max(res["requests"], 1)
                print(f"round {r}  {peer:<10} {res['rps']:7.1f} req/s  p50 {res['p50_ms']:6.1f}  "
                      f"p99 {res['p99_ms']:6.1f} ms  replica CPU {cpu:5.2f} ms/request  errors {res['errors']}",
                      flush=True)
        ms, pl = (sum(v) / len(v) for v in (rps["mergeserve"], rps["plain"]))
        print(f"\n{args.path}: {args.images} img × {args.clients} clients, {args.rounds} rounds of {args.seconds:g} s: "
              f"mergeserve {ms:.1f} req/s, plain {pl:.1f} req/s, ratio {ms / pl:.2f}×")


if __name__ == "__main__":
    main()
