"""One domain at a time, from stored state: what the server's training and merge actors call.

The server keeps no strategy object alive between domains (a restart must lose nothing), so a job
rebuilds the strategy from the active global adapter, trains the temporary adapter, and hands it to a
separate merge step. Online methods are the global-LoRA family: ``pam`` (default), ``average``,
``ties``, ``tall``, ``magmax`` and ``finetune``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .data import Domain
from .lora import get_adapter, set_adapter
from .strategies import LearnerContext, create_strategy
from .strategies.merging import COMBINES, MergeLearner
from .strategies.sequential import FineTune

ONLINE_METHODS = tuple(COMBINES)
Adapter = dict[str, torch.Tensor]


def train_temporary(
    ctx: LearnerContext,
    method: str,
    hyper: dict,
    global_: Adapter | None,
    n_seen: int,
    domain: Domain,
    progress: Callable[[int, int, float], None] | None = None,
    log_every: int = 10,
) -> tuple[Adapter, dict]:
    """Train the temporary adapter for ``domain`` starting from the global one (PAM Alg. 1, inner loop).

    Args:
        ctx: Backbone, LoRA and training settings.
        method: One of :data:`ONLINE_METHODS`.
        hyper: Method hyper-parameters (e.g. ``percent``, ``every``, ``reinit`` for pam).
        global_: Active global adapter in ``lora`` format, or None for the very first domain.
        n_seen: Domains already folded into ``global_``.
        domain: Training data (its held-out split is used for A_t).
        progress: Called as ``progress(step, total, loss)`` every ``log_every`` steps (the only host syncs).

    Returns:
        ``(temp_adapter, info)`` with ``info`` holding ``A_t`` and PAM's reset counts.

    Raises:
        ValueError: for a method that is not online.
    """
    if method not in ONLINE_METHODS:
        raise ValueError(f"method {method!r} is not available online; choose one of {list(ONLINE_METHODS)}")
    s = create_strategy(method, ctx, **hyper)
    if global_ is not None:
        set_adapter(s.learner.model, global_)
    if isinstance(s, FineTune):
        s.n_domains = n_seen  # not the first domain: continue from the global adapter, never from init
    if isinstance(s, MergeLearner):
        s.seen = n_seen
    total = s.begin_domain(domain)
    gen = torch.Generator().manual_seed(ctx.seed)
    for step in range(1, total + 1):
        idx = torch.randint(len(domain.y_train), (ctx.train.batch_size,), generator=gen)
        loss = s.train_step(domain.x_train[idx], domain.y_train[idx])
        if progress is not None and (step % log_every == 0 or step == total):
            progress(step, total, float(loss))
    info = {"A_t": s.evaluate(domain), "n_reset": getattr(s, "n_reset", 0), "align_calls": getattr(s, "align_calls", 0)}
    return get_adapter(s.learner.model), info


def merge_into_global(method: str, global_: Adapter | None, temp: Adapter) -> Adapter:
    """``W_{G,t} = combine(W_{G,t-1}, W')``; the first domain's adapter becomes the global one."""
    return dict(temp) if global_ is None else COMBINES[method](global_, temp)
