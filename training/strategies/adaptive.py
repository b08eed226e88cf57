"""Adaptive LoRA merging (Coleman et al. 2024): per-domain adapters, coefficients α learned on a buffer.

After each domain: keep that domain's LoRA, add ``spc`` samples per class to the replay buffer, then
learn α = σ(c)·b (Eq. 2-3) by backprop through the merge on the buffer (Eq. 4). Merging happens in ΔW
space (exact, no BᵢAⱼ cross terms) with ``merge.linear`` / ``ties`` / ``dare_ties``; the served adapter
is the merged dense delta. Choices the paper leaves open: task vectors are ΔW = s·B·A and, for the head,
(head − initial head); c starts at the previous domains' learned logits and 0 for the new one; DARE
masks are fixed during fitting (one seeded generator per step) so the loss surface does not move under
the optimizer.

Two strategies share :class:`AdaptiveMerge` and differ only in how each domain's adapter is trained:

* ``adaptive``: from the common initial adapter (the paper's setting; :class:`Independent`'s adapters);
* ``pam_adaptive``: PAM's temporary adapters (see :func:`pam_adaptive`).

:func:`fit_merge` is the one implementation of the fit; ``training.online.fit_adaptive`` (the server)
calls it too.
"""

from __future__ import annotations

import time

import torch

import merge

from ..buffer import ReplayBuffer
from ..data import Domain
from ..hyper import AdaptiveFit, TrainHyper
from ..lora import functional_forward, get_adapter, is_lora_factor, materialise, set_adapter, to_delta
from ..tasks import prepare
from .base import LearnerContext, accuracy
from .merging import MergeLearner
from .sequential import FineTune, Independent, register_parsed

Adapter = dict[str, torch.Tensor]


def task_vector(delta: Adapter, init_delta: Adapter) -> Adapter:
    """τ of one domain adapter in ``delta`` format: ΔW as is (B starts at 0, so ΔW₀ = 0), head − initial head."""
    return {k: v if k.endswith(".delta") else v - init_delta[k] for k, v in delta.items()}


def merge_task_vectors(
    tvs: list[Adapter], alpha: torch.Tensor, init_delta: Adapter, hyper: AdaptiveFit, seed: int = 0
) -> Adapter:
    """Σ-merge of the task vectors with coefficients α through ``hyper.base`` (Coleman et al., Eq. 4).

    Args:
        tvs: One task vector per domain (:func:`task_vector`).
        alpha: Coefficients, shape (len(tvs),); may require grad.
        init_delta: The initial adapter in ``delta`` format (its head is added back).
        hyper: ``base``, ``density`` and ``head`` are read.
        seed: Seed of the DARE masks (``dare_ties`` only).

    Returns:
        An adapter in ``delta`` format, differentiable w.r.t. ``alpha``.
    """
    kw: dict[str, object] = {"density": hyper.density}
    if hyper.base == "dare_ties":
        kw["generator"] = torch.Generator().manual_seed(seed)
    if hyper.head == "merge":
        tv = merge.MERGE_METHODS[hyper.base](tvs, alpha, **kw)
        return {k: v if k.endswith(".delta") else v + init_delta[k] for k, v in tv.items()}
    trunk = [{k: v for k, v in t.items() if k.endswith(".delta")} for t in tvs]
    body = merge.MERGE_METHODS[hyper.base](trunk, alpha, **kw)
    heads = {k: init_delta[k] + torch.stack([t[k] for t in tvs]).mean(0) for k in tvs[0] if k not in trunk[0]}
    return {**body, **heads}  # "mean": the mean of the domains' trained heads, neither α-scaled nor pruned


class HeldOut:
    """The held-out splits of the domains seen, in the buffer's interface: the oracle-α control fits on
    the very data it is scored on (an upper bound for any buffer; benchmark only)."""

    def __init__(self, domains: list[Domain]) -> None:
        self.domains = domains

    def domain(self) -> Domain:
        return type(self.domains[0]).pooled("heldout", [d.heldout_as_train() for d in self.domains])


def fit_loss(ctx: LearnerContext, delta: Adapter, data: tuple) -> torch.Tensor:
    """The task's loss of ``ctx.base`` with ``delta`` applied (differentiably) on the buffer's batch
    (Coleman et al., Eq. 4's objective)."""
    return ctx.task.loss(lambda **inputs: functional_forward(ctx.base, delta, **inputs), data[0])


