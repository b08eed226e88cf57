"""LoRA glue: between peft LoRA state dicts (factor space) and dense deltas ΔW = s·B·A (delta space).

Merging A and B separately is *not* merging ΔW (cross terms BᵢAⱼ, peft issue #3004). Delta space is
exact; factor space is what PAM does and is defensible only because the temporary LoRA starts from the
global one. Keys follow peft's saved format: ``<module>.lora_A.weight`` (r × in) and
``<module>.lora_B.weight`` (out × r); every other key (e.g. a trained classifier head) passes through.

Conv LoRA (peft on ``nn.Conv2d``): A is a conv (r × in × kh × kw) and B a 1×1 conv (out × r × 1 × 1), so
ΔW = s·(B₂·A₂) reshaped to (out × in × kh × kw), with B₂, A₂ the factors flattened to matrices; for a
1×1 conv that is (out × in × 1 × 1). This is the weight peft's ``merge_and_unload`` adds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ._checks import TaskVector, as_weights, check_task_vectors

_A, _B = ".lora_A.weight", ".lora_B.weight"


def lora_modules(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """Module prefixes that have both LoRA factors, in state-dict order.

    Raises:
        ValueError: if a module has an A factor without its B factor (or the reverse).
    """
    mods = [k[: -len(_A)] for k in sd if k.endswith(_A)]
    for m in mods:
        if m + _B not in sd:
            raise ValueError(f"{m!r} has lora_A but no lora_B")
    orphans = [k for k in sd if k.endswith(_B) and k[: -len(_B)] not in mods]
    if orphans:
        raise ValueError(f"{orphans[0]!r} has no matching lora_A")
    return mods


def _is_factor(key: str) -> bool:
    return key.endswith(_A) or key.endswith(_B)


def _scale(scaling: float | Mapping[str, float], module: str) -> float:
    return float(scaling[module]) if isinstance(scaling, Mapping) else float(scaling)


def _product(m: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B·A for linear (2-D) or conv (4-D) factors, shaped like the target's weight."""
    if a.dim() == b.dim() == 2:
        return b @ a  # (out, r) @ (r, in) -> (out, in)
    if a.dim() == b.dim() == 4 and b.shape[2:] == (1, 1):
        # B is a 1×1 conv applied after A: ΔW[o, i, h, w] = Σ_r B[o, r] · A[r, i, h, w].
        return (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:])
    raise ValueError(f"{m!r}: LoRA factors of shapes {tuple(a.shape)}, {tuple(b.shape)} are neither linear nor conv")


def lora_to_delta(sd: Mapping[str, torch.Tensor], scaling: float | Mapping[str, float]) -> dict[str, torch.Tensor]:
    """ΔW = s·B·A for every LoRA module; non-LoRA keys are copied.

    Args:
        sd: A peft LoRA state dict (adapter name already stripped, as ``get_peft_model_state_dict`` gives).
        scaling: s = lora_alpha / r (or / √r with rslora), one float or one per module.

    Returns:
        ``{module + ".delta": ΔW}`` plus the passed-through keys; ΔW is (out × in) for a linear target and
        (out × in × kh × kw), the conv weight's shape, for a conv target.

    Raises:
        ValueError: if factors are unpaired or their shapes are neither linear (2-D, 2-D) nor conv
            (4-D, 4-D with a 1×1 B).
    """
    out: dict[str, torch.Tensor] = {}
    for m in lora_modules(sd):
        out[m + ".delta"] = _scale(scaling, m) * _product(m, sd[m + _A], sd[m + _B])
    out.update({k: v.clone() for k, v in sd.items() if not _is_factor(k)})
    return out


def delta_to_lora(
    deltas: Mapping[str, torch.Tensor], rank: int, scaling: float | Mapping[str, float]
) -> dict[str, torch.Tensor]:
    """Factor each ΔW back into LoRA factors by truncated SVD; exact when rank(ΔW) ≤ ``rank``.

    ΔW/s = U·S·Vᴴ, B = U[:, :r]·√S[:r], A = √S[:r]·Vᴴ[:r]; the singular values are split evenly so
    that neither factor dominates the other's scale when training resumes from them. A 4-D (conv) ΔW
    is factored as the matrix (out × in·kh·kw) and gives conv factors A (r × in × kh × kw) and
    B (out × r × 1 × 1), the shapes peft uses.

    Args:
        deltas: Output of :func:`lora_to_delta` (``<module>.delta`` keys; others pass through).
        rank: Target rank r.
        scaling: The s the factors will be used with (alpha / r of the target LoRA config).

    Returns:
        A LoRA state dict with ``lora_A``/``lora_B`` keys.

    Raises:
        ValueError: if ``rank < 1`` or a ΔW is neither 2-D nor 4-D.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    out: dict[str, torch.Tensor] = {}
    for k, v in deltas.items():
        if not k.endswith(".delta"):
            out[k] = v.clone()
            continue
        m = k[: -len(".delta")]
        if v.dim() not in (2, 4):
            raise ValueError(f"{k!r}: ΔW must be 2-D (linear) or 4-D (conv), got shape {tuple(v.shape)}")
        mat = v.flatten(1)  # conv (out, in, kh, kw) -> (out, in·kh·kw); linear unchanged
        u, s, vh = torch.linalg.svd(mat.float() / _scale(scaling, m), full_matrices=False)
        r = min(rank, s.numel())
        root = s[:r].sqrt()
        b = torch.zeros(mat.shape[0], rank, dtype=v.dtype, device=v.device)
        a = torch.zeros(rank, mat.shape[1], dtype=v.dtype, device=v.device)
        b[:, :r] = (u[:, :r] * root).to(v.dtype)
        a[:r] = (root[:, None] * vh[:r]).to(v.dtype)
        if v.dim() == 4:
            a, b = a.reshape(rank, *v.shape[1:]), b.reshape(*b.shape, 1, 1)
        out[m + _A], out[m + _B] = a, b
    return out


def lora_cat(sds: Sequence[TaskVector], weights: Sequence[float] | torch.Tensor) -> dict[str, torch.Tensor]:
    """Exact weighted sum of LoRAs by concatenating ranks: ΔW = Σᵢ wᵢ·Bᵢ·Aᵢ at rank Σᵢ rᵢ.

    The result keeps each input's scaling s only if the caller sets the new config's
    ``lora_alpha = s · Σᵢ rᵢ``. Non-LoRA keys are merged linearly with the same weights.

    Ranks may differ between inputs; other shapes must agree.

    Raises:
        ValueError: on mismatched keys or a wrong number of weights.
    """
    check_task_vectors([{k: v for k, v in sd.items() if not _is_factor(k)} for sd in sds])
    mods = lora_modules(sds[0])
    for i, sd in enumerate(sds[1:], start=1):
        if set(lora_modules(sd)) != set(mods):
            raise ValueError(f"LoRA task vector {i} targets different modules than task vector 0")
    out: dict[str, torch.Tensor] = {}
    for m in mods:
        w = as_weights(weights, len(sds), sds[0][m + _B])
        out[m + _A] = torch.cat([sd[m + _A] for sd in sds], dim=0)  # (Σr, in)
        out[m + _B] = torch.cat([wi * sd[m + _B] for wi, sd in zip(w, sds)], dim=1)  # (out, Σr)
    for k in (k for k in sds[0] if not _is_factor(k)):
        w = as_weights(weights, len(sds), sds[0][k])
        out[k] = sum(wi * sd[k] for wi, sd in zip(w, sds))
    return out
