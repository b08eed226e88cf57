"""Strategies without merging: ``finetune`` (lower bound), ``joint`` (upper bound), ``independent`` (oracle)."""

from __future__ import annotations

import torch

from ..data import Domain
from ..lora import get_adapter, set_adapter
from . import register_strategy
from .base import LearnerContext, LoraLearner


@register_strategy("finetune")
class FineTune:
    """One LoRA trained sequentially on every domain: the forgetting baseline (PAM paper, baseline 4)."""

    # The first domain is trained exactly as `independent` trains that domain's adapter (same initial
    # adapter, batches and optimizer), so it is shared through ctx.independent_cache.
    shares_first_domain = True

    def __init__(self, ctx: LearnerContext, **_: object) -> None:
        self.learner = LoraLearner(ctx)
        self.n_domains = 0

    def begin_domain(self, domain: Domain) -> int:
        self.current = domain.name
        if self.n_domains == 0 and self.shares_first_domain:
            return train_independent(self.learner.ctx, self.learner, domain)
        self.learner.reset_optimizer()
        return self.learner.ctx.train.steps

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.learner.train_step(x, y)

    def end_domain(self) -> None:
        ctx = self.learner.ctx
        if self.n_domains == 0 and self.shares_first_domain:
            ctx.independent_cache.setdefault((self.current, ctx.seed), get_adapter(self.learner.model))
        self.n_domains += 1

    def evaluate(self, domain: Domain) -> float:
        return self.learner.evaluate(domain)

    def adapter(self) -> tuple[dict[str, torch.Tensor], str]:
        return get_adapter(self.learner.model), "lora"


@register_strategy("joint")
class Joint(FineTune):
    """Upper bound: one LoRA trained on the union of all domains seen so far.

    Incremental form, so the accuracy matrix is complete: on domain t the batches are drawn uniformly
    from the pooled training data of domains 1..t (full rehearsal). The final row is the multitask
    ("one LoRA on all domains at once") result the papers report.
    """

    shares_first_domain = False  # its batches come from its own pool generator

    def __init__(self, ctx: LearnerContext, **_: object) -> None:
        super().__init__(ctx)
        self.pool_x: list[torch.Tensor] = []
        self.pool_y: list[torch.Tensor] = []
        self.gen = torch.Generator().manual_seed(ctx.seed + 7)

    def begin_domain(self, domain: Domain) -> int:
        self.pool_x.append(domain.x_train)
        self.pool_y.append(domain.y_train)
        self.x, self.y = torch.cat(self.pool_x), torch.cat(self.pool_y)
        return super().begin_domain(domain)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        idx = torch.randint(len(self.y), (len(y),), generator=self.gen)  # replace the batch by a pooled one
        return self.learner.train_step(self.x[idx], self.y[idx])


def train_independent(ctx: LearnerContext, learner: LoraLearner, domain: Domain) -> int:
    """Load the cached single-domain adapter for ``domain`` into ``learner`` or prepare to train it.

    Returns the steps still to run (0 on a cache hit).
    """
    set_adapter(learner.model, learner.init_adapter)
    learner.reset_optimizer()
    cached = ctx.independent_cache.get((domain.name, ctx.seed))
    if cached is not None:
        set_adapter(learner.model, cached)
        return 0
    return ctx.train.steps


@register_strategy("independent")
class Independent(FineTune):
    """Oracle: one LoRA per domain from the same initial adapter, each evaluated on its own domain.

    Needs the domain identity at test time, which serving never has. Unseen domains are evaluated
    with the most recent adapter.
    """

    def __init__(self, ctx: LearnerContext, **_: object) -> None:
        super().__init__(ctx)
        self.ctx = ctx
        self.per_domain: dict[str, dict[str, torch.Tensor]] = {}

    def begin_domain(self, domain: Domain) -> int:
        self.current = domain.name
        return train_independent(self.ctx, self.learner, domain)

    def end_domain(self) -> None:
        ad = get_adapter(self.learner.model)
        self.ctx.independent_cache.setdefault((self.current, self.ctx.seed), ad)
        self.per_domain[self.current] = ad

    def evaluate(self, domain: Domain) -> float:
        own = self.per_domain.get(domain.name)
        if own is None:
            return self.learner.evaluate(domain)
        live = get_adapter(self.learner.model)
        set_adapter(self.learner.model, own)
        acc = self.learner.evaluate(domain)
        set_adapter(self.learner.model, live)
        return acc
