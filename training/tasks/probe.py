"""One-domain LoRA probe over the Task protocol: zero-shot accuracy, fine-tune on one domain, forgetting, fold check.

Run: ``python -m training.tasks.probe --family count`` (the ``vqa`` task on ``scenes_vqa``; pretrains the
offline ViLT first if it is not cached). Prints per-family held-out accuracy before and after LoRA
fine-tuning on one family, and whether folding ΔW into the weights (``merge_and_unload`` and the server's
own ``materialise``) predicts exactly what the adapter model predicts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
from peft import get_peft_model_state_dict

import merge

from ..data import Benchmark, load_benchmark
from ..lora import PREFIX, LoraSettings, materialise
from . import Task, attach_lora, evaluate, get_task, predict, prepare


def _predictions(task: Task, model: torch.nn.Module, bench: Benchmark, batch: int = 256) -> list[str]:
    out: list[str] = []
    with torch.inference_mode():
        for d in bench.domains:
            for i in range(0, len(d.test), batch):
                out += predict(task, model.eval(), task.make_batch(d.test.subset(slice(i, i + batch))))
    return out


def probe(
    task: Task,
    bench: Benchmark,
    family: str,
    steps: int = 80,
    batch_size: int = 64,
    lr: float = 3e-3,
    lora: LoraSettings | None = None,
    seed: int = 0,
) -> dict:
    """Fine-tune a fresh LoRA on ``family`` from the task's base model and measure every family.

    Returns:
        ``{"before": {family: acc}, "after": {...}, "forgetting": {...}, "fold_mismatches": {...}, "train_s": …}``.
    """
    lora = lora or LoraSettings()
    bench = dataclasses.replace(bench, domains=[prepare(task, d) for d in bench.domains])  # e.g. trunk features
    base = task.build_base(seed)
    before = {d.name: round(evaluate(task, base, d.test), 4) for d in bench.domains}
    pm = attach_lora(task, task.build_base(seed), lora, seed)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    train = bench.domain(family).train
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    pm.train()
    for _ in range(steps):
        b = task.make_batch(train.subset(torch.randint(len(train), (batch_size,), generator=g)))
        loss = task.loss(pm, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    train_s = time.time() - t0
    after = {d.name: round(evaluate(task, pm, d.test), 4) for d in bench.domains}
    preds = _predictions(task, pm, bench)
    adapter = {k.removeprefix(PREFIX): v.detach() for k, v in get_peft_model_state_dict(pm).items()}
    own = materialise(base, merge.lora_to_delta(adapter, lora.scaling))
    folded = pm.merge_and_unload()
    return {
        "family": family,
        "steps": steps,
        "before": before,
        "after": after,
        "forgetting": {k: round(before[k] - after[k], 4) for k in before if k != family},
        "fold_mismatches": {
            "merge_and_unload": sum(a != b for a, b in zip(preds, _predictions(task, folded, bench))),
            "materialise": sum(a != b for a, b in zip(preds, _predictions(task, own, bench))),
            "of": len(preds),
        },
        "train_s": round(train_s, 1),
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry: print the probe as a table and JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="vqa")
    p.add_argument("--benchmark", default="scenes_vqa")
    p.add_argument("--family", default="count")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--model", default=None, help="vqa: film_scenes (default) or vilt_scenes")
    p.add_argument("--weights", default=None, help="vqa: the model's pretrained weights (default: cache, else shipped)")
    p.add_argument("--batch", type=int, default=64, help="questions per step")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--families", help="scenes_vqa: comma-separated families to load (default all)")
    p.add_argument("--max-objects", type=int, help="scenes_vqa: scenes of 1..N objects (default 2..6)")
    p.add_argument("--n-train", type=int, help="training examples per family (default: the benchmark's)")
    p.add_argument("--n-test", type=int, help="held-out examples per family (default: the benchmark's)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    kw = {k: v for k, v in (("weights", args.weights), ("model_name", args.model)) if v}
    task = get_task(args.task, **kw)
    bkw = {"objects": (1, args.max_objects)} if args.max_objects else {}
    bkw.update({k: v for k, v in (("n_train", args.n_train), ("n_test", args.n_test)) if v is not None})
    bench = load_benchmark(args.benchmark, **bkw, **({"domains": args.families.split(",")} if args.families else {}))
    lora = LoraSettings(rank=args.rank, alpha=2 * args.rank)
    r = probe(task, bench, args.family, args.steps, batch_size=args.batch, lr=args.lr, lora=lora)
    print(f"{'family':10s} {'before':>7s} {'after':>7s}")
    for k in r["before"]:
        print(f"{k:10s} {r['before'][k]:7.3f} {r['after'][k]:7.3f}")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
