"""Validation shared by every merge function: same keys, same shapes, one weight per task vector."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

TaskVector = Mapping[str, torch.Tensor]
Weights = Sequence[float] | torch.Tensor


def check_task_vectors(tvs: Sequence[TaskVector]) -> list[str]:
    """Check that task vectors agree on keys and shapes.

    Args:
        tvs: Task vectors, each a mapping from parameter name to tensor.

    Returns:
        The keys of the first task vector, in its order (the order merged outputs use).

    Raises:
        ValueError: if ``tvs`` is empty, or a key is missing/extra or has a different shape; the message
            names the key and the task vector index.
    """
    if len(tvs) == 0:
        raise ValueError("need at least one task vector")
    keys = list(tvs[0].keys())
    ref = set(keys)
    for i, tv in enumerate(tvs[1:], start=1):
        missing, extra = ref - tv.keys(), tv.keys() - ref
        if missing or extra:
            key = sorted(missing or extra)[0]
            where = "missing from" if missing else "only in"
            raise ValueError(f"key {key!r} {where} task vector {i} (keys must agree)")
        for k in keys:
            if tv[k].shape != tvs[0][k].shape:
                raise ValueError(
                    f"key {k!r}: task vector {i} has shape {tuple(tv[k].shape)}, "
                    f"task vector 0 has {tuple(tvs[0][k].shape)}"
                )
    return keys


def as_weights(weights: Weights, n: int, like: torch.Tensor) -> torch.Tensor:
    """Turn ``weights`` into a 1-D tensor on ``like``'s device and dtype, keeping autograd history.

    Raises:
        ValueError: if the number of weights is not ``n``.
    """
    w = weights if isinstance(weights, torch.Tensor) else torch.tensor(list(weights), dtype=torch.float64)
    w = w.to(device=like.device, dtype=like.dtype).reshape(-1)
    if w.numel() != n:
        raise ValueError(f"got {w.numel()} weights for {n} task vectors")
    return w


def check_density(density: float) -> None:
    """Raise ValueError unless 0 <= density <= 1."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
