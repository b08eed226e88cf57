"""Domains, benchmarks and the benchmark registry: what every benchmark module builds on.

Kept apart from the package ``__init__`` (which imports the built-in benchmarks to register them), so a
benchmark module never imports the package that imports it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..registry import Registry


@dataclass
class ImageSamples:
    """Stored classification examples: what the ``classify`` task turns into batches."""

    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64 class indices

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: torch.Tensor | list[int] | slice) -> ImageSamples:
        """The examples at ``idx`` (a slice, index list or 1-D index tensor)."""
        idx = idx if isinstance(idx, slice) else torch.as_tensor(idx, dtype=torch.int64)
        return ImageSamples(self.images[idx], self.labels[idx])


@dataclass
class Domain:
    """One domain's fixed splits."""

    name: str
    x_train: torch.Tensor  # (N, 3, H, W) uint8
    y_train: torch.Tensor  # (N,) int64
    x_test: torch.Tensor  # (M, 3, H, W) uint8, held out
    y_test: torch.Tensor  # (M,) int64

    def batch(self, idx: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """Training examples ``idx`` as ``(the task's samples, labels)``: what ``Strategy.train_step`` takes."""
        return self.train.subset(idx), self.y_train[idx]

    @property
    def train(self) -> ImageSamples:
        return ImageSamples(self.x_train, self.y_train)

    @property
    def test(self) -> ImageSamples:
        return ImageSamples(self.x_test, self.y_test)

    @classmethod
    def pooled(cls, name: str, domains: list[Domain]) -> Domain:
        """One domain holding the training data of ``domains`` (for joint training)."""
        empty = torch.empty(0)
        return cls(name, torch.cat([d.x_train for d in domains]), torch.cat([d.y_train for d in domains]), empty, empty)

    def heldout_as_train(self) -> Domain:
        """This domain with its held-out split in the training fields (an oracle that fits on test data)."""
        return dataclasses.replace(self, x_train=self.x_test, y_train=self.y_test)


@dataclass
class Benchmark:
    """A named sequence of domains over one label set."""

    name: str
    classes: list[str]
    domains: list[Domain] = field(default_factory=list)

    def domain(self, name: str) -> Domain:
        """The domain called ``name``.

        Raises:
            KeyError: naming the known domains.
        """
        for d in self.domains:
            if d.name == name:
                return d
        raise KeyError(f"unknown domain {name!r}; known: {[d.name for d in self.domains]}")


BENCHMARKS: Registry[Callable[..., Benchmark]] = Registry("benchmark")
register_benchmark = BENCHMARKS.register  # decorator: ``@register_benchmark("name")``


def load_benchmark(name: str, **kwargs: object) -> Benchmark:
    """Build the benchmark called ``name``.

    Raises:
        KeyError: for an unknown name, listing the registered ones.
    """
    return BENCHMARKS.get(name)(**kwargs)
