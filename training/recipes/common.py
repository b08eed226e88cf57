"""What the offline VQA models' pretraining recipes share: pinned threads and the supervised loop."""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def run_record(t0: float, t_data: float) -> dict:
    """The provenance's record of the run itself: wall and data seconds, torch, threads, machine."""
    return {
        "wall_s": round(time.time() - t0, 1),
        "data_s": round(t_data, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),  # the recipe's pinned count
        "machine": platform.machine(),
    }


@contextmanager
def pinned_threads(threads: int) -> Iterator[None]:
    """Run with ``threads`` torch threads (float reductions, hence the weights, depend on it), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(1, total)))


def supervised(
    model: nn.Module,
    task: Any,
    pool: Callable[[int], Any],
    cfg: Any,
    progress: bool,
    t0: float,
) -> None:
    """AdamW with warm-up and cosine decay on the answer cross-entropy, batches drawn with replacement.

    Args:
        model: Trained in place (its parameters that require grad).
        task: Its ``training.tasks`` task (``make_batch``).
        pool: ``pool(step)`` → the samples step ``step`` draws from (a curriculum stage, or one pool).
        cfg: ``steps``, ``batch_size``, ``lr``, ``weight_decay``, ``warmup``, ``seed``.
        progress: Print the loss every 100 steps.
        t0: Start time of the whole recipe (for the printed seconds).
    """
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.warmup, cfg.steps))
    g = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for step in range(cfg.steps):
        train = pool(step)
        b = task.make_batch(train.subset(torch.randint(len(train), (cfg.batch_size,), generator=g)))
        loss = F.cross_entropy(model(**b.inputs).logits, b.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress and (step % 100 == 0 or step == cfg.steps - 1):
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.time() - t0:.0f} s", flush=True)
    model.eval()
