"""LoRA on timm backbones through peft, and the two ways an adapter reaches a forward pass.

An adapter is a flat ``dict[str, Tensor]`` in one of two formats:

* ``lora``: peft's saved state dict (``<module>.lora_A.weight`` / ``lora_B.weight`` plus the shared
  classifier, ``<head>.*`` where ``head`` is the backbone's ``BackboneSpec.head``: ``head`` for ViTs,
  ``classifier`` for EfficientNet), what PAM and the averaging baselines train and merge in factor space;
* ``delta``: dense ΔW per target module (``<module>.delta``) plus ``<head>.*``, what exact delta-space
  merges (adaptive coefficients over TIES / DARE) produce.

Targets are ``nn.Linear`` layers (factors r × in, out × r) or 1×1 ``nn.Conv2d`` layers (factors
r × in × 1 × 1, out × r × 1 × 1, ΔW out × in × 1 × 1); see :mod:`merge.lora`.

Keys are relative to the *bare* backbone (peft's ``base_model.model.`` prefix stripped), so both
formats fold into the same backbone with :func:`materialise` for zero-overhead serving.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils import ModulesToSaveWrapper
from torch import nn

from .settings import LoraSettings

if TYPE_CHECKING:
    from .backbones import BackboneSpec

PREFIX = "base_model.model."


def _is_target_kind(m: nn.Module) -> bool:
    # A 1×1, ungrouped conv is a per-pixel linear map, so ΔW = s·B·A holds exactly as for nn.Linear.
    if isinstance(m, nn.Conv2d):
        return tuple(m.kernel_size) == (1, 1) and m.groups == 1
    return isinstance(m, nn.Linear)


def classifier_name(model: nn.Module) -> str:
    """Module name of a timm model's classifier (the module ``get_classifier()`` returns).

    Raises:
        ValueError: if the model has no ``get_classifier`` or it returns no submodule.
    """
    clf = model.get_classifier() if hasattr(model, "get_classifier") else None
    for n, m in model.named_modules():
        if n and m is clf:
            return n
    raise ValueError(f"{type(model).__name__}: cannot tell its classifier module; pass the backbone's spec")


def target_module_names(model: nn.Module, targets: tuple[str, ...] | None, head: str | None = None) -> list[str]:
    """Full names of the ``nn.Linear`` and 1×1 ``nn.Conv2d`` modules whose leaf name is in ``targets``.

    Derived from the model rather than hard-coded, so ``patch_embed.proj`` (an 8×8 conv) and depthwise
    convs are never targeted, and renamed modules in other library versions are caught by ``targets``.

    Args:
        model: The bare backbone.
        targets: Leaf names to match; None: every nn.Linear / 1×1 conv outside ``head``.
        head: The classifier module, never a LoRA target (it is trained in full).

    Raises:
        ValueError: if nothing matches.
    """

    def in_head(n: str) -> bool:
        return head is not None and (n == head or n.startswith(head + "."))

    names = [
        n
        for n, m in model.named_modules()
        if n and _is_target_kind(m) and not in_head(n) and (targets is None or n.split(".")[-1] in targets)
    ]
    if not names:
        raise ValueError(f"no nn.Linear or 1×1 nn.Conv2d named {targets} in {type(model).__name__}")
    return names


def attach_lora(model: nn.Module, cfg: LoraSettings, seed: int = 0, spec: BackboneSpec | None = None) -> PeftModel:
    """Wrap ``model`` (in place) with LoRA on its targets; the classifier is trained and saved in full.

    The LoRA A factors are initialised from ``seed`` so every strategy starts from the same adapter.

    Args:
        model: The bare backbone.
        cfg: LoRA settings; ``cfg.targets`` None uses the spec's ``lora_targets``.
        seed: Seed of the LoRA initialisation.
        spec: The backbone's registry entry (classifier name, default targets). None: derive both from
            the model (timm's ``get_classifier()``; every nn.Linear / 1×1 conv outside it).

    Raises:
        ValueError: if no target matches, or peft's name-suffix rule for ``modules_to_save`` would wrap
            more than the classifier (e.g. ``head`` also matches ``conv_head``).
    """
    head = spec.head if spec is not None else classifier_name(model)
    targets = cfg.targets if cfg.targets is not None else (spec.lora_targets if spec is not None else None)
    lc = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target_module_names(model, targets, head),
        modules_to_save=[head],
    )
    return wrap(model, lc, seed)


def wrap(model: nn.Module, lc: LoraConfig, seed: int = 0) -> PeftModel:
    """``get_peft_model`` with the A factors seeded from ``seed`` and ``modules_to_save`` checked.

    Raises:
        ValueError: peft's name-suffix rule for ``modules_to_save`` would wrap more than the named modules
            (e.g. ``head`` also matches ``conv_head``), or wrapped other ones.
    """
    keep = sorted(lc.modules_to_save or [])
    # peft picks modules_to_save by `name.endswith(entry)`, with no way to anchor it: refuse a name that is
    # a suffix of another module's name instead of letting peft wrap (or fail on) that one too
    clash = [n for n, _ in model.named_modules() for h in keep if n != h and n.endswith(h)]
    if clash:
        raise ValueError(f"classifier {keep} is a suffix of {clash[:3]}: peft's modules_to_save would match them")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        pm = get_peft_model(model, lc)
    wrapped = sorted(n.removeprefix(PREFIX) for n, m in pm.named_modules() if isinstance(m, ModulesToSaveWrapper))
    if wrapped != keep:
        raise ValueError(f"peft wrapped {wrapped} for modules_to_save, expected exactly {keep}")
    return pm


def is_lora_factor(key: str) -> bool:
    """Whether a ``lora``-format key (or a peft parameter name) is a LoRA factor; everything else an
    adapter trains is the shared classifier."""
    return ".lora_A." in key or ".lora_B." in key


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


from .fold import _target, functional_forward, materialise, to_delta  # noqa: E402,F401  (the peft-free half)
