"""LoRA on timm backbones through peft, and the two ways an adapter reaches a forward pass.

An adapter is a flat ``dict[str, Tensor]`` in one of two formats:

* ``lora``: peft's saved state dict (``<module>.lora_A.weight`` / ``lora_B.weight`` plus the shared
  classifier ``head.*``), what PAM and the averaging baselines train and merge in factor space;
* ``delta``: dense ΔW per target module (``<module>.delta``) plus ``head.*``, what exact delta-space
  merges (adaptive coefficients over TIES / DARE) produce.

Keys are relative to the *bare* backbone (peft's ``base_model.model.`` prefix stripped), so both
formats fold into the same backbone with :func:`materialise` for zero-overhead serving.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from pydantic import BaseModel, Field
from torch import nn

import merge

PREFIX = "base_model.model."


class LoraSettings(BaseModel):
    """LoRA hyper-parameters (defaults: small-backbone setting; PAM uses rank 32 on ViT-B/16)."""

    rank: int = Field(8, ge=1, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, description="lora_alpha; scaling s = alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    targets: tuple[str, ...] = Field(("qkv", "proj", "fc1", "fc2"), description="leaf names of target Linears")

    @property
    def scaling(self) -> float:
        """s = alpha / r."""
        return self.alpha / self.rank


def target_module_names(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Full names of the ``nn.Linear`` modules whose leaf name is in ``targets``.

    Derived from the model rather than hard-coded, so ``patch_embed.proj`` (a conv) is never targeted
    and renamed projections in other libraries are caught by configuring ``targets``.

    Raises:
        ValueError: if nothing matches.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
    if not names:
        raise ValueError(f"no nn.Linear named {targets} in {type(model).__name__}")
    return names


def attach_lora(model: nn.Module, cfg: LoraSettings, seed: int = 0) -> PeftModel:
    """Wrap ``model`` (in place) with LoRA on its targets; the ``head`` is trained and saved in full.

    The LoRA A factors are initialised from ``seed`` so every strategy starts from the same adapter.
    """
    lc = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target_module_names(model, cfg.targets),
        modules_to_save=["head"],
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return get_peft_model(model, lc)


def get_adapter(pm: PeftModel) -> dict[str, torch.Tensor]:
    """The trainable adapter (LoRA factors + head) as detached clones, keys relative to the backbone."""
    sd = get_peft_model_state_dict(pm)
    return {k.removeprefix(PREFIX): v.detach().clone() for k, v in sd.items()}


@torch.no_grad()
def set_adapter(pm: PeftModel, adapter: Mapping[str, torch.Tensor]) -> None:
    """Load a ``lora``-format adapter into ``pm`` in place.

    Raises:
        ValueError: if keys or shapes do not match the model's adapter.
    """
    current = get_peft_model_state_dict(pm)
    full = {PREFIX + k: v for k, v in adapter.items()}
    if set(full) != set(current):
        diff = sorted(set(full) ^ set(current))
        raise ValueError(f"adapter does not fit the model: key {diff[0].removeprefix(PREFIX)!r} differs")
    for k, v in full.items():
        if v.shape != current[k].shape:
            want = tuple(current[k].shape)
            raise ValueError(f"adapter key {k.removeprefix(PREFIX)!r}: shape {tuple(v.shape)}, model has {want}")
    set_peft_model_state_dict(pm, full)


def to_delta(adapter: Mapping[str, torch.Tensor], cfg: LoraSettings) -> dict[str, torch.Tensor]:
    """``lora`` → ``delta`` format (exact: ΔW = s·B·A); a ``delta`` adapter is returned as is."""
    if not any(k.endswith(".lora_A.weight") for k in adapter):
        return dict(adapter)
    return merge.lora_to_delta(adapter, cfg.scaling)


@torch.no_grad()
def materialise(base: nn.Module, delta: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of the bare ``base`` with every ΔW added to its weight and the head replaced.

    Serving uses this: inference then costs exactly the bare backbone's forward pass.

    Raises:
        KeyError: if a delta names a module the backbone does not have.
    """
    model = copy.deepcopy(base)
    params = dict(model.named_parameters())
    for k, v in delta.items():
        name = k[: -len(".delta")] + ".weight" if k.endswith(".delta") else k
        if name not in params:
            raise KeyError(f"adapter key {k!r} has no parameter {name!r} in the backbone")
        p = params[name]
        p.copy_(p + v.to(p.dtype) if k.endswith(".delta") else v.to(p.dtype))
    return model.eval()


def functional_forward(base: nn.Module, delta: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``base`` with ``delta`` applied, differentiably w.r.t. the delta (for learning merge coefficients)."""
    params = dict(base.named_parameters())
    over = {}
    for k, v in delta.items():
        if k.endswith(".delta"):
            name = k[: -len(".delta")] + ".weight"
            over[name] = params[name] + v
        else:
            over[k] = v
    return torch.func.functional_call(base, over, (x,))
