"""Can the offline ViLT learn one question family? Training and held-out accuracy every few steps.

Compares what is trained: the task's LoRA (every encoder Linear), the LoRA plus the pooler and the answer
head's Linears (as LoRA, so they would merge like the rest), or every weight (full fine-tuning). Used for
the "what was measured" tables of docs/vqa.md.

    .venv/bin/python benchmarks/vqa_fit.py --family where --objects 1 --train lora --lr 1e-3 --steps 300
    .venv/bin/python benchmarks/vqa_fit.py --family where --objects 1 --train full --lr 1e-3 --steps 300

About 4 minutes per run of 300 steps of 64 on one thread (2-core development machine).
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from training.data import load_benchmark
from training.lora import LoraSettings
from training.tasks import attach_lora, evaluate, get_task


def _extra_targets(task: object) -> None:
    """Widen the task's LoRA targets to the pooler and the answer head's Linear layers."""
    own = task.lora_targets

    def targets(model: nn.Module) -> list[str]:
        bare = model.get_base_model() if hasattr(model, "get_base_model") else model
        extra = [n for n, m in bare.named_modules()
                 if isinstance(m, nn.Linear) and ("pooler" in n or "classifier" in n)]
        return own(model) + extra

    task.lora_targets = targets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="where")
    p.add_argument("--objects", type=int, default=1, help="scenes of 1..N objects")
    p.add_argument("--train", choices=["lora", "lora+head", "full"], default="lora")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--every", type=int, default=50, help="evaluate every N steps")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = get_task("vqa")
    d = load_benchmark("scenes_vqa", domains=[args.family], n_train=1000, n_test=300,
                       objects=(1, args.objects)).domain(args.family)
    if args.train == "full":
        model = task.build_base(0)
        for w in model.parameters():
            w.requires_grad_(True)
    else:
        if args.train == "lora+head":
            _extra_targets(task)
        model = attach_lora(task, task.build_base(0), LoraSettings(rank=8, alpha=16), 0)
    opt = torch.optim.AdamW([w for w in model.parameters() if w.requires_grad], lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    seen = d.train.subset(slice(0, 300))  # training accuracy on a fixed slice of what it trains on
    print(f"{'step':>5} {'loss':>6} {'train':>6} {'held-out':>8}")
    print(f"{0:>5} {'':>6} {evaluate(task, model, seen):6.3f} {evaluate(task, model, d.test):8.3f}", flush=True)
    for step in range(1, args.steps + 1):
        model.train()
        batch = task.make_batch(d.train.subset(torch.randint(len(d.train), (args.batch,), generator=g)))
        loss = task.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.every == 0:
            print(f"{step:>5} {loss.item():6.3f} {evaluate(task, model, seen):6.3f} "
                  f"{evaluate(task, model, d.test):8.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