def fit_data(ctx: LearnerContext, buffer: ReplayBuffer | HeldOut) -> tuple:
    """The buffer, once, as the task's one batch on ``ctx.device`` (prepared by the task: e.g. trunk
    features cached, images preprocessed)."""
    d = prepare(ctx.task, buffer.domain())
    samples, _ = d.batch(torch.arange(len(d.y_train)))
    return (ctx.task.make_batch(samples).to(ctx.device),)


def fit_merge(
    ctx: LearnerContext,
    tvs: list[Adapter],
    init_delta: Adapter,
    buffer: ReplayBuffer | HeldOut,
    hyper: AdaptiveFit,
    c_init: torch.Tensor | None = None,
) -> tuple[Adapter, torch.Tensor, torch.Tensor]:
    """Learn α on the replay buffer by backprop through the merge, then merge (Coleman et al., Eq. 2-4).

    Adam on (c, b_raw) of :class:`merge.AdaptiveCoefficients` for ``hyper.fit_steps`` full-buffer steps
    of :func:`fit_loss` (cross-entropy, or the task's loss) through :func:`training.lora.functional_forward`
    (the merged weights are not frozen copies, so gradients reach α).

    Args:
        ctx: Backbone (never trained) and device.
        tvs: One task vector per domain, in domain order.
        init_delta: The initial adapter in ``delta`` format.
        buffer: Class-balanced samples of the domains seen (non-empty).
        hyper: ``base``, ``density``, ``b_max``, ``fit_steps``, ``fit_lr``.
        c_init: Logits of a previous fit (length ≤ len(tvs)); missing entries start at 0. None: all 0.

    Returns:
        ``(merged, alpha, c)``: the merged adapter (``delta`` format, detached) and α and c on the CPU,
        each of shape (len(tvs),).

    Raises:
        ValueError: no task vectors, an empty buffer, or ``c_init`` longer than ``tvs``.
    """
    n = len(tvs)
    c0 = torch.zeros(0) if c_init is None else c_init.detach().cpu().float()
    if n == 0 or len(c0) > n:
        raise ValueError(f"need 1 or more task vectors and at most as many initial logits; got {n} and {len(c0)}")
    coef = merge.AdaptiveCoefficients(n, hyper.b_max, init_c=torch.cat([c0, torch.zeros(n - len(c0))]))
    coef = coef.to(ctx.device)
    opt = torch.optim.Adam(coef.parameters(), lr=hyper.fit_lr)
    data = fit_data(ctx, buffer)
    base = ctx.base.to(ctx.device).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    for _ in range(hyper.fit_steps):
        loss = fit_loss(ctx, merge_task_vectors(tvs, coef(), init_delta, hyper), data)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    alpha, c = coef().detach().cpu(), coef.c.detach().cpu()
    merged = {k: v.detach() for k, v in merge_task_vectors(tvs, alpha, init_delta, hyper).items()}
    return merged, alpha, c


class AdaptiveMerge:
    """One adapter per domain; the served adapter is their merge with learned coefficients.

    Args:
        hyper: The fit's hyper-parameters (``AdaptiveHyper`` or ``PamAdaptiveHyper``).
        trainer: Trains each domain's adapter (its ``learner`` holds it until ``end_domain``).
    """

    def __init__(self, hyper: AdaptiveFit, trainer: FineTune) -> None:
        self.hyper, self.trainer = hyper, trainer
        self.ctx = trainer.learner.ctx
        self.buffer = ReplayBuffer(hyper.spc, seed=self.ctx.seed)
        self.init_delta = to_delta(trainer.learner.init_adapter, self.ctx.lora)
        self.tvs: list[Adapter] = []
        self.seen: list[Domain] = []
        self.alpha = torch.zeros(0)  # learned α after the last domain
        self.c = torch.zeros(0)  # its logits, carried over as the next fit's starting point
        self.unmerged = False
        self.merged: Adapter | None = None
        self.served: torch.nn.Module | None = None
        self.fit_seconds: list[float] = []

    def begin_domain(self, domain: Domain) -> int:
        self.domain = domain
        self.unmerged = True  # between training and merging, the trained adapter is what is evaluated
        return self.trainer.begin_domain(domain)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.trainer.train_step(x, y)

    def end_domain(self) -> None:
        trained = get_adapter(self.trainer.learner.model)  # before the trainer merges it anywhere
        self.trainer.end_domain()
        self.tvs.append(task_vector(to_delta(trained, self.ctx.lora), self.init_delta))
        self.buffer.add_domain(self.domain)
        self.seen.append(self.domain)
        t0 = time.perf_counter()
        fixed_w = getattr(self.hyper, "fixed_w", None)
        if fixed_w is not None:  # Coleman et al., Table 1's baselines: every adapter weighted W, no fit
            self.alpha = torch.full((len(self.tvs),), float(fixed_w))
            merged = merge_task_vectors(self.tvs, self.alpha, self.init_delta, self.hyper)
            self.merged = {k: v.detach() for k, v in merged.items()}
        else:
            samples = HeldOut(self.seen) if getattr(self.hyper, "oracle", False) else self.buffer
            self.merged, self.alpha, self.c = fit_merge(
                self.ctx, self.tvs, self.init_delta, samples, self.hyper, self.c
            )
        self.fit_seconds.append(time.perf_counter() - t0)
        self.unmerged = False
        self.served = materialise(self.ctx.base, self.merged).to(self.ctx.device)

    def evaluate(self, domain: Domain) -> float:
        if self.served is None or self.unmerged:
            return self.trainer.learner.evaluate(domain)
        return accuracy(self.ctx.task, self.served, domain, self.ctx.device, self.ctx.train.eval_batch)

    def adapter(self) -> tuple[Adapter, str]:
        if self.merged is None:
            return get_adapter(self.trainer.learner.model), "lora"
        return dict(self.merged), "delta"


