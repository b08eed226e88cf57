"""PAM's during-training alignment step (Bonato et al., "Parameter alignment for merging", Algorithm 1)."""

from __future__ import annotations

import math
from typing import Literal

import torch

from ._checks import TaskVector, check_task_vectors


def pam_align(
    temp: TaskVector,
    global_: TaskVector,
    percent: float,
    reinit: Literal["global", "zero"] = "global",
    per_tensor: bool = False,
) -> tuple[dict[str, torch.Tensor], int]:
    """Re-initialise the temporary LoRA's weights whose sign disagrees with important global weights.

    Algorithm 1 of the PAM paper: sort |W_G| over *all* tensors in descending order, k = ⌈p/100 · n⌉,
    τ = A[k] (the k-th largest magnitude). An element is misaligned iff sign(temp) ≠ sign(global),
    global ≠ 0, and |global| ≥ τ. The paper writes ``w_G > τ``; we read it as the magnitude and make the
    threshold inclusive so that exactly the top-k (plus ties at τ) are protected. An element of ``temp``
    that is exactly 0 where the global weight is not has a different sign and is reset.

    Args:
        temp: The temporary LoRA being trained (W').
        global_: The global LoRA it was cloned from (W_{G,t-1}); same keys and shapes.
        percent: Alignment percentage p in [0, 100]; 0 resets nothing, 100 considers every nonzero weight.
        reinit: ``"global"`` resets to the global value, ``"zero"`` to 0 (PAM paper, Fig. 6).
        per_tensor: Take τ (and k) over each tensor separately instead of over all of them; an ablation,
            not the paper's rule: with one τ the tensors of largest magnitude (e.g. LoRA's A) take most
            of the top-p %.

    Returns:
        ``(aligned, n_reset)``: a new dict and the number of elements that were reset.

    Raises:
        ValueError: on mismatched keys/shapes, ``percent`` outside [0, 100] or an unknown ``reinit``.
    """
    if not 0.0 <= percent <= 100.0:
        raise ValueError(f"percent must be in [0, 100], got {percent}")
    if reinit not in ("global", "zero"):
        raise ValueError(f"reinit must be 'global' or 'zero', got {reinit!r}")
    keys = check_task_vectors([global_, temp])
    groups = [[k] for k in keys] if per_tensor else [keys]
    aligned, n_reset = {}, 0
    for group in groups:
        tau = _kth_largest(torch.cat([global_[k].detach().abs().reshape(-1).float() for k in group]), percent)
        for key in group:
            t, g = temp[key], global_[key]
            bad = (torch.sign(t) != torch.sign(g)) & (g != 0) & (g.abs().float() >= tau)
            n_reset += int(bad.sum())
            aligned[key] = torch.where(bad, g if reinit == "global" else torch.zeros_like(t), t)
    return aligned, n_reset


def _kth_largest(mags: torch.Tensor, percent: float) -> float:
    """τ = the k-th largest of ``mags`` with k = ⌈p/100 · n⌉; +inf when k = 0 (nothing is protected)."""
    k = math.ceil(percent / 100.0 * mags.numel())
    if k == 0:
        return math.inf
    return float(torch.kthvalue(mags.cpu(), mags.numel() - k + 1).values)
