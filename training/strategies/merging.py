"""Merge-based strategies: clone the global LoRA, train it on the new domain, merge it back.

``average`` is PAM without alignment; ``ties``, ``tall`` and ``magmax`` replace the average by a
post-training merge; ``pam`` adds :func:`merge.pam_align` every ``every`` steps (PAM paper, Alg. 1).
All merge in LoRA factor space, which PAM justifies because the temporary LoRA starts from the global
one (the cross terms BᵢAⱼ stay small). The first domain has no global LoRA yet: its adapter becomes
the global one unmerged (Algorithm 1 starts at t = 2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

import merge

from ..lora import get_adapter, set_adapter
from . import register_strategy
from .base import LearnerContext
from .sequential import FineTune

Adapter = dict[str, torch.Tensor]


#: method -> combine(W_G, W') -> W_{G,t}; shared by the strategies below and the server's merge actor.
COMBINES: dict[str, Callable[[Adapter, Adapter], Adapter]] = {
    "finetune": lambda g, t: t,
    "average": lambda g, t: merge.average([g, t]),
    "pam": lambda g, t: merge.average([g, t]),
    "ties": lambda g, t: merge.ties([g, t], [1.0, 1.0], 0.5),
    "tall": lambda g, t: merge.tall_masks([g, t], [0.5, 0.5], 0.4, min_agree=2)[0],
    "magmax": lambda g, t: merge.magmax([g, t]),
}


class MergeLearner(FineTune):
    """Temporary LoRA cloned from the global one, optionally PAM-aligned, merged back by ``combine``."""

    def __init__(
        self,
        ctx: LearnerContext,
        combine: Callable[[Adapter, Adapter], Adapter],
        align_percent: float | None = None,
        every: int = 20,
        reinit: Literal["global", "zero"] = "global",
        **_: object,
    ) -> None:
        super().__init__(ctx)
        if every < 1:
            raise ValueError(f"alignment schedule 'every' must be >= 1, got {every}")
        self.combine, self.percent, self.every, self.reinit = combine, align_percent, every, reinit
        self.global_: Adapter | None = None  # W_{G,t-1}; None before the first domain is learned
        self.seen = 0
        self.n_reset = 0  # elements re-initialised by alignment, over the whole run
        self.align_calls = 0

    def begin_domain(self, domain: object) -> int:
        self.global_ = get_adapter(self.learner.model) if self.seen else None  # W' = W_{G,t-1}: a clone
        return super().begin_domain(domain)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.learner.train_step(x, y)
        if self.percent is not None and self.global_ is not None and self.learner.step % self.every == 0:
            aligned, n = merge.pam_align(get_adapter(self.learner.model), self.global_, self.percent, self.reinit)
            set_adapter(self.learner.model, aligned)
            self.n_reset += n
            self.align_calls += 1
        return loss

    def end_domain(self) -> None:
        super().end_domain()
        self.seen += 1
        if self.global_ is not None:
            set_adapter(self.learner.model, self.combine(self.global_, get_adapter(self.learner.model)))


@register_strategy("average")
def average(ctx: LearnerContext, **_: object) -> MergeLearner:
    """Avg(W_G, W') without alignment (PAM paper, baseline 10)."""
    return MergeLearner(ctx, COMBINES["average"])


@register_strategy("pam")
def pam(
    ctx: LearnerContext, percent: float = 50.0, every: int = 20, reinit: str = "global", **_: object
) -> MergeLearner:
    """PAM: p = 50% as in the paper; s = 20 because our domains take 80 steps, not thousands (paper: 100)."""
    return MergeLearner(ctx, COMBINES["pam"], align_percent=percent, every=every, reinit=reinit)


@register_strategy("ties")
def ties(ctx: LearnerContext, density: float = 0.5, **_: object) -> MergeLearner:
    """peft's TIES of (W_G, W') with weights (1, 1): disjoint mean of sign-agreeing top-``density`` entries."""
    return MergeLearner(ctx, lambda g, t: merge.ties([g, t], [1.0, 1.0], density))


@register_strategy("tall")
def tall(ctx: LearnerContext, lam: float = 0.4, **_: object) -> MergeLearner:
    """Consensus TALL of (W_G, W'): τ_MTL = average, kept where both task masks agree (λ = 0.4)."""
    return MergeLearner(ctx, lambda g, t: merge.tall_masks([g, t], [0.5, 0.5], lam, min_agree=2)[0])


@register_strategy("magmax")
def magmax(ctx: LearnerContext, **_: object) -> MergeLearner:
    """MagMax of (W_G, W'): per element the larger magnitude (PAM paper, baseline 9)."""
    return MergeLearner(ctx, COMBINES["magmax"])
