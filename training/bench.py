"""``mergeserve bench dil``: the domain-incremental protocol over methods and task orders.

For each method and order: evaluate the initial model on every domain (the FWT reference), then for
each domain train (``begin_domain`` / ``train_step``), measure the trained adapter on its own domain
(A_t), merge (``end_domain``), and measure every domain (a row of A). Metrics per run, then mean ± std
over orders, as in the PAM paper's tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import numpy as np
import torch
from pydantic import ValidationError
from tqdm import tqdm

from . import metrics
from .configs import CONFIGS, BenchConfig
from .data import Benchmark, Domain, load_benchmark
from .strategies import LearnerContext, create_strategy
from .tasks import Task, get_task, prepare

METRICS = ["ACC", "BWT", "FWT", "A_t", "A_m"]


def domain_orders(names: list[str], n: int, seed: int) -> list[list[str]]:
    """Order 0 is the benchmark's own; the others are seeded permutations (distinct where possible)."""
    orders, rng = [list(names)], np.random.RandomState(seed)
    for _ in range(200 * n):
        if len(orders) >= n:
            break
        o = [names[i] for i in rng.permutation(len(names))]
        if o not in orders:
            orders.append(o)
    return orders[:n]


def run_one(
    method: str, ctx: LearnerContext, bench: Benchmark, order: list[str], hyper: dict, bar: tqdm | None = None
) -> dict:
    """One method on one order: returns the accuracy matrix, A_t entries, zero-shot row and metrics.

    ``hyper`` is the method's dict; the strategy parses it (``training.hyper.BENCH_HYPER``), and its
    ``steps`` / ``lr`` override ``ctx.train`` for this method only.

    Raises:
        HyperError: an unknown key or a bad value in ``hyper``.
    """
    s = create_strategy(method, ctx, **hyper)  # ``method`` may be a METHOD@VARIANT label
    doms: list[Domain] = [bench.domain(n) for n in order]
    for d in doms:
        if (d.name, ctx.seed) not in ctx.zero_shot_cache:
            ctx.zero_shot_cache[(d.name, ctx.seed)] = s.evaluate(d)
    zero = [ctx.zero_shot_cache[(d.name, ctx.seed)] for d in doms]
    a, pre, t0 = [], [], time.perf_counter()
    for d in doms:
        gen = torch.Generator().manual_seed(ctx.seed * 1009 + [x.name for x in bench.domains].index(d.name))
        loss = None
        for _ in range(s.begin_domain(d)):
            idx = torch.randint(len(d.y_train), (ctx.train.batch_size,), generator=gen)
            loss = s.train_step(*d.batch(idx))
        pre.append(s.evaluate(d))
        s.end_domain()
        a.append([s.evaluate(x) for x in doms])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(method=method, domain=d.name, loss=f"{float(loss):.3f}" if loss is not None else "cached")
    out = {
        "order": order,
        "A": a,
        "pre": pre,
        "zero_shot": zero,
        "metrics": metrics.summarize(a, pre, zero),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    for k in ("n_reset", "align_calls", "fit_seconds"):
        if hasattr(s, k):
            out[k] = getattr(s, k)
    if hasattr(s, "alpha"):
        out["alpha"] = [round(float(v), 4) for v in s.alpha]
    return out


def _setup(cfg: BenchConfig, seed: int, task: Task | None,
           bench: Benchmark | None = None) -> tuple[Benchmark, LearnerContext]:
    """Seed ``seed``'s benchmark (its data seeded too when ``cfg.vary_data``, and prepared by the task: e.g.
    frozen-trunk features cached once per domain) and learner context. ``task`` None: ``classify`` on
    ``cfg.backbone`` over the benchmark's classes. ``bench``: an earlier seed's prepared benchmark, reused
    as it is (the data does not depend on the seed without ``vary_data``, and the prepared features come
    from the frozen pretrained trunk)."""
    if bench is None:
        bench = load_benchmark(cfg.benchmark, **{**cfg.benchmark_args, **({"seed": seed} if cfg.vary_data else {})})
    task = task or get_task("classify", backbone=cfg.backbone, class_names=bench.classes)
    bench = dataclasses.replace(bench, domains=[prepare(task, d) for d in bench.domains])  # idempotent
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    return bench, LearnerContext(task, task.build_base(seed).to(device), cfg.lora, cfg.train, seed, device)


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0.0 for a single run)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def paired(results: dict, pairs: list[str], keys: tuple[str, ...] = ("ACC", "BWT")) -> list[dict]:
    """Paired differences A − B per metric over the runs both methods made (same seed, same order), with
    the 95 % t interval of :func:`training.metrics.paired_difference`; pairs naming a method not run are
    skipped."""
    out = []
    for pair in pairs:
        a, b = pair.split("-", 1)
        if a not in results or b not in results:
            continue
        for k in keys:
            d = metrics.paired_difference([r["metrics"][k] for r in results[a]["runs"]],
                                              [r["metrics"][k] for r in results[b]["runs"]])
            out.append({"pair": f"{a} - {b}", "metric": k, **d})
    return out


