"""``mergeserve demo``: merge random LoRA task vectors with every registered method and print a table.

Shows, on synthetic LoRAs that share a global starting point (as PAM's temporary adapters do), how far
each merge lands from each task's own ΔW, and how much factor-space averaging deviates from the exact
delta-space average (the cross-term trap).
"""

from __future__ import annotations

import argparse
import time

import torch

import merge


def add_arguments(p: argparse.ArgumentParser) -> None:
    """CLI flags for the demo."""
    p.add_argument("--tasks", type=int, default=3, help="number of task LoRAs to merge (default 3)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--dim", type=int, default=128, help="width of each square target layer (default 128)")
    p.add_argument("--seed", type=int, default=0, help="RNG seed (default 0)")


def _task_loras(tasks: int, rank: int, dim: int, g: torch.Generator) -> tuple[dict, list[dict]]:
    mods = [f"blocks.{i}.attn.qkv" for i in range(4)]
    glob = {}
    for m in mods:
        glob[f"{m}.lora_A.weight"] = torch.randn(rank, dim, generator=g) / dim**0.5
        glob[f"{m}.lora_B.weight"] = torch.randn(dim, rank, generator=g) / rank**0.5
    # each task fine-tunes a clone of the global LoRA: global + a task-specific perturbation
    tasks_ = [{k: v + 0.5 * v.std() * torch.randn(v.shape, generator=g) for k, v in glob.items()} for _ in range(tasks)]
    return glob, tasks_


def run(args: argparse.Namespace) -> int:
    """Print one row per merge method: time, mean cosine to the task deltas, relative norm."""
    g = torch.Generator().manual_seed(args.seed)
    glob, loras = _task_loras(args.tasks, args.rank, args.dim, g)
    deltas = [merge.lora_to_delta(lo, 1.0) for lo in loras]
    w = [1.0 / args.tasks] * args.tasks
    print(f"{'method':<16}{'ms':>8}{'cos→tasks':>12}{'‖merged‖/‖avg‖':>18}")
    ref = torch.cat([v.flatten() for v in merge.average(deltas).values()])
    for name, fn in merge.MERGE_METHODS.items():
        t0 = time.perf_counter()
        out = fn(deltas, w)
        ms = 1e3 * (time.perf_counter() - t0)
        flat = torch.cat([v.flatten() for v in out.values()])
        cos = sum(
            torch.nn.functional.cosine_similarity(flat, torch.cat([v.flatten() for v in d.values()]), dim=0)
            for d in deltas
        ) / len(deltas)
        print(f"{name:<16}{ms:>8.2f}{float(cos):>12.3f}{float(flat.norm() / ref.norm()):>18.3f}")
    factor_avg = merge.lora_to_delta(merge.average(loras), 1.0)
    err = sum((factor_avg[k] - v).norm() ** 2 for k, v in merge.average(deltas).items()) ** 0.5 / ref.norm()
    print(f"\nfactor-space average vs exact ΔW average: relative error {float(err):.3f} (cross terms BᵢAⱼ)")
    _, n = merge.pam_align(loras[0], glob, percent=50.0)
    total = sum(v.numel() for v in glob.values())
    print(f"pam_align(p=50%) on task 0: {n} of {total} elements reset")
    return 0