def _fit_hyper(hyper: TrainHyper) -> AdaptiveFit:
    if not isinstance(hyper, AdaptiveFit):
        raise TypeError(f"adaptive merging needs AdaptiveFit hyper-parameters, got {type(hyper).__name__}")
    return hyper


class SharedHead(Independent):
    """Per-domain adapters under one head: the first domain trains its LoRA and the head (exactly as
    ``independent``, cached); every later domain trains only LoRA factors, from the initial ones, under
    that head frozen. Later adapters are not cached: they differ from ``independent``'s."""

    head: Adapter | None = None

    def begin_domain(self, domain: Domain) -> int:
        if self.head is None:
            return super().begin_domain(domain)
        self.current = domain.name
        set_adapter(self.learner.model, {**self.learner.init_adapter, **self.head})
        for name, p in self.learner.model.named_parameters():
            if not is_lora_factor(name):
                p.requires_grad_(False)  # the head; the backbone already is
        self.learner.reset_optimizer()
        return self.ctx.train.steps

    def end_domain(self) -> None:
        if self.head is not None:
            self.per_domain[self.current] = get_adapter(self.learner.model)
            return
        super().end_domain()
        self.head = {k: v for k, v in self.per_domain[self.current].items() if not is_lora_factor(k)}


def adaptive(ctx: LearnerContext, hyper: TrainHyper) -> AdaptiveMerge:
    """``adaptive``: each domain's LoRA trained from the common initial adapter (the paper's setting);
    with the benchmark's ``freeze_head``, under the first domain's head (:class:`SharedHead`)."""
    trainer = SharedHead if getattr(hyper, "freeze_head", False) else Independent
    return AdaptiveMerge(_fit_hyper(hyper), trainer(ctx, hyper))


def pam_adaptive(ctx: LearnerContext, hyper: TrainHyper) -> AdaptiveMerge:
    """``pam_adaptive``: PAM-aligned temporary LoRAs merged with learned α instead of averaged.

    Choice: the temporaries are exactly PAM's (Alg. 1): cloned from a global LoRA W_{G,t-1}, aligned
    with it every ``every`` steps, and W_{G,t} = Avg(W_{G,t-1}, W') is kept in factor space only to
    clone and align the next temporary. It is never served: the served adapter is the α-merge (ΔW
    space) of all temporaries, fit on the buffer as in ``adaptive``. Cloning from the served α-merge
    instead would need a lossy SVD back to rank r (the merge of n rank-r deltas has rank up to n·r), and
    aligning to the previous domain adapter alone would protect only one domain's important weights.
    Consequence: the temporaries share one lineage, so they are sign-aligned with each other (what PAM
    wants for merging), and each one's task vector also carries the earlier domains' knowledge.
    """
    return AdaptiveMerge(_fit_hyper(hyper), MergeLearner(ctx, "pam_adaptive", hyper))


register_parsed("adaptive", adaptive)
register_parsed("pam_adaptive", pam_adaptive)