def run_dil(cfg: BenchConfig, progress: bool = True) -> dict:
    """The whole protocol for ``cfg`` (``cfg.seeds`` seeds × ``cfg.orders`` orders); returns JSON-ready results."""
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    task = None if cfg.task is None else get_task(cfg.task, **cfg.task_args)
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    results: dict[str, dict] = {m: {"runs": []} for m in cfg.methods}
    bar = bench = None
    for seed in seeds:
        bench, ctx = _setup(cfg, seed, task, None if cfg.vary_data else bench)
        orders = domain_orders([d.name for d in bench.domains], cfg.orders, seed)
        if bar is None:
            total = len(seeds) * len(cfg.methods) * len(orders) * len(bench.domains)
            bar = tqdm(total=total, desc="bench dil", disable=not progress)
        for m in cfg.methods:
            for o in orders:
                run = run_one(m, ctx, bench, o, cfg.hyper.get(m, {}), bar)
                results[m]["runs"].append({"seed": seed, **run})
    bar.close()
    return summarize(json.loads(cfg.model_dump_json()), str(ctx.device), time.time() - t0, results)


def summarize(config: dict, device: str, wall_s: float, results: dict) -> dict:
    """The JSON record of runs: per method mean ± sample SD over its runs, per-domain zero-shot (from the
    runs' zero-shot rows, mean over seeds) and the paired differences of ``config["pairs"]``."""
    zero: dict[str, dict[int, float]] = {}
    for r in results.values():
        r["mean_std"] = {k: mean_sd([run["metrics"][k] for run in r["runs"]]) for k in r["runs"][0]["metrics"]}
        for run in r["runs"]:
            for name, z in zip(run["order"], run["zero_shot"]):
                zero.setdefault(name, {})[run.get("seed", 0)] = z
    return {
        "config": config,
        "device": device,
        "wall_s": round(wall_s, 1),
        "seeds": sorted({run.get("seed", 0) for r in results.values() for run in r["runs"]}),
        "std_ddof": 1,  # "± std" is the sample standard deviation over runs (seeds × orders)
        "zero_shot": {k: float(np.mean(list(v.values()))) for k, v in zero.items()},
        "paired": paired(results, config.get("pairs", [])),
        "results": results,
    }


def _run_key(run: dict) -> tuple[int, tuple[str, ...]]:
    """What identifies a run across methods and parts: its seed and its domain order."""
    return run.get("seed", 0), tuple(run["order"])


def combine(parts: list[dict], keep: list[list[str] | None] | None = None) -> dict:
    """Several ``bench dil`` outputs of one config as one record: the runs pooled per method, then
    :func:`summarize`. Parts may split the runs (one process per seed, or per seed and ``--domains`` order)
    or the methods (one method rerun under new hyper-parameters over the same runs).

    Args:
        parts: The outputs; the config is the first part's, with every part's methods and their hyper.
        keep: Per part, the methods to take from it (None: all); e.g. every method of an old record but the
            one a later part reran.

    Returns:
        The pooled record; each method's runs in one (seed, order) sequence, so paired differences pair
        the same runs.

    Raises:
        ValueError: a part lacks a kept method, one method has a run twice (the same seed and domain order)
            or two hyper-parameter sets, or the methods did not all make the same runs.
    """
    keep = keep or [None] * len(parts)
    runs: dict[str, list[dict]] = {}
    hyper: dict[str, dict] = {}
    for part, names in zip(parts, keep):
        missing = sorted(set(names or ()) - set(part["results"]))
        if missing:
            raise ValueError(f"a part has no runs of {missing}; it ran {list(part['results'])}")
        for m in names or part["results"]:
            h = part["config"].get("hyper", {}).get(m, {})
            if hyper.setdefault(m, h) != h:
                raise ValueError(f"the parts ran {m} with different hyper-parameters: {hyper[m]} and {h}")
            runs.setdefault(m, []).extend(part["results"][m]["runs"])
    # every run's position: the order of first appearance across parts, one sequence for every method
    pos = {k: i for i, k in enumerate(dict.fromkeys(_run_key(r) for rs in runs.values() for r in rs))}
    for m, rs in runs.items():
        if len({_run_key(r) for r in rs}) < len(rs):
            raise ValueError(f"the parts share runs (seed, order) of {m}: {sorted(map(_run_key, rs))}")
        if len(rs) != len(pos):
            raise ValueError(f"{m} made {len(rs)} of the {len(pos)} runs (seed, order) the parts hold")
        rs.sort(key=lambda r: pos[_run_key(r)])
    first = parts[0]["config"].get("methods", [])
    order = [m for m in first if m in runs] + [m for m in runs if m not in first]
    config = {**parts[0]["config"], "methods": order, "hyper": {m: h for m, h in hyper.items() if h}}
    results = {m: {"runs": runs[m]} for m in order}
    return summarize(config, parts[0]["device"], sum(p["wall_s"] for p in parts), results)


