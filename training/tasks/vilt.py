"""The offline VQA model: a tiny ViLT, its tokenizer, and reproducible pretraining on ``scenes_vqa``.

``ViltForQuestionAnswering`` built from a config object (no download): 64 px images in 8 px patches and
the question share one 4-layer transformer; the answer is a classification over a fixed answer vocabulary
(:data:`training.data.scenes.ANSWERS`). Every projection is a plain ``nn.Linear``, so LoRA's ΔW = s·B·A
folds into the weights. The tokenizer is ``BertTokenizerFast`` over the project's own
``vqa_vocab/vocab.txt`` (161 word pieces).

Pretraining covers *all* question families with the whole answer vocabulary, so the answer head is trained
once and then frozen and shared by every domain's LoRA (training a head per domain is the known trap: a
head tuned on counting answers numbers to colour questions). Run ``python -m training.tasks.vilt``; the
``vqa`` task also builds it on first use. Cached under ``cache_dir()/backbones/``: ``vilt_scenes.safetensors``
(provenance in its metadata), ``vilt_scenes.json`` (the same provenance plus the file's sha256) and
``vilt_scenes.tokenizer/``. The same three files under ``training/assets/`` (shipped with the package) are used
when no cached file exists.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import BertTokenizerFast, ViltConfig, ViltForQuestionAnswering

from ..data.scenes import ANSWERS, FAMILIES, VqaSamples, make_family, scenes_vqa
from ..store import sha256_file
from .recipe import pinned_threads, run_record, supervised

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


@dataclass
class VqaPretrainConfig:
    """Pretraining recipe; the defaults are the published ``vilt_scenes`` model."""

    model: VqaModelConfig = field(default_factory=VqaModelConfig)
    steps: int = 2000  # optimizer steps (see docs/vqa.md for time and accuracy)
    batch_size: int = 64
    lr: float = 1e-3  # AdamW peak; linear warm-up then cosine to 0
    warmup: int = 100
    weight_decay: float = 0.05
    # Curriculum: the most objects per scene in each stage; the steps are split evenly between stages.
    # From scratch, binding a colour word to its object among 2–6 distractors never starts (1,500 steps
    # on 2–6 objects stayed at the answer prior of every family); scenes with 1–2 objects teach it first.
    stages: tuple[int, ...] = (2, 3, 4, 6)
    n_per_family: int = 1500  # pretraining examples per family and stage (generator streams 1, 2, …)
    n_test: int = 300  # held-out examples per family to report (the scenes_vqa test splits)
    seed: int = 0
    threads: int = 1  # torch threads while pretraining (float reductions, hence results, depend on it)


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


def _sidecar(path: str, suffix: str) -> str:
    return path[: -len(".safetensors")] + suffix


def read_provenance(path: str) -> dict:
    """The provenance stored in a ``vilt_scenes`` safetensors file's metadata."""
    with safe_open(path, framework="pt") as f:
        return json.loads(f.metadata()["provenance"])


