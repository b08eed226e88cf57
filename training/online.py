"""One domain at a time, from stored state: what the server's training and merge actors call.

The server keeps no strategy object alive between domains (a restart must lose nothing), so each call
rebuilds what it needs from stored adapters. Hyper-parameters arrive parsed
(``training.hyper.parse_hyper``); these functions apply ``steps`` / ``lr`` themselves and merge with the
same :func:`~training.strategies.merging.combine` / :func:`~training.strategies.adaptive.fit_merge` the
benchmark strategies use, so a server run and ``mergeserve bench`` agree bit for bit.

Per domain, by method:

* global-LoRA methods (``pam``, ``average``, ``ties``, ``tall``, ``magmax``, ``finetune``):
  ``temp = train_temporary(...)``; ``W_G = merge_into_global(method, W_G, temp, hyper)``; serve ``W_G``.
* ``adaptive``: ``a_t = train_domain_adapter(...)``; add the domain to the replay buffer;
  ``merged, alpha, c = fit_adaptive(ctx, [a_1..a_t], buffer, hyper, c)``; serve ``merged`` (delta).
* ``pam_adaptive``: ``a_t = train_temporary(...)`` from the PAM global ``W_G``;
  ``W_G = merge_into_global(...)`` (kept, never served); buffer; ``fit_adaptive`` over ``[a_1..a_t]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .buffer import ReplayBuffer
from .data import Domain
from .hyper import HYPER, AdaptiveFit, TrainHyper
from .lora import get_adapter, to_delta
from .strategies import LearnerContext
from .strategies.adaptive import fit_merge, task_vector
from .strategies.base import LoraLearner
from .strategies.merging import COMBINE_METHODS, MergeLearner, combine, combine_rule
from .strategies.sequential import train_context

Adapter = dict[str, torch.Tensor]
Progress = Callable[[int, int, float], None]

#: every method the server accepts (the keys of ``training.hyper.HYPER``).
ONLINE_METHODS = tuple(HYPER)
#: methods whose domain step is :func:`train_temporary` + :func:`merge_into_global`.
TEMPORARY_METHODS = COMBINE_METHODS
#: methods whose served adapter is :func:`fit_adaptive`'s α-merge of every domain's adapter.
ALPHA_METHODS = tuple(m for m, h in HYPER.items() if issubclass(h, AdaptiveFit))


def _run(
    learner: LoraLearner,
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    domain: Domain,
    total: int,
    progress: Progress | None,
    log_every: int,
) -> None:
    """``total`` steps on batches drawn with replacement from a generator seeded with ``ctx.seed``."""
    gen = torch.Generator().manual_seed(learner.ctx.seed)
    for i in range(1, total + 1):
        idx = torch.randint(len(domain.y_train), (learner.ctx.train.batch_size,), generator=gen)
        loss = step(*domain.batch(idx))
        if progress is not None and (i % log_every == 0 or i == total):
            progress(i, total, float(loss))


def train_temporary(
    ctx: LearnerContext,
    method: str,
    hyper: TrainHyper,
    global_: Adapter | None,
    n_seen: int,
    domain: Domain,
    progress: Progress | None = None,
    log_every: int = 10,
) -> tuple[Adapter, dict]:
    """Train the temporary adapter for ``domain`` starting from the global one (PAM Alg. 1, inner loop).

    Args:
        ctx: Backbone, LoRA and training settings; ``hyper.steps`` / ``hyper.lr`` override the latter.
        method: One of :data:`TEMPORARY_METHODS`.
        hyper: ``parse_hyper(method, ...)``; PAM's fields (``percent``, ``every``, ``reinit``) turn on
            alignment for ``pam`` and ``pam_adaptive``.
        global_: Active global adapter in ``lora`` format, or None before the first domain.
        n_seen: Domains already folded into ``global_``; with 0 the first domain trains from the
            initial adapter as in the benchmark.
        domain: Training data (its held-out split is used for A_t).
        progress: Called as ``progress(step, total, loss)`` every ``log_every`` steps (the only host syncs).

    Returns:
        ``(temp_adapter, info)`` with ``info`` holding ``A_t`` and PAM's ``n_reset`` / ``align_calls``.

    Raises:
        ValueError: a method without a temporary adapter (``adaptive``: use :func:`train_domain_adapter`),
            or ``n_seen > 0`` without ``global_``.
        TypeError: ``hyper`` is not ``HYPER[method]``.
    """
    if method not in TEMPORARY_METHODS:
        raise ValueError(
            f"method {method!r} trains no temporary adapter (adaptive: train_domain_adapter + fit_adaptive); "
            f"methods that do: {list(TEMPORARY_METHODS)}"
        )
    s = MergeLearner(ctx, method, hyper)
    s.resume(global_, n_seen)
    _run(s.learner, s.train_step, domain, s.begin_domain(domain), progress, log_every)
    info = {"A_t": s.evaluate(domain), "n_reset": s.n_reset, "align_calls": s.align_calls}
    return get_adapter(s.learner.model), info


def merge_into_global(method: str, global_: Adapter | None, temp: Adapter, hyper: TrainHyper) -> Adapter:
    """``W_{G,t} = combine(W_{G,t-1}, W')``; the first domain's adapter becomes the global one.

    Raises:
        ValueError, TypeError: as :func:`~training.strategies.merging.combine` (also when ``global_`` is None).
    """
    if global_ is None:
        combine_rule(method, hyper)  # the same checks as a real merge
        return dict(temp)
    return combine(method, global_, temp, hyper)


def train_domain_adapter(
    ctx: LearnerContext,
    hyper: TrainHyper,
    domain: Domain,
    progress: Progress | None = None,
    log_every: int = 10,
) -> tuple[Adapter, dict]:
    """The domain's own LoRA, trained from the common initial adapter (Coleman et al. 2024, Fig. 1).

    The same computation as the ``adaptive`` / ``independent`` strategies on a cache miss; it never
    reads ``ctx.independent_cache`` (a re-ingested domain with the same name has new data).

    Args:
        ctx: Backbone, LoRA and training settings; ``hyper.steps`` / ``hyper.lr`` override the latter.
        hyper: Parsed hyper-parameters (only ``steps`` and ``lr`` are used here).
        domain: Training data (its held-out split is used for A_t).
        progress: As in :func:`train_temporary`.

    Returns:
        ``(adapter, info)``: the adapter in ``lora`` format and ``{"A_t": ...}``.
    """
    learner = LoraLearner(train_context(ctx, hyper))
    learner.reset_optimizer()
    _run(learner, learner.train_step, domain, learner.ctx.train.steps, progress, log_every)
    return get_adapter(learner.model), {"A_t": learner.evaluate(domain)}


def fit_adaptive(
    ctx: LearnerContext,
    domain_adapters: list[Adapter],
    buffer: ReplayBuffer,
    hyper: AdaptiveFit,
    c_init: torch.Tensor | None,
) -> tuple[Adapter, torch.Tensor, torch.Tensor]:
    """Merge every domain's adapter with α learned on the buffer (Coleman et al. 2024, Eq. 2-4).

    α = σ(c)·b, b = 1 + (b_max − 1)·σ(b_raw), fit by backprop through ``hyper.base`` (linear, ties,
    dare_ties) in ΔW space; the implementation is the ``adaptive`` strategy's
    (:func:`~training.strategies.adaptive.fit_merge`).

    Args:
        ctx: Backbone, LoRA settings (for ΔW = s·B·A and the initial adapter) and device.
        domain_adapters: One adapter per domain in domain order, ``lora`` (or ``delta``) format.
        buffer: Replay buffer holding every one of those domains (``hyper.spc`` per class).
        hyper: ``AdaptiveHyper`` or ``PamAdaptiveHyper``.
        c_init: The previous fit's logits ``c`` (fewer entries than adapters: the new ones start at 0).

    Returns:
        ``(merged, alpha, c)``: the served adapter in ``delta`` format, α ∈ (0, b_max) and the logits,
        one entry per domain adapter (CPU tensors).

    Raises:
        ValueError: no adapters, an empty buffer, or ``c_init`` longer than ``domain_adapters``.
        TypeError: ``hyper`` has no adaptive fields.
    """
    if not isinstance(hyper, AdaptiveFit):
        raise TypeError(f"fit_adaptive needs AdaptiveHyper or PamAdaptiveHyper, got {type(hyper).__name__}")
    init_delta = to_delta(LoraLearner(ctx).init_adapter, ctx.lora)
    tvs = [task_vector(to_delta(a, ctx.lora), init_delta) for a in domain_adapters]
    return fit_merge(ctx, tvs, init_delta, buffer, hyper, c_init)


__all__ = [
    "ALPHA_METHODS",
    "ONLINE_METHODS",
    "TEMPORARY_METHODS",
    "fit_adaptive",
    "merge_into_global",
    "train_domain_adapter",
    "train_temporary",
]
