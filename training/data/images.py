"""Small image helpers shared by the benchmark generators (numpy / PIL, uint8 in and out)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

SIZE = 32  # every built-in benchmark is 32×32 RGB


def fit(img: np.ndarray, size: int = SIZE, inner: int | None = None) -> np.ndarray:
    """Resize a 2-D or HWC uint8 image so it fits ``inner`` pixels, centred on a ``size`` canvas."""
    inner = inner or size
    pil = Image.fromarray(img).resize((inner, inner), Image.BILINEAR)
    arr = np.asarray(pil)
    out = np.zeros((size, size) + arr.shape[2:], dtype=np.uint8)
    o = (size - inner) // 2
    out[o : o + inner, o : o + inner] = arr
    return out


def to_chw(imgs: list[np.ndarray]) -> torch.Tensor:
    """Stack HW (grey) or HWC images into a (N, 3, H, W) uint8 tensor."""
    arr = np.stack([i if i.ndim == 3 else np.repeat(i[..., None], 3, axis=2) for i in imgs])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def split(x: torch.Tensor, y: torch.Tensor, n_test: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Fixed shuffled split into (x_train, y_train, x_test, y_test)."""
    perm = torch.from_numpy(np.random.RandomState(seed).permutation(len(y)))
    x, y = x[perm], y[perm]
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]
