"""Cost of each offline backbone on this machine: parameters, input, forward images/s, LoRA step time.

    .venv/bin/python benchmarks/backbones.py --threads 2 --seconds 5

Forward: the bare backbone (a seeded 10-class head) in inference mode at batch 32 on uint8 digits,
preprocessing included. Step: one AdamW step of the LoRA learner (r = 8, batch 64) the benchmark and the
server's trainer use. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

from training.backbones import create_backbone, get_spec, preprocess
from training.data import ImageSamples
from training.lora import LoraSettings
from training.settings import TrainSettings
from training.strategies import LearnerContext, create_strategy
from training.tasks import get_task


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``fn`` over ``seconds`` after two warm-up calls."""
    fn(), fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - t0)


def measure(name: str, seconds: float) -> dict:
    spec, base = get_spec(name), create_backbone(name, 10, seed=0).eval()
    x = torch.randint(0, 256, (64, 3, 28, 28), dtype=torch.uint8)
    y = torch.randint(0, 10, (64,))
    with torch.inference_mode():
        fwd = 32 * rate(lambda: base(preprocess(spec, x[:32])), seconds)
    task = get_task("classify", backbone=name, class_names=[str(i) for i in range(10)])
    s = create_strategy("finetune", LearnerContext(task, task.build_base(0), LoraSettings(), TrainSettings(), 0))
    samples = ImageSamples(x, y)
    step = 1 / rate(lambda: s.train_step(samples, y), seconds)
    return {"params": sum(p.numel() for p in base.parameters()) / 1e6, "input": spec.img_size, "fwd": fwd, "step": step}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", default="vit_tiny_offline,efficientnet_lite0_offline")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| backbone | parameters (M) | input px | forward images/s (batch 32) | LoRA step s (batch 64) |"
          "\n| --- | --- | --- | --- | --- |")
    for name in args.backbones.split(","):
        r = measure(name, args.seconds)
        print(f"| {name} | {r['params']:.2f} | {r['input']} | {r['fwd']:.0f} | {r['step']:.3f} |")
    print(f"\n{args.threads} thread(s), torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
