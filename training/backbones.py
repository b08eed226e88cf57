"""Backbone registry: timm ViTs behind one API (``forward_features``, ``forward_head``, ``reset_classifier``).

Each entry pins where its weights come from, because results depend on them. The offline default,
``vit_tiny_offline``, is pretrained by ``mergeserve pretrain`` on procedurally generated letters and
shapes (disjoint from every benchmark domain) and cached as safetensors with its provenance.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and feed it."""

    name: str
    build: Callable[[int], nn.Module]  # num_classes -> timm model with random or hub weights
    img_size: int  # square input resolution the model expects
    lora_targets: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")  # attention + MLP linears (PAM, §5.1)
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    weights: Callable[[], str | None] = field(default=lambda: None)  # local safetensors path, if any


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to :data:`BACKBONES`."""
    BACKBONES[spec.name] = spec
    return spec


def _tiny_vit(embed_dim: int, depth: int, heads: int) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(
            img_size=32,
            patch_size=8,
            num_classes=num_classes,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=heads,
            mlp_ratio=2.0,
        )

    return build


def cache_dir() -> str:
    """Where generated assets live: ``$MERGESERVE_CACHE`` or ``~/.cache/mergeserve``."""
    return os.environ.get("MERGESERVE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mergeserve"))


def offline_weights_path() -> str:
    """Path of the cached ``vit_tiny_offline`` weights (may not exist yet)."""
    return os.path.join(cache_dir(), "backbones", "vit_tiny_offline.safetensors")


register_backbone(BackboneSpec("vit_tiny_offline", _tiny_vit(128, 4, 4), 32, weights=offline_weights_path))
register_backbone(BackboneSpec("vit_test", _tiny_vit(32, 2, 2), 32))  # random init; tests only


def _timm_hub(tag: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        import timm

        return timm.create_model(tag, pretrained=True, num_classes=num_classes)

    return build


# For users with a hub: the papers' backbone, tag pinned (augreg2 in21k→in1k).
register_backbone(
    BackboneSpec(
        "vit_base_patch16_224.augreg2_in21k_ft_in1k", _timm_hub("vit_base_patch16_224.augreg2_in21k_ft_in1k"), 224
    )
)


def get_spec(name: str) -> BackboneSpec:
    """The registered spec called ``name``.

    Raises:
        KeyError: for an unknown name, listing the registered ones.
    """
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; registered: {sorted(BACKBONES)}")
    return BACKBONES[name]


def create_backbone(
    name: str, num_classes: int, weights: str | None = None, seed: int = 0, ensure_pretrained: bool = True
) -> nn.Module:
    """Build a backbone with its pretrained trunk and a fresh ``num_classes`` head.

    Args:
        name: Registered backbone name.
        num_classes: Output classes of the new head (initialised from ``seed``).
        weights: Explicit safetensors file; default: the spec's own (``vit_tiny_offline`` is pretrained
            and cached on first use when ``ensure_pretrained``).
        seed: Seed of the head initialisation, so every method starts from the same model.
        ensure_pretrained: Build missing offline weights (minutes) instead of failing.

    Raises:
        KeyError: unknown backbone. FileNotFoundError: weights missing and not buildable.
    """
    spec = get_spec(name)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # a random trunk (vit_test) is then identical in every process
        model = spec.build(num_classes)
    path = weights or spec.weights()
    if path:
        if not os.path.exists(path):
            if weights or not ensure_pretrained:
                raise FileNotFoundError(f"backbone weights not found: {path}")
            from .pretrain import pretrain

            pretrain(out=path)
        sd = load_file(path)
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected or [k for k in missing if not k.startswith("head.")]:
            raise ValueError(f"{path}: weights do not fit {name} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model.reset_classifier(num_classes)
    return model


def preprocess(spec: BackboneSpec, x: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) → normalised float at the backbone's resolution."""
    x = x.float().div_(255)
    if x.shape[-1] != spec.img_size:
        x = F.interpolate(x, size=(spec.img_size, spec.img_size), mode="bilinear", align_corners=False)
    mean = torch.tensor(spec.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std
