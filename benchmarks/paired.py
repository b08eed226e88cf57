"""Paired differences between methods over `mergeserve bench dil` runs, with 95 % intervals.

Each JSON file is one `bench dil` output (one seed, several orders); a run is a (file, order) pair and
every method saw the same runs, so differences are paired run by run (`training.metrics.paired_difference`).

    .venv/bin/python benchmarks/paired.py s0.json s1.json s2.json --pairs pam-average,pam-finetune
    .venv/bin/python benchmarks/paired.py s0.json --metrics ACC,BWT --pairs tall-average

Prints, per pair and metric: mean difference in points, its 95 % t interval, n runs, and "yes" when the
interval excludes 0.
"""

from __future__ import annotations

import argparse
import json
import sys

from training.metrics import paired_difference


def per_run(files: list[dict], method: str, metric: str) -> list[float]:
    """``metric`` of ``method`` for every (file, order), in a fixed order."""
    out = []
    for res in files:
        if method not in res["results"]:
            raise KeyError(f"method {method!r} is not in every file (has {sorted(res['results'])})")
        out += [run["metrics"][metric] for run in res["results"][method]["runs"]]
    return out


def table(files: list[dict], pairs: list[tuple[str, str]], metrics: list[str]) -> list[dict]:
    """One row per (pair, metric): the paired difference in percentage points."""
    rows = []
    for a, b in pairs:
        for m in metrics:
            d = paired_difference(per_run(files, a, m), per_run(files, b, m))
            rows.append({"pair": f"{a} − {b}", "metric": m, **{k: 100 * d[k] for k in ("mean", "lo", "hi")},
                         "n": d["n"], "real": d["lo"] > 0 or d["hi"] < 0})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="bench dil JSON outputs (one per seed)")
    p.add_argument("--pairs", default="pam-average,pam-finetune", help="comma-separated A-B method pairs")
    p.add_argument("--metrics", default="ACC,BWT")
    args = p.parse_args(argv)
    files = []
    for f in args.files:
        with open(f) as fh:
            files.append(json.load(fh))
    pairs = [tuple(x.split("-", 1)) for x in args.pairs.split(",")]
    print("| pair | metric | mean (points) | 95 % interval | runs | interval excludes 0 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in table(files, pairs, args.metrics.split(",")):
        print(f"| {r['pair']} | {r['metric']} | {r['mean']:+.1f} | [{r['lo']:+.1f}, {r['hi']:+.1f}] | {r['n']} "
              f"| {'yes' if r['real'] else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
