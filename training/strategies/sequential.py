"""Strategies without merging: ``finetune`` (lower bound), ``joint`` (upper bound), ``independent`` (oracle)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch

from ..data import Domain
from ..hyper import BENCH_HYPER, JointHyper, TrainHyper, parse_bench_hyper
from ..lora import get_adapter, set_adapter
from .base import LearnerContext, LoraLearner
from .protocol import Strategy, register_strategy


def train_context(ctx: LearnerContext, hyper: TrainHyper | None) -> LearnerContext:
    """``ctx`` with the hyper-parameters' ``steps`` / ``lr`` applied to its training settings.

    The settings are re-validated (``model_copy(update=...)`` would not be). A changed recipe gets an
    empty ``independent_cache``: adapters cached under the other recipe would be silently reused.

    Args:
        ctx: The context as configured (server or bench config).
        hyper: A method's parsed hyper-parameters; ``None`` fields keep ``ctx.train``'s values.

    Returns:
        ``ctx`` itself when nothing changes, else a copy sharing the zero-shot cache.
    """
    upd = {k: getattr(hyper, k) for k in ("steps", "lr") if hyper is not None and getattr(hyper, k) is not None}
    if all(getattr(ctx.train, k) == v for k, v in upd.items()):
        return ctx
    train = type(ctx.train).model_validate({**ctx.train.model_dump(), **upd})
    return dataclasses.replace(ctx, train=train, independent_cache={})


class FineTune:
    """One LoRA trained sequentially on every domain: the forgetting baseline (PAM paper, baseline 4)."""

    # The first domain is trained exactly as `independent` trains that domain's adapter (same initial
    # adapter, batches and optimizer), so it is shared through ctx.independent_cache.
    shares_first_domain = True

    def __init__(self, ctx: LearnerContext, hyper: TrainHyper | None = None) -> None:
        self.learner = LoraLearner(train_context(ctx, hyper))
        self.n_domains = 0

    def resume(self, adapter: Mapping[str, torch.Tensor] | None, n_seen: int) -> None:
        """Continue from stored state (the server's jobs): ``adapter`` already holds ``n_seen`` domains.

        Args:
            adapter: A ``lora``-format adapter, or None to keep the initial one (only with ``n_seen == 0``).
            n_seen: Domains already learned; 0 trains the next domain as the first one.

        Raises:
            ValueError: ``n_seen > 0`` without an adapter (it would restart from the initial adapter).
        """
        if n_seen < 0 or (n_seen > 0 and adapter is None):
            raise ValueError(f"resuming after {n_seen} domains needs their lora-format adapter")
        if adapter is not None:
            set_adapter(self.learner.model, adapter)
        self.n_domains = n_seen

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


class Joint(FineTune):
    """Upper bound: one LoRA trained on the union of all domains seen so far.

    Incremental form, so the accuracy matrix is complete: on domain t the batches are drawn uniformly
    from the pooled training data of domains 1..t (full rehearsal). The final row is the multitask
    ("one LoRA on all domains at once") result the papers report. ``pool_batch="per_domain"`` scales the
    batch with t so that each pooled domain gets a sequential method's batch per step.
    """

    shares_first_domain = False  # its batches come from its own pool generator

    def __init__(self, ctx: LearnerContext, hyper: JointHyper | None = None) -> None:
        super().__init__(ctx, hyper)
        self.seen: list[Domain] = []
        self.gen = torch.Generator().manual_seed(ctx.seed + 7)
        self.per_domain = hyper is not None and hyper.pool_batch == "per_domain"

    def begin_domain(self, domain: Domain) -> int:
        self.seen.append(domain)
        self.pool = type(domain).pooled("joint", self.seen)  # a VQA pool keeps its questions
        return super().begin_domain(domain)

    def train_step(self, x: object, y: torch.Tensor) -> torch.Tensor:
        n = len(y) * (len(self.seen) if self.per_domain else 1)
        idx = torch.randint(len(self.pool.y_train), (n,), generator=self.gen)  # a pooled batch instead
        return self.learner.train_step(*self.pool.batch(idx))


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


class Independent(FineTune):
    """Oracle: one LoRA per domain from the same initial adapter, each evaluated on its own domain.

    Needs the domain identity at test time, which serving never has. Unseen domains are evaluated
    with the most recent adapter.
    """

    def __init__(self, ctx: LearnerContext, hyper: TrainHyper | None = None) -> None:
        super().__init__(ctx, hyper)
        self.ctx = self.learner.ctx
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


def register_parsed(name: str, build: Callable[[LearnerContext, TrainHyper], Strategy]) -> None:
    """Register strategy ``name`` as ``(ctx, **hyper) -> build(ctx, parse_bench_hyper(name, hyper))``.

    Every strategy's keyword hyper-parameters go through its strict model (:data:`training.hyper.BENCH_HYPER`),
    so the bench rejects an unknown key or a bad value exactly as the server does.
    """

    def factory(ctx: LearnerContext, **hyper: object) -> Strategy:
        return build(ctx, parse_bench_hyper(name, hyper))

    factory.__doc__ = f"``{name}``; hyper-parameters: ``{BENCH_HYPER[name].__name__}``."
    register_strategy(name)(factory)


register_parsed("finetune", FineTune)
register_parsed("joint", Joint)
register_parsed("independent", Independent)
