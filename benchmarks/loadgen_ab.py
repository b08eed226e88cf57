"""The two load generators of ``benchmarks/serve/loadgen.py`` against one mergeserve server, alternated.

What a closed-loop client measures includes the client: on 2 shared cores the thread-per-client httpx
generator spent ~0.45 ms CPU per request, and its 16 threads share one GIL, so an answer that had
arrived could wait before its clock stopped: its p99 at 16 clients was partly its own. This script
starts one mergeserve app (as ``benchmarks/ab_serve.py``, through the main port's HAProxy) and runs both
generators in ABBA order at 4 and 16 clients, one image per request.

    .venv/bin/python benchmarks/loadgen_ab.py --rounds 2 --seconds 8
    # 2026-12-05, 2 cores (vit_tiny_offline), 2 rounds, req/s (p99 ms):
    #   asyncio 1 x 4  909-944 (6.6-7.2),  1 x 16 1,391-1,437 (18.1-18.2); client CPU 0.06-0.09 ms/request
    #   threads 1 x 4  709-711 (9.0-9.2),  1 x 16   952-983 (28.8-29.3); client CPU 0.43-0.46 ms/request
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _local_serve import classify_body, local_mergeserve  # noqa: E402

from benchmarks.serve.accounting import process_tree  # noqa: E402
from benchmarks.serve.loadgen import LOADGENS, run_cell  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per cell (default 8)")
    p.add_argument("--rounds", type=int, default=2, help="rounds; the generators' order alternates (default 2)")
    p.add_argument("--clients", default="4,16", help="client counts (default 4,16)")
    p.add_argument("--backbone", default="vit_tiny_offline")
    args = p.parse_args()

    with local_mergeserve(args.backbone) as (base, _, tmp):
        procs = process_tree(os.getpid())
        body = classify_body(tmp, 1)
        kinds = sorted(LOADGENS)
        print(f"{'round':>5}  {'loadgen':<8} {'cell':<6} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'server CPU ms/req':>18} {'client CPU ms/req':>18} {'errors':>6}")
        for r in range(args.rounds):
            for kind in kinds if r % 2 == 0 else kinds[::-1]:
                for c in (int(x) for x in args.clients.split(",")):
                    spec = {"url": f"{base}/v1/classify", "body_file": body, "clients": c, "warmup": 2.0,
                            "seconds": args.seconds, "loadgen": kind}
                    res = run_cell(spec, lambda _: procs)
                    n = max(res["requests"], 1)
                    server = 1e3 * sum(res.get("server_cpu_s", {}).values()) / n
                    print(f"{r:>5}  {kind:<8} 1 x {c:<2} {res['rps']:8.1f} {res['p50_ms']:7.1f} {res['p99_ms']:7.1f} "
                          f"{server:18.2f} {1e3 * res['loadgen_cpu_s'] / n:18.2f} {res['errors']:>6}", flush=True)


if __name__ == "__main__":
    main()
