"""Markdown table of `mergeserve bench dil` outputs: mean ± sample SD (ddof = 1) over every run, in %.

    .venv/bin/python benchmarks/table.py s0.json s1.json --methods adaptive,adaptive@ties_w1 --metrics ACC,BWT

Several files (one per seed) pool their runs, so the SD is over seeds × orders (tables committed before
2026-12-08 printed the population SD, ddof = 0, and say so). ``--extra`` adds the
mean of a per-run list the strategy reports (``fit_seconds`` summed per run; ``alpha`` as the final α;
``n_reset`` summed per run).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from paired import per_run  # benchmarks/ is on sys.path when run as a script


def extra(files: list[dict], method: str, key: str) -> str:
    """A strategy's own per-run record: final α averaged over runs, or a per-run total."""
    vals = [run[key] for res in files for run in res["results"][method]["runs"] if key in run]
    if not vals:
        return "–"
    if key == "alpha":
        return "[" + ", ".join(f"{v:.2f}" for v in np.mean(np.array(vals), axis=0)) + "]"  # domain-order positions
    return f"{np.mean([np.sum(v) for v in vals]):.1f}"


def rows(files: list[dict], methods: list[str], metrics: list[str], extras: list[str]) -> list[str]:
    """One markdown row per method: mean ± sample SD (ddof = 1; points) of each metric, then the extras."""
    head = [f"{k} (mean ± SD, ddof=1)" for k in metrics]
    out = [f"| method | {' | '.join(head + extras)} | runs |", "|" + " --- |" * (len(metrics) + len(extras) + 2)]
    for m in methods:
        cells = []
        for k in metrics:
            v = 100 * np.array(per_run(files, m, k))
            cells.append(f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.1f}")
        cells += [extra(files, m, e) for e in extras]
        out.append(f"| {m} | {' | '.join(cells)} | {len(v)} |")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="bench dil JSON outputs (one per seed)")
    p.add_argument("--methods", help="comma-separated methods or labels (default: those of the first file)")
    p.add_argument("--metrics", default="ACC,BWT,FWT,A_t,A_m")
    p.add_argument("--extra", default="", help="comma-separated per-run records: alpha, fit_seconds, n_reset")
    args = p.parse_args(argv)
    files = []
    for f in args.files:
        with open(f) as fh:
            files.append(json.load(fh))
    methods = args.methods.split(",") if args.methods else list(files[0]["results"])
    extras = [e for e in args.extra.split(",") if e]
    print("\n".join(rows(files, methods, args.metrics.split(","), extras)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