def per_domain(res: dict) -> dict[str, dict[str, float]]:
    """Per domain: zero-shot accuracy, A_t (each trained adapter on its own domain before any merge) averaged
    over every method's runs, and ``independent``'s own adapter when that method ran."""

    def pre(methods: list[str]) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for m in methods:
            for run in res["results"][m]["runs"]:
                for name, v in zip(run["order"], run["pre"]):
                    out.setdefault(name, []).append(v)
        return out

    every, own = pre(list(res["results"])), pre([m for m in res["results"] if m == "independent"])
    zs = res.get("zero_shot", {})
    return {n: {"zero_shot": zs.get(n, float("nan")), "A_t": float(np.mean(v)),
                "independent": float(np.mean(own[n])) if n in own else float("nan")} for n, v in every.items()}


def format_table(res: dict) -> str:
    """Paper-style table: mean ± sample SD (ddof = 1) over runs, in percent; then, when the results carry
    them, per-domain zero-shot / A_t and paired differences with 95 % intervals."""
    ddof = res.get("std_ddof", 0)
    n_runs = {len(r["runs"]) for r in res["results"].values() if "runs" in r}
    head = f"mean ± SD (ddof={ddof}) over {'/'.join(map(str, sorted(n_runs))) or '?'} runs, %"
    lines = [head, f"{'method':<12}" + "".join(f"{k:>16}" for k in METRICS)]
    for m, r in res["results"].items():
        cells = "".join(f"{100 * r['mean_std'][k][0]:>9.1f} ± {100 * r['mean_std'][k][1]:<4.1f}" for k in METRICS)
        lines.append(f"{m:<12}{cells}")
    if res.get("zero_shot") and all("runs" in r for r in res["results"].values()):
        lines += ["", f"{'domain':<12}{'zero-shot':>10}{'A_t':>8}{'A_t - zs':>10}{'independent':>13}"]
        for name, v in per_domain(res).items():
            lines.append(f"{name:<12}{100 * v['zero_shot']:>10.1f}{100 * v['A_t']:>8.1f}"
                         f"{100 * (v['A_t'] - v['zero_shot']):>+10.1f}{100 * v['independent']:>13.1f}")
    if res.get("paired"):
        lines += ["", f"{'paired difference':<24}{'metric':>7}{'mean':>8}{'95 % interval':>20}{'±':>6}{'n':>4}"]
        for d in res["paired"]:
            half, interval = (d["hi"] - d["lo"]) / 2, f"[{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"
            lines.append(f"{d['pair']:<24}{d['metric']:>7}{100 * d['mean']:>+8.1f}{interval:>20}{100 * half:>6.1f}"
                         f"{d['n']:>4}")
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    """Accuracy on each domain over time (order 0), one panel per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = list(res["results"])
    cols = min(3, len(ms))
    rows = (len(ms) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), sharey=True, squeeze=False)
    for ax, m in zip(axes.flat, ms):
        run = res["results"][m]["runs"][0]
        a = np.array(run["A"])
        for i, name in enumerate(run["order"]):
            ax.plot(range(i, len(a)), a[i:, i], marker="o", label=name)
        ax.set_title(m)
        ax.set_xticks(range(len(a)))
    for ax in axes.flat[len(ms) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("held-out accuracy")
    for ax in axes[-1]:
        ax.set_xlabel("after domain")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_hyper_args(items: list[str]) -> dict[str, dict]:
    """``["adaptive.spc=5", "pam.reinit=zero"]`` → ``{"adaptive": {"spc": 5}, "pam": {"reinit": "zero"}}``.

    Values become a bool (``true`` / ``false``), else an int, else a float, else stay a string; METHOD may
    be a ``METHOD@VARIANT`` label; ``BenchConfig`` then validates each method's
    dict through ``training.hyper`` (unknown keys and out-of-range values fail before any training).

    Raises:
        ValueError: for an item not of the form METHOD.KEY=VALUE.
    """
    out: dict[str, dict] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        method, dot, name = key.partition(".")
        if not (sep and dot and method and name):
            raise ValueError(f"--hyper takes METHOD.KEY=VALUE, got {item!r}")
        value: object = {"true": True, "false": False}.get(raw.lower(), raw)
        for cast in (int, float) if isinstance(value, str) else ():
            try:
                value = cast(raw)
                break
            except ValueError:
                continue
        out.setdefault(method, {})[name] = value
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """CLI flags of ``mergeserve bench``."""
    p.add_argument("suite", choices=["dil"], help="benchmark protocol (dil: domain-incremental)")
    p.add_argument("--config", default="digits5", choices=sorted(CONFIGS), help="base experiment config")
    p.add_argument(
        "--fast",
        action="store_true",
        help="CI smoke preset (= --config fast): every method, 2 digits5 domains, 20 steps, 1 order, vit_test",
    )
    p.add_argument("--benchmark", help="benchmark name (digits5, folder)")
    p.add_argument("--root", help="dataset root for --benchmark folder (root/domain/class/image)")
    p.add_argument("--domains", help="comma-separated domain order (default: the benchmark's)")
    p.add_argument("--methods", help="comma-separated methods (default: all of the config's)")
    p.add_argument("--orders", type=int, help="number of task orders")
    p.add_argument("--seed", type=int, help="seed (the first one with --seeds)")
    p.add_argument("--seeds", type=int, help="number of seeds (seed, seed+1, ...): runs = seeds × orders")
    p.add_argument("--steps", type=int, help="optimizer steps per domain")
    p.add_argument("--backbone", help="registered backbone name")
    p.add_argument("--device", help="cpu, cuda or auto")
    p.add_argument(
        "--hyper",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="method hyper-parameter, repeatable, e.g. --hyper adaptive.spc=5 --hyper pam.percent=30; "
        "with --methods pam,pam@p30 one run compares settings (--hyper pam@p30.percent=30)",
    )
    p.add_argument("--out", default="results.json", help="JSON output path (default results.json)")
    p.add_argument("--combine", nargs="+", metavar="JSON[:METHODS]", help="pool earlier outputs of one config "
                   "(one per seed, or seed and --domains order, or method) into one table and --out file instead "
                   "of running; JSON:m1,m2 takes only those methods from that file")
    p.add_argument("--plot", help="write a PNG of accuracy per domain over time")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``mergeserve bench``."""
    if args.combine:
        parts, keep = [], []
        for spec in args.combine:
            head, sep, tail = spec.rpartition(":")  # FILE.json:m1,m2 keeps only those methods of FILE.json
            path, names = (head, tail) if sep and head.endswith(".json") else (spec, "")
            keep.append([m.strip() for m in names.split(",") if m.strip()] or None)
            try:
                with open(path) as f:
                    parts.append(json.load(f))
            except (OSError, ValueError) as e:  # missing, unreadable or not JSON
                print(f"mergeserve bench --combine: {path}: {e}", file=sys.stderr)
                return 2
        try:
            res = combine(parts, keep)
        except ValueError as e:
            print(f"mergeserve bench --combine: {e}", file=sys.stderr)
            return 2
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(format_table(res))
        print(f"\n{len(parts)} files, seeds {res['seeds']}; results in {args.out}")
        return 0
    cfg = CONFIGS["fast" if args.fast else args.config].model_copy(deep=True)
    upd: dict = {}
    for k in ("benchmark", "orders", "seed", "seeds", "backbone", "device"):
        if getattr(args, k) is not None:
            upd[k] = getattr(args, k)
    if args.methods:
        upd["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
    same = not args.benchmark or args.benchmark == cfg.benchmark
    bargs = dict(cfg.benchmark_args) if same else {}  # a preset's arguments belong to its own benchmark
    if args.root:
        bargs["root"] = args.root
    if args.domains:
        bargs["domains"] = [d.strip() for d in args.domains.split(",")]
    upd["benchmark_args"] = bargs
    if args.hyper:
        upd["hyper"] = {**cfg.hyper, **parse_hyper_args(args.hyper)}
    if args.steps is not None:
        upd["train"] = cfg.train.model_copy(update={"steps": args.steps})
    cfg = cfg.model_copy(update=upd)
    try:
        cfg = BenchConfig.model_validate(json.loads(cfg.model_dump_json()))  # re-validate the overrides
    except ValidationError as e:
        print(f"mergeserve bench: {'; '.join(err['msg'] for err in e.errors())}", file=sys.stderr)
        return 2
    res = run_dil(cfg)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(format_table(res))
    print(f"\nwall {res['wall_s']} s on {res['device']}; results in {args.out}")
    if args.plot:
        plot(res, args.plot)
        print(f"plot in {args.plot}")
    return 0


__all__ = ["domain_orders", "format_table", "parse_hyper_args", "plot", "run_dil", "run_one"]
