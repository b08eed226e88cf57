"""Procedural pretraining data for the offline backbone: letters and shapes, never digits.

36 classes — the 26 capital letters rendered in matplotlib's bundled fonts and 10 geometric shapes —
drawn with random position, scale, stroke, colour, background and polarity. Disjoint from every
``digits5`` domain by construction (no digit glyph is ever drawn), yet it teaches strokes, edges and
colour invariance, the way ImageNet pretraining teaches natural-image features.
"""

from __future__ import annotations

import string

import numpy as np
import torch
from PIL import Image, ImageDraw

from .digits import _fonts, render_glyph
from .images import SIZE, to_chw

SHAPES = ["circle", "disc", "square", "box", "triangle", "plus", "cross", "hbars", "vbars", "diamond"]
CLASSES = list(string.ascii_uppercase) + SHAPES


def _shape(kind: str, rng: np.random.RandomState) -> np.ndarray:
    im = Image.new("L", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(im)
    r = rng.uniform(7, 14)
    cx, cy = rng.uniform(r, SIZE - r, size=2)
    w = int(rng.randint(2, 5))
    box = [cx - r, cy - r, cx + r, cy + r]
    if kind == "circle":
        d.ellipse(box, outline=255, width=w)
    elif kind == "disc":
        d.ellipse(box, fill=255)
    elif kind == "square":
        d.rectangle(box, fill=255)
    elif kind == "box":
        d.rectangle(box, outline=255, width=w)
    elif kind == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=255)
    elif kind == "plus":
        d.line([(cx - r, cy), (cx + r, cy)], fill=255, width=w)
        d.line([(cx, cy - r), (cx, cy + r)], fill=255, width=w)
    elif kind == "cross":
        d.line([(cx - r, cy - r), (cx + r, cy + r)], fill=255, width=w)
        d.line([(cx - r, cy + r), (cx + r, cy - r)], fill=255, width=w)
    elif kind in ("hbars", "vbars"):
        for k in range(int(rng.randint(2, 5))):
            o = 4 + k * 7
            d.line([(0, o), (SIZE, o)] if kind == "hbars" else [(o, 0), (o, SIZE)], fill=255, width=w)
    else:  # diamond
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=255)
    return np.asarray(im.rotate(rng.uniform(-20, 20), resample=Image.BILINEAR))


def _colourise(mask: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """Foreground/background colours, a smooth gradient and noise; polarity random."""
    fg, bg = rng.randint(0, 256, size=3), rng.randint(0, 256, size=3)
    if np.abs(fg.astype(int) - bg).sum() < 150:
        fg = 255 - bg
    yy = np.linspace(0, 1, SIZE)[:, None, None] * rng.uniform(-60, 60)
    a = (mask.astype(np.float32) / 255)[..., None]
    img = a * fg + (1 - a) * (bg + yy) + rng.normal(0, rng.uniform(0, 20), size=(SIZE, SIZE, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_shapes(n_per_class: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic pretraining set: (N, 3, 32, 32) uint8 images and labels over :data:`CLASSES`."""
    rng = np.random.RandomState(seed)
    fonts = _fonts()
    imgs, ys = [], []
    for _ in range(n_per_class):
        for c, name in enumerate(CLASSES):
            if c < 26:
                mask = render_glyph(name, fonts[rng.randint(len(fonts))], rng)
            else:
                mask = _shape(name, rng)
            imgs.append(_colourise(mask, rng))
            ys.append(c)
    return to_chw(imgs), torch.tensor(ys, dtype=torch.int64)
