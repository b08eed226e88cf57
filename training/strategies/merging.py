"""Merge-based strategies: clone the global LoRA, train it on the new domain, merge it back.

``average`` is PAM without alignment; ``ties``, ``tall`` and ``magmax`` replace the average by a
post-training merge; ``pam`` adds :func:`merge.pam_align` every ``every`` steps (PAM paper, Alg. 1).
All merge in LoRA factor space, which PAM justifies because the temporary LoRA starts from the global
one (the cross terms BᵢAⱼ stay small). The first domain has no global LoRA yet: its adapter becomes
the global one unmerged (Algorithm 1 starts at t = 2).

:func:`combine` is the one merge rule: these strategies and the server (``training.online``) both call
it, with the hyper-parameters parsed by :mod:`training.hyper`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import merge

from ..hyper import HYPER, PamAlign, TrainHyper
from ..lora import get_adapter, is_lora_factor, set_adapter
from .base import LearnerContext
from .sequential import FineTune, register_parsed

Adapter = dict[str, torch.Tensor]
Rule = Callable[[Adapter, Adapter, Any], Adapter]


def _average(g: Adapter, t: Adapter, h: TrainHyper) -> Adapter:
    return merge.average([g, t])  # PAM paper, Alg. 1: W_{G,t} = Avg(W_{G,t-1}, W')


#: method -> rule(W_{G,t-1}, W', hyper) -> W_{G,t}. ``pam_adaptive`` averages into the global LoRA its
#: temporaries are cloned from and aligned with (the served adapter is their α-merge, see adaptive.py).
RULES: dict[str, Rule] = {
    "finetune": lambda g, t, h: dict(t),
    "average": _average,
    "pam": _average,
    "pam_adaptive": _average,
    # peft's TIES with weights (1, 1): disjoint mean of sign-agreeing top-density entries per tensor
    "ties": lambda g, t, h: merge.ties([g, t], [1.0, 1.0], h.density),
    # consensus TALL: τ_MTL = average, kept where both task masks agree (PAM paper, baseline 12)
    "tall": lambda g, t, h: merge.tall_masks([g, t], [0.5, 0.5], h.lam, min_agree=2)[0],
    # per element the larger magnitude; ties go to the later adapter (PAM paper, baseline 9)
    "magmax": lambda g, t, h: merge.magmax([g, t]),
}
COMBINE_METHODS = tuple(RULES)


def combine_rule(method: str, hyper: TrainHyper) -> Rule:
    """The merge rule of ``method`` after checking ``hyper`` is that method's model.

    Raises:
        ValueError: ``method`` has no two-adapter merge (``adaptive`` merges all domain adapters with
            learned α instead), listing those that do.
        TypeError: ``hyper`` is not an instance of ``HYPER[method]`` (e.g. a dict, or another method's).
    """
    if method not in RULES:
        raise ValueError(f"method {method!r} has no global-LoRA merge; methods with one: {list(COMBINE_METHODS)}")
    if not isinstance(hyper, HYPER[method]):
        raise TypeError(f"{method}: hyper must be {HYPER[method].__name__} (parse_hyper), got {type(hyper).__name__}")
    return RULES[method]


def combine(method: str, global_: Adapter, temp: Adapter, hyper: TrainHyper) -> Adapter:
    """``W_{G,t} = merge(W_{G,t-1}, W')`` in LoRA factor space (PAM paper, Alg. 1, last line).

    Args:
        method: One of :data:`COMBINE_METHODS`.
        global_: The global adapter the temporary one was cloned from (``lora`` format).
        temp: The trained temporary adapter; same keys and shapes.
        hyper: ``HYPER[method]`` instance (``ties.density``, ``tall.lam`` are read from it).

    Returns:
        A new adapter; the inputs are not modified.

    Raises:
        ValueError: unknown method or one without a two-adapter merge; mismatched adapters.
        TypeError: ``hyper`` of the wrong model.
    """
    return combine_rule(method, hyper)(global_, temp, hyper)


class MergeLearner(FineTune):
    """Temporary LoRA cloned from the global one, PAM-aligned when ``hyper`` has PAM's fields, merged back.

    Args:
        ctx: Backbone, LoRA and training settings (``hyper.steps`` / ``hyper.lr`` override the latter).
        method: One of :data:`COMBINE_METHODS`; picks the merge rule.
        hyper: ``HYPER[method]``; an instance of :class:`~training.hyper.PamAlign` turns alignment on.

    Raises:
        ValueError, TypeError: as :func:`combine_rule`, at construction rather than after training.
    """

    def __init__(self, ctx: LearnerContext, method: str, hyper: TrainHyper) -> None:
        combine_rule(method, hyper)
        super().__init__(ctx, hyper)
        self.method, self.hyper = method, hyper
        self.align: PamAlign | None = hyper if isinstance(hyper, PamAlign) else None
        self.global_: Adapter | None = None  # W_{G,t-1}; None before the first domain is learned
        self.n_reset = 0  # elements re-initialised by alignment, over the whole run
        self.align_calls = 0

    def begin_domain(self, domain: object) -> int:
        self.global_ = get_adapter(self.learner.model) if self.n_domains else None  # W' = W_{G,t-1}: a clone
        return super().begin_domain(domain)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.learner.train_step(x, y)
        a, step = self.align, self.learner.step
        if a is None or self.global_ is None or step % a.every:
            return loss
        if not a.align_last and step >= self.learner.ctx.train.steps:
            return loss  # the domain's last step: nothing would train after it, so it would only prune
        cur = get_adapter(self.learner.model)
        keys = [k for k in cur if a.align_head or is_lora_factor(k)]
        aligned, n = merge.pam_align(
            {k: cur[k] for k in keys}, {k: self.global_[k] for k in keys}, a.percent, a.reinit,
            per_tensor=a.threshold == "per_tensor",
        )
        set_adapter(self.learner.model, {**cur, **aligned})
        self.n_reset += n
        self.align_calls += 1
        return loss

    def end_domain(self) -> None:
        super().end_domain()
        if self.global_ is not None:
            merged = combine(self.method, self.global_, get_adapter(self.learner.model), self.hyper)
            set_adapter(self.learner.model, merged)


for _method in ("average", "ties", "tall", "magmax", "pam"):  # registration order = ALL_METHODS order
    register_parsed(_method, lambda ctx, h, m=_method: MergeLearner(ctx, m, h))
