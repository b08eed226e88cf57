"""The strategy protocol and registry, apart from the package ``__init__`` (which imports the built-in
strategies to register them), so a strategy module never imports the package that imports it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from ..data import Domain
from ..hyper import base_method
from ..registry import Registry
from .base import LearnerContext


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


#: strategy factories ``(ctx, **hyper) -> Strategy`` by method name
STRATEGIES: Registry[Callable[..., Strategy]] = Registry("method")
register_strategy = STRATEGIES.register  # decorator: ``@register_strategy("name")``


def create_strategy(name: str, ctx: LearnerContext, **hyper: object) -> Strategy:
    """Build strategy ``name`` (or a ``METHOD@VARIANT`` label of one, see ``training.hyper.base_method``).

    Raises:
        KeyError: unknown name, listing the registered ones.
    """
    method = base_method(name)
    if method not in STRATEGIES:  # name the label as given (``x@v``), not only its method
        raise KeyError(f"unknown method {name!r}; registered: {STRATEGIES.names()}")
    return STRATEGIES.get(method)(ctx, **hyper)

