"""Continual-learning strategies behind one small protocol, picked by name from :data:`STRATEGIES`.

The runner drives every strategy the same way::

    steps = s.begin_domain(domain)
    for _ in range(steps): s.train_step(x, y)
    pre = s.evaluate(domain)          # A_t: the trained adapter before any merge
    s.end_domain()                    # merge (if the strategy merges)
    row = [s.evaluate(d) for d in domains]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from ..data import Domain
from ..hyper import base_method
from .base import LearnerContext, TrainSettings


class Strategy(Protocol):
    """Five methods, as torchtune's recipe interface; no hooks beyond these."""

    def begin_domain(self, domain: Domain) -> int:
        """Prepare to learn ``domain``; returns how many ``train_step`` calls to make (0 if cached)."""

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a uint8 batch; returns the loss (a tensor: no host sync)."""

    def end_domain(self) -> None:
        """Finish the domain: merge into the served adapter where the strategy merges."""

    def evaluate(self, domain: Domain) -> float:
        """Accuracy on ``domain``'s held-out split with the current served adapter."""

    def adapter(self) -> tuple[dict[str, torch.Tensor], str]:
        """The adapter that would be served now and its format (``lora`` or ``delta``)."""


STRATEGIES: dict[str, Callable[..., Strategy]] = {}


def register_strategy(name: str) -> Callable[[Callable[..., Strategy]], Callable[..., Strategy]]:
    """Decorator adding a strategy factory ``(ctx, **hyper) -> Strategy`` to :data:`STRATEGIES`."""

    def deco(fn: Callable[..., Strategy]) -> Callable[..., Strategy]:
        STRATEGIES[name] = fn
        return fn

    return deco


def create_strategy(name: str, ctx: LearnerContext, **hyper: object) -> Strategy:
    """Build strategy ``name`` (or a ``METHOD@VARIANT`` label of one, see ``training.hyper.base_method``).

    Raises:
        KeyError: unknown name, listing the registered ones.
    """
    method = base_method(name)
    if method not in STRATEGIES:
        raise KeyError(f"unknown method {name!r}; registered: {sorted(STRATEGIES)}")
    return STRATEGIES[method](ctx, **hyper)


from . import adaptive, merging, sequential  # noqa: E402,F401  (register built-ins)

__all__ = ["STRATEGIES", "LearnerContext", "Strategy", "TrainSettings", "create_strategy", "register_strategy"]
