"""Learned merging coefficients (Coleman et al., "Adaptive LoRA merging for efficient DIL", Eq. 2-3)."""

from __future__ import annotations

import torch
from torch import nn


class AdaptiveCoefficients(nn.Module):
    """α ∈ (0, b_max)ⁿ with αᵢ = σ(cᵢ)·b and b = 1 + (b_max − 1)·σ(b_raw).

    The paper leaves the initialisation open; we start at c = 0 and b_raw = 0, i.e. αᵢ = (1 + b_max)/4
    (0.5 for b_max = 1), so every adapter starts with equal influence and gradients are not saturated.

    Args:
        n: Number of adapters to merge.
        b_max: Upper bound of the shared scale b (≥ 1). The paper uses 1, 3 and 5.
        init_c: Optional initial logits (length n), e.g. carried over from the previous domain.

    Raises:
        ValueError: if ``n < 1``, ``b_max < 1`` or ``init_c`` has the wrong length.
    """

    def __init__(self, n: int, b_max: float = 3.0, init_c: torch.Tensor | None = None) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if b_max < 1:
            raise ValueError(f"b_max must be >= 1, got {b_max}")
        c = torch.zeros(n) if init_c is None else torch.as_tensor(init_c, dtype=torch.float32).clone()
        if c.shape != (n,):
            raise ValueError(f"init_c must have shape ({n},), got {tuple(c.shape)}")
        self.b_max = float(b_max)
        self.c = nn.Parameter(c)
        self.b_raw = nn.Parameter(torch.zeros(()))

    def forward(self) -> torch.Tensor:
        """Returns α, shape (n,), strictly inside (0, b_max)."""
        b = 1.0 + (self.b_max - 1.0) * torch.sigmoid(self.b_raw)
        return torch.sigmoid(self.c) * b
