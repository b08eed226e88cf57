"""Adaptive LoRA merging (Coleman et al. 2024): per-domain adapters, coefficients α learned on a buffer.

After each domain: train that domain's LoRA from the common initial adapter, add ``spc`` samples per
class to the replay buffer, then learn α = σ(c)·b (Eq. 2-3) by backprop through the merge on the buffer.
Merging happens in ΔW space (exact, no BᵢAⱼ cross terms) with ``merge.linear`` / ``ties`` /
``dare_ties``; the served adapter is the merged dense delta. Choices the paper leaves open: task vectors
are ΔW = s·B·A and, for the head, (head − initial head); c starts at the previous domains' learned
logits and 0 for the new one; DARE masks are fixed during fitting (one seeded generator per step) so the
loss surface does not move under the optimizer.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import merge

from ..backbones import preprocess
from ..buffer import ReplayBuffer
from ..data import Domain
from ..lora import functional_forward, get_adapter, materialise, to_delta
from . import register_strategy
from .base import LearnerContext, LoraLearner, accuracy
from .sequential import train_independent

BASES = ("linear", "ties", "dare_ties")


@register_strategy("adaptive")
class AdaptiveMerge:
    """One adapter per domain; the served adapter is their merge with learned coefficients."""

    def __init__(
        self,
        ctx: LearnerContext,
        base: str = "ties",
        spc: int = 1,
        b_max: float = 3.0,
        density: float = 0.5,
        fit_steps: int = 60,
        fit_lr: float = 0.1,
        **_: object,
    ) -> None:
        if base not in BASES:
            raise ValueError(f"adaptive base must be one of {BASES}, got {base!r}")
        self.ctx, self.base, self.b_max, self.density = ctx, base, b_max, density
        self.fit_steps, self.fit_lr = fit_steps, fit_lr
        self.learner = LoraLearner(ctx)
        self.buffer = ReplayBuffer(spc, seed=ctx.seed)
        self.init_delta = to_delta(self.learner.init_adapter, ctx.lora)
        self.tvs: list[dict[str, torch.Tensor]] = []
        self.alpha = torch.zeros(0)  # learned α after the last domain
        self.c = torch.zeros(0)  # its logits, carried over as the next fit's starting point
        self.unmerged = False
        self.merged: dict[str, torch.Tensor] | None = None
        self.served = None
        self.fit_seconds: list[float] = []

    def begin_domain(self, domain: Domain) -> int:
        self.domain = domain
        self.unmerged = True  # between training and merging, the trained adapter is what is evaluated
        return train_independent(self.ctx, self.learner, domain)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.learner.train_step(x, y)

    def _task_vector(self, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v if k.endswith(".delta") else v - self.init_delta[k] for k, v in delta.items()}

    def _merge(self, alpha: torch.Tensor, step_seed: int = 0) -> dict[str, torch.Tensor]:
        kw = {"density": self.density}
        if self.base == "dare_ties":
            kw["generator"] = torch.Generator().manual_seed(step_seed)
        tv = merge.MERGE_METHODS[self.base](self.tvs, alpha, **kw)
        return {k: v if k.endswith(".delta") else v + self.init_delta[k] for k, v in tv.items()}

    def end_domain(self) -> None:
        ad = get_adapter(self.learner.model)
        self.ctx.independent_cache.setdefault((self.domain.name, self.ctx.seed), ad)
        self.tvs.append(self._task_vector(to_delta(ad, self.ctx.lora)))
        self.buffer.add(self.domain.name, self.domain.x_train, self.domain.y_train)
        t0 = time.perf_counter()
        self.alpha, self.c = fit_coefficients(self, self.ctx)
        self.unmerged = False
        self.fit_seconds.append(time.perf_counter() - t0)
        self.merged = {k: v.detach() for k, v in self._merge(self.alpha, 0).items()}
        self.served = materialise(self.ctx.base, self.merged).to(self.ctx.device)

    def evaluate(self, domain: Domain) -> float:
        if self.served is None or self.unmerged:
            return self.learner.evaluate(domain)
        return accuracy(self.served, self.ctx.spec, domain, self.ctx.device, self.ctx.train.eval_batch)

    def adapter(self) -> tuple[dict[str, torch.Tensor], str]:
        if self.merged is None:
            return get_adapter(self.learner.model), "lora"
        return dict(self.merged), "delta"


def fit_coefficients(s: AdaptiveMerge, ctx: LearnerContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Learn α on the replay buffer by backprop through the merge (Coleman et al. 2024, Eq. 2-4).

    Returns:
        ``(alpha, c)``, detached, each of shape (number of adapters,).
    """
    n = len(s.tvs)
    init = torch.cat([s.c, torch.zeros(n - len(s.c))])
    coef = merge.AdaptiveCoefficients(n, s.b_max, init_c=init).to(ctx.device)
    opt = torch.optim.Adam(coef.parameters(), lr=s.fit_lr)
    x, y = s.buffer.tensors()
    x, y = preprocess(ctx.spec, x.to(ctx.device)), y.to(ctx.device)
    base = ctx.base.to(ctx.device).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    for _ in range(s.fit_steps):
        loss = F.cross_entropy(functional_forward(base, s._merge(coef(), step_seed=0), x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return coef().detach().cpu(), coef.c.detach().cpu()
