"""One or two ``Model`` replicas on the 2-core machine: does a second GIL buy the p99 target?

The one target `bench-serve --peers` still fails is p99 at 16 clients ≤ 2× p99 at 4. At 1 image × 16
clients the single replica uses ~0.97 of a core (one Python thread holds the GIL) while the whole
server uses ~1.2 of the 2, so a second replica process is the obvious candidate. Each variant starts
its own server (``_local_serve.py``, through the main port's HAProxy, as ``mergeserve serve`` runs) and
measures 1 × 4 and 1 × 16; variants run in the order given, so list each more than once to alternate.

    .venv/bin/python benchmarks/replicas.py --variants one,two,auto,one,two --seconds 8
    # 2026-12-06, 2 cores (vit_tiny_offline), req/s (p99 ms):
    #   one   1 x 4  858-898 (7.0-7.7)   1 x 16 1,265-1,382 (18.1-19.8)   p99 16 / p99 4: 2.58-2.60
    #   two   1 x 4  885-905 (9.2-9.3)   1 x 16 1,483-1,529 (19.7-20.5)   2.13-2.20
    #   auto  1 x 4  871 (7.9)           1 x 16 1,352 (21.0)              2.66 (stayed at one replica)
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _local_serve import classify_body, local_mergeserve  # noqa: E402

from benchmarks.serve.accounting import process_tree  # noqa: E402
from benchmarks.serve.loadgen import run_cell  # noqa: E402

#: ServerConfig overrides per variant
VARIANTS: dict[str, dict] = {
    "one": {"num_replicas": 1},  # the default
    "two": {"num_replicas": 2},  # one more torch process (~1 GB RSS) for good
    "auto": {"num_replicas": "auto",  # 1 at rest (RSS as the default), 2 once 16 clients queue
             "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 6,
                             "upscale_delay_s": 1}},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="one,two", help=f"comma-separated, of {sorted(VARIANTS)}")
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per cell (default 8)")
    p.add_argument("--backbone", default="vit_tiny_offline")
    args = p.parse_args()
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    print(f"{'variant':<7} {'cell':<6} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'replica CPU ms/req':>19} "
          f"{'server CPU ms/req':>18} {'errors':>6}  p99 16 / p99 4")
    for name in names:
        with local_mergeserve(args.backbone, config=VARIANTS[name]) as (base, _, tmp):
            body = classify_body(tmp, 1)
            p99 = {}
            for c in (4, 16):
                spec = {"url": f"{base}/v1/classify", "body_file": body, "clients": c, "warmup": 3.0,
                        "seconds": args.seconds, "loadgen": "asyncio"}
                # replicas may start during the cell (auto): look the processes up when it begins
                res = run_cell(spec, lambda _: process_tree(os.getpid()))
                n = max(res["requests"], 1)
                cpu = res.get("server_cpu_s", {})
                replica = 1e3 * sum(v for k, v in cpu.items() if k.startswith("replica")) / n
                p99[c] = res["p99_ms"]
                ratio = f"{p99[16] / p99[4]:.2f}" if c == 16 else ""
                print(f"{name:<7} 1 x {c:<2} {res['rps']:8.1f} {res['p50_ms']:7.1f} {res['p99_ms']:7.1f} "
                      f"{replica:19.2f} {1e3 * sum(cpu.values()) / n:18.2f} {res['errors']:>6}  {ratio}",
                      flush=True)


if __name__ == "__main__":
    main()
