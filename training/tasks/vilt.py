"""The offline VQA model: a tiny ViLT, its tokenizer, and its loader (pretrained on ``scenes_vqa``).

``ViltForQuestionAnswering`` built from a config object (no download): 64 px images in 8 px patches and
the question share one 4-layer transformer; the answer is a classification over a fixed answer vocabulary
(:data:`training.data.scenes.ANSWERS`). Every projection is a plain ``nn.Linear``, so LoRA's ΔW = s·B·A
folds into the weights. The tokenizer is ``BertTokenizerFast`` over the project's own
``vqa_vocab/vocab.txt`` (161 word pieces).

Pretraining covers *all* question families with the whole answer vocabulary, so the answer head is trained
once and then frozen and shared by every domain's LoRA (training a head per domain is the known trap: a
head tuned on counting answers numbers to colour questions). Run ``mergeserve pretrain-vqa --model
vilt_scenes`` (the recipe: :mod:`training.recipes.vilt_scenes`); the ``vqa`` task also builds it on first
use. Cached under ``cache_dir()/backbones/``: ``vilt_scenes.safetensors`` (provenance in its metadata),
``vilt_scenes.json`` (the same provenance plus the file's sha256) and ``vilt_scenes.tokenizer/``. The same
three files under ``training/assets/`` (shipped with the package) are used when no cached file exists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import BertTokenizerFast, ViltConfig, ViltForQuestionAnswering

from .. import artifacts

NAME = "vilt_scenes"
VOCAB_DIR = Path(__file__).with_name("vqa_vocab")  # holds the project's vocab.txt
SHIPPED = Path(__file__).parents[1] / "assets" / "vilt_scenes.safetensors"  # package data, if shipped


@dataclass
class VqaModelConfig:
    """Architecture of the offline ViLT (defaults: the published model, 0.65 M parameters)."""

    hidden: int = 128  # width of the shared text+image transformer
    layers: int = 4
    heads: int = 4
    mlp: int = 256  # intermediate size (ratio 2, like vit_tiny_offline)
    image_size: int = 64  # input resolution; images are resized to it
    patch: int = 8  # 64 px / 8 = 8×8 = 64 image tokens
    max_text_len: int = 32  # question tokens incl. [CLS]/[SEP]; longer questions are truncated

    def vilt(self, vocab_size: int, answers: list[str]) -> ViltConfig:
        """The transformers config (dropout off, all patches kept: no random patch sampling)."""
        return ViltConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            intermediate_size=self.mlp,
            image_size=self.image_size,
            patch_size=self.patch,
            max_position_embeddings=self.max_text_len,
            max_image_length=-1,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=len(answers),
            id2label=dict(enumerate(answers)),
            label2id={a: i for i, a in enumerate(answers)},
        )


def tokenizer_from_vocab(path: str | os.PathLike = VOCAB_DIR) -> BertTokenizerFast:
    """``BertTokenizerFast`` from a directory holding ``vocab.txt`` (or a saved tokenizer), offline only."""
    return BertTokenizerFast.from_pretrained(str(path), local_files_only=True)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """(grid², dim) fixed 2-D sin-cos position embeddings (MAE), unit scale, row-major like the patches."""
    y, x = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float32) / q)
    parts = []
    for c in (x.flatten(), y.flatten()):
        a = c[:, None] * omega[None]  # (grid², q)
        parts += [a.sin(), a.cos()]
    return torch.cat(parts, dim=1)  # (grid², 4q)


def build_vilt(cfg: VqaModelConfig, vocab_size: int, answers: list[str], seed: int = 0) -> ViltForQuestionAnswering:
    """A randomly initialised ViLT (identical for equal seeds), in eval mode.

    transformers leaves ViLT's image position embeddings and image [CLS] at zero (the original recipe
    loads them from a ViT); from scratch they start as 2-D sin-cos embeddings and N(0, 0.02), so patches
    know where they are from step one.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ViltForQuestionAnswering(cfg.vilt(vocab_size, answers)).eval()
        emb = model.vilt.embeddings
        with torch.no_grad():
            grid = cfg.image_size // cfg.patch
            emb.position_embeddings[0, 1:, : 4 * (cfg.hidden // 4)] = sincos_2d(cfg.hidden, grid)
            torch.nn.init.trunc_normal_(emb.cls_token, std=0.02)
    return model


def weights_path() -> str:
    """Where the pretrained ``vilt_scenes`` weights are cached (may not exist yet)."""
    from ..backbones import cache_dir

    return os.path.join(cache_dir(), "backbones", "vilt_scenes.safetensors")


def default_weights() -> str:
    """The cached file if it exists, else the shipped one if it exists, else the cache path (to be built)."""
    cached = weights_path()
    return cached if os.path.exists(cached) or not SHIPPED.exists() else str(SHIPPED)


def sidecar(path: str, suffix: str) -> str:
    """The file beside weights ``path`` with ``suffix`` instead of ``.safetensors`` (``.json``, ``.tokenizer``)."""
    return path[: -len(".safetensors")] + suffix


def read_provenance(path: str) -> dict:
    """The provenance stored in a ``vilt_scenes`` safetensors file's metadata."""
    return artifacts.read_provenance(path)


def load_vilt(
    path: str | None = None, ensure_pretrained: bool = True
) -> tuple[ViltForQuestionAnswering, BertTokenizerFast, dict]:
    """The pretrained ViLT (eval mode, frozen), its tokenizer and provenance.

    The architecture and answer list are read from the file's provenance, so a cached model keeps working
    when the defaults change.

    Args:
        path: safetensors file; default :func:`default_weights` (cache, else shipped).
        ensure_pretrained: Pretrain into the cache (minutes, default recipe) when no default file exists, or
            when the cached one does not match its checksum.

    Raises:
        FileNotFoundError: the weights are missing and not buildable.
    """
    path = path or default_weights()
    if ensure_pretrained and path == weights_path():
        artifacts.ensure_default(NAME, path, sidecar(path, ".json"))
    if not os.path.exists(path):
        raise FileNotFoundError(f"VQA weights not found: {path} (run: mergeserve pretrain-vqa --model {NAME})")
    prov = read_provenance(path)
    tok = tokenizer_from_vocab(sidecar(path, ".tokenizer"))
    model = build_vilt(VqaModelConfig(**prov["model"]), len(tok), prov["answers"])
    model.load_state_dict(load_file(path), strict=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok, prov
