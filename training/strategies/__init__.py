"""Continual-learning strategies behind one small protocol, picked by name from :data:`STRATEGIES`.

The runner drives every strategy the same way::

    steps = s.begin_domain(domain)
    for _ in range(steps): s.train_step(x, y)
    pre = s.evaluate(domain)          # A_t: the trained adapter before any merge
    s.end_domain()                    # merge (if the strategy merges)
    row = [s.evaluate(d) for d in domains]
"""

from __future__ import annotations

from . import adaptive, merging, sequential  # noqa: F401  (register the built-ins)
from .base import LearnerContext, TrainSettings
from .protocol import STRATEGIES, Strategy, create_strategy, register_strategy

__all__ = ["STRATEGIES", "LearnerContext", "Strategy", "TrainSettings", "create_strategy", "register_strategy"]
