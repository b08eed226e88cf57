"""The ``vilt_scenes`` pretraining recipe: the offline ViLT (:mod:`training.tasks.vilt`) on every ``scenes_vqa``
family, seeded and thread-pinned, saved with its tokenizer and provenance (``mergeserve pretrain-vqa --model
vilt_scenes``; the ``vqa`` task builds it on first use through :data:`training.artifacts.BUILDERS`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import torch
from transformers import BertTokenizerFast, ViltForQuestionAnswering

from ..artifacts import atomic_dir, register_builder, save_with_provenance
from ..data.scenes import ANSWERS, FAMILIES, VqaSamples, make_family, scenes_vqa
from ..tasks import evaluate
from ..tasks.vilt import NAME, VqaModelConfig, build_vilt, sidecar, tokenizer_from_vocab
from ..tasks.vqa import VqaTask
from .common import pinned_threads, run_record, supervised


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



@register_builder(NAME)  # load_vilt builds missing cached weights with it
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
    prov = _save(out, model, tok, prov)
    if progress:
        print(f"saved {out} in {prov['wall_s']} s; held-out accuracy {acc}")
    return prov


def _save(out: str, model: ViltForQuestionAnswering, tok: BertTokenizerFast, prov: dict) -> dict:
    """Tokenizer first, then the weights with their provenance, each atomically: weights under their name mean
    complete. Returns the provenance plus ``sha256`` (of the safetensors file).
    """
    atomic_dir(sidecar(out, ".tokenizer"), tok.save_pretrained)
    return save_with_provenance(out, model.state_dict(), prov, sidecar(out, ".json"))
