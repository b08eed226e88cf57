"""Adapters into weights, without peft: what a serving replica needs (importing peft costs ~80 MB and
seconds, and pulls in transformers).

``lora`` → ``delta`` (ΔW = s·B·A, :func:`to_delta`), ΔW folded into a copy of the bare model
(:func:`materialise`: inference then costs exactly the bare forward pass), and the same applied
differentiably (:func:`functional_forward`, for learning merge coefficients). Formats are described in
:mod:`training.lora`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

import merge

from .settings import LoraSettings


def to_delta(adapter: Mapping[str, torch.Tensor], cfg: LoraSettings) -> dict[str, torch.Tensor]:
    """``lora`` → ``delta`` format (exact: ΔW = s·B·A); a ``delta`` adapter is returned as is."""
    if not any(k.endswith(".lora_A.weight") for k in adapter):
        return dict(adapter)
    return merge.lora_to_delta(adapter, cfg.scaling)


def _target(params: Mapping[str, torch.Tensor], k: str, v: torch.Tensor) -> tuple[str, torch.Tensor]:
    """The parameter name a ``delta``-format key writes, and its value shaped like that parameter.

    A 1×1 conv's ΔW may come as (out, in) or (out, in, 1, 1); anything else must match exactly, because
    broadcasting a wrong shape would silently corrupt the weight.
    """
    name = k[: -len(".delta")] + ".weight" if k.endswith(".delta") else k
    if name not in params:
        raise KeyError(f"adapter key {k!r} has no parameter {name!r} in the backbone")
    p = params[name]
    if v.shape != p.shape:
        if not (k.endswith(".delta") and p.dim() == 4 and p.shape[2:] == (1, 1) and v.shape == p.shape[:2]):
            raise ValueError(f"adapter key {k!r}: shape {tuple(v.shape)}, parameter {name!r} has {tuple(p.shape)}")
        v = v.reshape(p.shape)
    return name, v


@torch.no_grad()
def materialise(base: nn.Module, delta: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of the bare ``base`` with every ΔW added to its weight and the head replaced.

    Serving uses this: inference then costs exactly the bare backbone's forward pass. Linear and conv
    targets alike: a conv's ΔW has the conv weight's shape (out, in, 1, 1).

    Raises:
        KeyError: if a delta names a module the backbone does not have.
        ValueError: if a tensor's shape does not fit its parameter.
    """
    model = copy.deepcopy(base)
    params = dict(model.named_parameters())
    for k, v in delta.items():
        name, v = _target(params, k, v)
        p = params[name]
        p.copy_(p + v.to(p.dtype) if k.endswith(".delta") else v.to(p.dtype))
    return model.eval()


def functional_forward(base: nn.Module, delta: Mapping[str, torch.Tensor], *args: object, **kwargs: object) -> object:
    """``base(*args, **kwargs)`` with ``delta`` applied, differentiably w.r.t. the delta (for learning merge
    coefficients).

    Raises:
        KeyError: if a delta names a module the backbone does not have.
        ValueError: if a tensor's shape does not fit its parameter.
    """
    params = dict(base.named_parameters())
    over = {}
    for k, v in delta.items():
        name, v = _target(params, k, v)
        over[name] = params[name] + v if k.endswith(".delta") else v
    return torch.func.functional_call(base, over, args, kwargs)
