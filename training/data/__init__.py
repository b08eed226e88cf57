"""Domain-incremental benchmarks: a registry of loaders that return fixed train / held-out splits.

Images are uint8 tensors, shape (N, 3, H, W); labels are int64 (N,). Every domain of a benchmark has
the same classes (domain-incremental learning).
"""

from __future__ import annotations

from . import digits, folder, scenes  # noqa: F401  (register the built-in benchmarks)
from .base import BENCHMARKS, Benchmark, Domain, ImageSamples, load_benchmark, register_benchmark

__all__ = ["BENCHMARKS", "Benchmark", "Domain", "ImageSamples", "load_benchmark", "register_benchmark"]
