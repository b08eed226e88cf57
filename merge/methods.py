"""Merging methods over task vectors: thin dict-level wrappers around peft's per-tensor primitives.

Every function takes a list of task vectors (``dict[str, Tensor]`` with identical keys and shapes) and
returns a new dict; inputs are never modified and dtype/device are preserved. ``weights`` may be a tensor
with ``requires_grad`` (e.g. from :class:`merge.AdaptiveCoefficients`): every function is differentiable
with respect to it.

Which TIES: peft's (per-tensor top-k by magnitude, sign elected from the *unweighted* pruned tensors,
weighted disjoint mean). mergekit and FusionBench differ; results must say which one they use.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from ._checks import TaskVector, Weights, as_weights, check_density, check_task_vectors

MajoritySign = Literal["total", "frequency"]


def _pmu():  # noqa: ANN202 - peft's merge_utils, imported on first use: importing peft costs ~80 MB and seconds
    from peft.utils import merge_utils

    return merge_utils


def _per_key(
    tvs: Sequence[TaskVector], weights: Weights | None, fn: Callable[..., torch.Tensor]
) -> dict[str, torch.Tensor]:
    keys = check_task_vectors(tvs)
    out = {}
    for k in keys:
        ts = [tv[k] for tv in tvs]
        w = None if weights is None else as_weights(weights, len(tvs), ts[0])
        # peft's disjoint_merge divides by a float32 count, promoting bf16/fp16 results: cast back
        out[k] = fn(ts, w).to(ts[0].dtype)
    return out


def _quiet(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """peft warns on every tensor when density >= 1 (no pruning); that is a valid, documented input here."""

    def wrapped(*args: object, **kwargs: object) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The density .* no pruning")
            return fn(*args, **kwargs)

    return wrapped


def linear(tvs: Sequence[TaskVector], weights: Weights) -> dict[str, torch.Tensor]:
    """Task arithmetic: Σᵢ wᵢ·τᵢ (Ilharco et al. 2023, "Editing models with task arithmetic").

    Args:
        tvs: Task vectors with identical keys and shapes.
        weights: One weight per task vector (list or 1-D tensor, may require grad).

    Returns:
        The weighted sum, key by key.

    Raises:
        ValueError: on mismatched keys/shapes or a wrong number of weights.
    """
    return _per_key(tvs, weights, _pmu().task_arithmetic)


def average(tvs: Sequence[TaskVector]) -> dict[str, torch.Tensor]:
    """Element-wise mean of the task vectors (PAM paper, Algorithm 1: ``Avg(W_G, W')``)."""
    n = len(tvs)
    return linear(tvs, [1.0 / max(n, 1)] * n)


def ties(
    tvs: Sequence[TaskVector], weights: Weights, density: float, majority_sign: MajoritySign = "total"
) -> dict[str, torch.Tensor]:
    """TIES-merging (Yadav et al. 2023): trim to ``density`` by magnitude, elect sign, disjoint mean.

    Same numbers as ``peft.utils.merge_utils.ties`` applied key by key.

    Args:
        tvs: Task vectors with identical keys and shapes.
        weights: One weight per task vector.
        density: Fraction of each tensor's entries kept (per tensor, by magnitude), in [0, 1].
        majority_sign: ``"total"`` (sign of the summed values) or ``"frequency"`` (sign count).

    Returns:
        The merged task vector.

    Raises:
        ValueError: on mismatched keys/shapes, wrong number of weights, or density outside [0, 1].
    """
    check_density(density)
    f = _quiet(_pmu().ties)
    return _per_key(tvs, weights, lambda ts, w: f(ts, w, density, majority_sign))


def magnitude_prune(tvs: Sequence[TaskVector], weights: Weights, density: float) -> dict[str, torch.Tensor]:
    """Per-tensor magnitude pruning to ``density`` followed by task arithmetic (peft's ``magnitude_prune``)."""
    check_density(density)
    f = _quiet(_pmu().magnitude_prune)
    return _per_key(tvs, weights, lambda ts, w: f(ts, w, density))


def _dare_prune(t: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    # Same draw as peft's random_pruning, but from an explicit generator when one is given.
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density


def dare_linear(
    tvs: Sequence[TaskVector], weights: Weights, density: float, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """DARE (Yu et al. 2024, "Language models are super mario"): random drop, rescale by 1/density, sum.

    With ``generator=None`` this calls peft's ``dare_linear`` and draws from torch's global RNG (seed
    before every merge for reproducible adapters); with a generator, the masks are drawn from it in the
    same order, giving peft's numbers for the same RNG state.

    Raises:
        ValueError: on mismatched keys/shapes, wrong number of weights, or density outside [0, 1].
    """
    check_density(density)
    if generator is None:
        f = _quiet(_pmu().dare_linear)
        return _per_key(tvs, weights, lambda ts, w: f(ts, w, density))

    def fn(ts: list[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
        return _pmu().task_arithmetic([_dare_prune(t, density, generator) for t in ts], w)

    return _per_key(tvs, weights, fn)


def dare_ties(
    tvs: Sequence[TaskVector],
    weights: Weights,
    density: float,
    majority_sign: MajoritySign = "total",
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """DARE pruning followed by TIES sign election and disjoint mean (peft's ``dare_ties``).

    RNG semantics as in :func:`dare_linear`.

    Raises:
        ValueError: on mismatched keys/shapes, wrong number of weights, or density outside [0, 1].
    """
    check_density(density)
    if generator is None:
        f = _quiet(_pmu().dare_ties)
        return _per_key(tvs, weights, lambda ts, w: f(ts, w, density, majority_sign))

    def fn(ts: list[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack([_dare_prune(t, density, generator) for t in ts])
        sign_mask = _pmu().calculate_majority_sign_mask(stacked, method=majority_sign)
        return _pmu().disjoint_merge(stacked * _pmu().reshape_weight_task_tensors(stacked, w), sign_mask)

    return _per_key(tvs, weights, fn)


def magmax(tvs: Sequence[TaskVector]) -> dict[str, torch.Tensor]:
    """MagMax (Marczak et al. 2024): per element, the value of largest magnitude across task vectors.

    Ties in magnitude go to the *later* task vector (the most recent domain wins), matching the
    reference implementation's behaviour for sequential fine-tuning.
    """

    def fn(ts: list[torch.Tensor], _: object) -> torch.Tensor:
        stacked = torch.stack(ts[::-1])  # reversed so argmax's first-hit rule favours the later task
        idx = stacked.abs().argmax(dim=0, keepdim=True)
        return stacked.gather(0, idx).squeeze(0)

    return _per_key(tvs, None, fn)


def tall_masks(
    tvs: Sequence[TaskVector], weights: Weights, lam: float, min_agree: int = 2
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """TALL masks and consensus merging (Wang et al. 2024, "Localizing task information", cited by PAM).

    τ_MTL = Σᵢ wᵢ·τᵢ; task mask mᵢ = |τᵢ| ≥ λ·|τ_MTL − τᵢ|; the consensus keeps the elements of τ_MTL
    where at least ``min_agree`` task masks are set. Task-agnostic serving uses the consensus; the
    per-task masks need task identity at inference and are returned for callers that have it.

    Args:
        tvs: Task vectors with identical keys and shapes.
        weights: Weights of the multi-task vector τ_MTL.
        lam: λ ≥ 0; 0 keeps every element in every task mask.
        min_agree: Masks that must agree for an element to survive; clamped to ``len(tvs)`` so that a
            single task vector merged with weight 1 is returned unchanged.

    Returns:
        ``(consensus_merged, task_masks)``: the masked τ_MTL and one boolean dict per task vector.

    Raises:
        ValueError: on mismatched keys/shapes, wrong number of weights, or ``lam < 0``.
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    mtl = linear(tvs, weights)
    need = min(min_agree, len(tvs))
    masks = [{k: tv[k].abs() >= lam * (mtl[k] - tv[k]).abs() for k in mtl} for tv in tvs]
    merged = {}
    for k, v in mtl.items():
        votes = torch.stack([m[k] for m in masks]).sum(dim=0)
        merged[k] = v * (votes >= need).to(v.dtype)
    return merged, masks