def load_vilt(
    path: str | None = None, ensure_pretrained: bool = True
) -> tuple[ViltForQuestionAnswering, BertTokenizerFast, dict]:
    """The pretrained ViLT (eval mode, frozen), its tokenizer and provenance.

    The architecture and answer list are read from the file's provenance, so a cached model keeps working
    when the defaults change.

    Args:
        path: safetensors file; default :func:`default_weights` (cache, else shipped).
        ensure_pretrained: Pretrain into the cache (minutes, default recipe) when no default file exists.

    Raises:
        FileNotFoundError: the weights are missing and not buildable.
    """
    path = path or default_weights()
    if not os.path.exists(path):
        if path != weights_path() or not ensure_pretrained:
            raise FileNotFoundError(f"VQA weights not found: {path} (run: python -m training.tasks.vilt)")
        pretrain_vqa(path)
    prov = read_provenance(path)
    tok = tokenizer_from_vocab(_sidecar(path, ".tokenizer"))
    model = build_vilt(VqaModelConfig(**prov["model"]), len(tok), prov["answers"])
    model.load_state_dict(load_file(path), strict=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok, prov


def pretrain_vqa(out: str, cfg: VqaPretrainConfig | None = None, progress: bool = True) -> dict:
    """Pretrain the ViLT on every ``scenes_vqa`` family and save it atomically with its tokenizer.

    Args:
        out: Destination ``.safetensors`` (``.json`` provenance and ``.tokenizer/`` are written next to it).
        cfg: Recipe; default :class:`VqaPretrainConfig`.
        progress: Print progress and the per-family result.

    Returns:
        The provenance, with held-out accuracy per family and the wall time.
    """
    cfg = cfg or VqaPretrainConfig()
    with pinned_threads(cfg.threads):  # the server's first-use build equals the CLI's
        return _pretrain(out, cfg, progress)


def _pretrain(out: str, cfg: VqaPretrainConfig, progress: bool) -> dict:
    from .vqa import VqaTask

    t0 = time.time()
    torch.manual_seed(cfg.seed)
    pools = [  # one pool per curriculum stage, every family; stream 1 + stage: never the benchmark's stream 0
        VqaSamples.concat([make_family(f, cfg.n_per_family, cfg.seed, 1 + i, (1, most)) for f in FAMILIES])
        for i, most in enumerate(cfg.stages)
    ]
    heldout = scenes_vqa(n_train=0, n_test=cfg.n_test, seed=cfg.seed)
    tok = tokenizer_from_vocab()
    model = build_vilt(cfg.model, len(tok), ANSWERS, cfg.seed).train()
    task = VqaTask(model=model, tokenizer=tok, answers=ANSWERS)
    t_data = time.time() - t0
    supervised(model, task, lambda step: pools[min(len(pools) - 1, step * len(pools) // max(1, cfg.steps))],
               cfg, progress, t0)
    from . import evaluate

    acc = {d.name: round(evaluate(task, model, d.test), 4) for d in heldout.domains}
    prov = {
        "model_name": "vilt_scenes",
        "data": "scenes_vqa pretraining streams (training/data/scenes.py, streams 1..stages), all families",
        "answers": list(ANSWERS),
        "model": asdict(cfg.model),
        "config": {k: v for k, v in asdict(cfg).items() if k != "model"},
        "params": sum(p.numel() for p in model.parameters()),
        "heldout_acc": acc,
        "heldout_mean": round(sum(acc.values()) / len(acc), 4),
        **run_record(t0, t_data),
    }
    prov = json.loads(json.dumps(prov))  # tuples -> lists: the record equals what the JSON file holds
    _save(out, model, tok, prov)
    if progress:
        print(f"saved {out} in {prov['wall_s']} s; held-out accuracy {acc}")
    return prov


def _save(out: str, model: ViltForQuestionAnswering, tok: BertTokenizerFast, prov: dict) -> None:
    """Tokenizer and JSON first, the safetensors last and atomically: its presence means complete.

    Adds ``sha256`` (of the safetensors file) to ``prov``.
    """
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tok_dir = _sidecar(out, ".tokenizer")
    shutil.rmtree(tok_dir + ".tmp", ignore_errors=True)
    tok.save_pretrained(tok_dir + ".tmp")
    shutil.rmtree(tok_dir, ignore_errors=True)
    os.replace(tok_dir + ".tmp", tok_dir)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, out + ".tmp", metadata={"provenance": json.dumps(prov)})
    prov["sha256"] = sha256_file(out + ".tmp")  # JSON only: a file cannot hash itself
    with open(_sidecar(out, ".json"), "w") as f:
        json.dump(prov, f, indent=2)
    os.replace(out + ".tmp", out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """CLI flags (``python -m training.tasks.vilt``; a ``mergeserve pretrain-vqa`` entry can reuse them)."""
    d = VqaPretrainConfig()
    p.add_argument("--out", default=None, help="destination safetensors (default: the cache)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed (default {d.seed})")
    p.add_argument("--threads", type=int, default=d.threads, help=f"torch threads (default {d.threads})")


def run(args: argparse.Namespace) -> int:
    """Pretrain with the parsed flags."""
    cfg = VqaPretrainConfig(steps=args.steps, seed=args.seed, threads=args.threads)
    pretrain_vqa(args.out or weights_path(), cfg)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="pretrain the offline VQA model (vilt_scenes) on scenes_vqa")
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
