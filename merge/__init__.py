"""merge — adapter merging as pure tensor functions (no I/O, no nn.Module but one).

Inputs are task vectors: ``dict[str, torch.Tensor]`` with identical keys and shapes (LoRA factors,
dense deltas or a classifier head — the functions don't care). Outputs are new dicts; inputs are never
changed; dtype and device are preserved. Mismatched keys or shapes raise ``ValueError`` naming the key.

=================================================  =============================================================
function                                           behaviour
=================================================  =============================================================
``linear(tvs, weights)``                           Σ wᵢ·τᵢ (task arithmetic, Ilharco et al. 2023)
``average(tvs)``                                   element-wise mean (PAM's ``Avg``)
``ties(tvs, weights, density, majority_sign)``     TIES-merging (Yadav et al. 2023); same numbers as peft's ``ties``
``dare_linear(tvs, weights, density, generator)``  DARE drop-and-rescale + sum (Yu et al. 2024); peft's numbers
``dare_ties(tvs, weights, density, ...)``          DARE + TIES sign election; peft's numbers for the same RNG state
``magnitude_prune(tvs, weights, density)``         per-tensor magnitude pruning + sum, as peft's
``magmax(tvs)``                                    MagMax (Marczak et al. 2024): largest-magnitude value per element
``tall_masks(tvs, weights, lam, min_agree=2)``     TALL masks + consensus (Wang et al. 2024):
                                                   mᵢ = |τᵢ| ≥ λ·|τ_MTL − τᵢ|, keep where ≥ min_agree masks agree
``pam_align(temp, global_, percent, reinit)``      PAM alignment (PAM paper, Alg. 1): reset elements whose sign
                                                   disagrees with a top-p% global weight; → (aligned, n_reset)
``AdaptiveCoefficients(n, b_max)``                 nn.Module: α = σ(c)·b, b = 1 + (b_max−1)·σ(b_raw), 0 < α < b_max
                                                   (Coleman et al. 2024, Eq. 2-3)
=================================================  =============================================================

Every merge function is differentiable with respect to ``weights`` given as a tensor, so α can be
learned through linear, TIES and DARE merging.

LoRA glue (``merge.lora``): ``lora_to_delta`` (ΔW = s·B·A), ``delta_to_lora`` (truncated SVD),
``lora_cat`` (exact, rank Σr). ``MERGE_METHODS`` maps a method name to a uniform
``fn(tvs, weights, **kw) -> dict`` for callers that pick a method by name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .adaptive import AdaptiveCoefficients
from .lora import delta_to_lora, lora_cat, lora_modules, lora_to_delta
from .methods import average, dare_linear, dare_ties, linear, magmax, magnitude_prune, tall_masks, ties
from .pam import pam_align

MergeFn = Callable[..., dict[str, torch.Tensor]]

#: name -> fn(tvs, weights, **hyper) -> merged; the registry the trainer and server pick methods from.
MERGE_METHODS: dict[str, MergeFn] = {
    "linear": lambda tvs, weights, **_: linear(tvs, weights),
    "average": lambda tvs, weights=None, **_: average(tvs),
    "ties": lambda tvs, weights, density=0.5, **kw: ties(tvs, weights, density, **kw),
    "dare_linear": lambda tvs, weights, density=0.5, **kw: dare_linear(tvs, weights, density, **kw),
    "dare_ties": lambda tvs, weights, density=0.5, **kw: dare_ties(tvs, weights, density, **kw),
    "magnitude_prune": lambda tvs, weights, density=0.5, **_: magnitude_prune(tvs, weights, density),
    "magmax": lambda tvs, weights=None, **_: magmax(tvs),
    "tall": lambda tvs, weights, lam=0.4, min_agree=2, **_: tall_masks(tvs, weights, lam, min_agree)[0],
}

__all__ = [
    "AdaptiveCoefficients",
    "MERGE_METHODS",
    "average",
    "dare_linear",
    "dare_ties",
    "delta_to_lora",
    "linear",
    "lora_cat",
    "lora_modules",
    "lora_to_delta",
    "magmax",
    "magnitude_prune",
    "pam_align",
    "tall_masks",
    "ties",
]
