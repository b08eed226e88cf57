"""Real DIL datasets in the standard ``root/domain/class/image`` layout (PACS, OfficeHome, DomainNet)."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..settings import IMAGE_EXTS
from .base import Benchmark, Domain, register_benchmark
from .images import split


def load_class_folder(
    root: str, size: int, classes: list[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read ``root/class/image`` into a uint8 (N, 3, size, size) tensor and labels.

    Args:
        root: Folder with one sub-folder per class.
        size: Images are resized to size × size RGB.
        classes: Fixed class list (labels index into it); default: the sorted sub-folder names.

    Returns:
        ``(x, y, classes)``.

    Raises:
        ValueError: if the folder has no images, a class folder is not in ``classes``, or an image does
            not decode (the message names the file).
    """
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    classes = classes or found
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise ValueError(f"{root}: class folder {unknown[0]!r} is not one of the known classes {classes}")
    xs, ys = [], []
    for c in found:
        for f in sorted(os.listdir(os.path.join(root, c))):
            if not f.lower().endswith(IMAGE_EXTS):
                continue
            path = os.path.join(root, c, f)
            try:
                with Image.open(path) as im:
                    xs.append(np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)))
            except (UnidentifiedImageError, OSError) as e:
                raise ValueError(f"{path}: not a decodable image ({e})") from e
            ys.append(classes.index(c))
    if not xs:
        raise ValueError(f"{root}: no images found in root/class/image layout")
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(ys, dtype=torch.int64), classes


@register_benchmark("folder")
def folder(
    root: str = "",
    domains: list[str] | None = None,
    size: int = 32,
    test_fraction: float = 0.2,
    seed: int = 0,
    **_: object,
) -> Benchmark:
    """A benchmark from ``root/domain/class/image``; classes are the union over domains, sorted.

    Args:
        root: Dataset root.
        domains: Domain order; default sorted sub-folders of ``root``.
        size: Square image size for the backbone.
        test_fraction: Held-out fraction per domain (fixed by ``seed``).
        seed: Split seed.

    Raises:
        ValueError: if ``root`` is missing or a domain is empty.
    """
    if not root or not os.path.isdir(root):
        raise ValueError(f"folder benchmark needs an existing root directory, got {root!r}")
    names = domains or sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    classes = sorted(
        {c for d in names for c in os.listdir(os.path.join(root, d)) if os.path.isdir(os.path.join(root, d, c))}
    )
    out = []
    for name in names:
        x, y, _ = load_class_folder(os.path.join(root, name), size, classes)
        x_tr, y_tr, x_te, y_te = split(x, y, max(1, int(round(test_fraction * len(y)))), seed)
        out.append(Domain(name, x_tr, y_tr, x_te, y_te))
    return Benchmark(os.path.basename(os.path.normpath(root)), classes, out)
