"""The ``vqa`` task: closed-vocabulary visual question answering with the offline ViLT.

Samples are :class:`training.data.scenes.VqaSamples` (uint8 images, questions, answer ids). The answer is a
classification over the fixed answer vocabulary, scored by exact match. The answer head is trained at
pretraining and shared: it is *not* in ``modules_to_save``, so every domain's adapter is pure LoRA on the
transformer's attention and MLP linears and merges cleanly.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertTokenizerFast, ViltForQuestionAnswering

from ..data.scenes import VqaSamples
from . import Batch, linear_targets, register_task
from .vilt import load_vilt

MEAN, STD = 0.5, 0.5  # pixel normalisation of the offline ViLT


def pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) → normalised float (N, 3, size, size)."""
    x = images.float().div_(255)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x - MEAN) / STD


@register_task("vqa")
class VqaTask:
    """Offline VQA: ViLT + answer-vocabulary classifier; see :class:`training.tasks.Task`.

    Args:
        weights: Pretrained safetensors; default the cached ``vilt_scenes`` (pretrained on first use).
        model: Use this model instead of loading one (tests, pretraining); it is never modified.
        tokenizer: Its tokenizer (required with ``model``).
        answers: Its answer vocabulary (default: the model config's ``id2label``).
        ensure_pretrained: Pretrain the default weights when missing instead of failing.
    """

    name = "vqa"
    modules_to_save: tuple[str, ...] = ()  # the answer head stays frozen and shared

    def __init__(
        self,
        weights: str | None = None,
        model: ViltForQuestionAnswering | None = None,
        tokenizer: BertTokenizerFast | None = None,
        answers: list[str] | None = None,
        ensure_pretrained: bool = True,
    ) -> None:
        if (model is None) != (tokenizer is None):
            raise ValueError("pass model and tokenizer together")
        if model is None:
            model, tokenizer, _ = load_vilt(weights, ensure_pretrained)
        self._model, self.tokenizer = model, tokenizer
        cfg = model.config
        self.answers = list(answers or [cfg.id2label[i] for i in range(cfg.num_labels)])
        self.answer_id = {a: i for i, a in enumerate(self.answers)}
        self.image_size = int(cfg.image_size)
        self.max_text_len = int(cfg.max_position_embeddings)

    def build_base(self, seed: int = 0) -> nn.Module:
        """A frozen copy of the pretrained model (``seed`` is unused: nothing is freshly initialised)."""
        m = copy.deepcopy(self._model).eval()
        for p in m.parameters():
            p.requires_grad_(False)
        return m

    def lora_targets(self, model: nn.Module) -> list[str]:
        """Every ``nn.Linear`` of the transformer layers (query, key, value, output and MLP dense).

        Found through the encoder module, not by leaf name, so renamed projections are still caught;
        the pooler and the answer head are left out.
        """
        bare = model.get_base_model() if hasattr(model, "get_base_model") else model
        enc = bare.vilt.encoder
        prefix = next(n for n, m in bare.named_modules() if m is enc)
        return linear_targets(enc, prefix)

    def encode_answers(self, answers: Sequence[str]) -> torch.Tensor:
        """Answer strings → ids.

        Raises:
            ValueError: naming answers outside the vocabulary (the head cannot learn new ones).
        """
        unknown = sorted({a for a in answers if a not in self.answer_id})
        if unknown:
            raise ValueError(f"answers not in the {len(self.answers)}-answer vocabulary: {unknown[:5]}")
        return torch.tensor([self.answer_id[a] for a in answers], dtype=torch.int64)

    def make_batch(self, samples: VqaSamples) -> Batch:
        """Images + questions → ViLT inputs; answer ids < 0 mean unknown (inference requests)."""
        enc = self.tokenizer(
            list(samples.questions),
            padding="longest",
            truncation=True,
            max_length=self.max_text_len,
            return_tensors="pt",
        )
        x = pixels(samples.images, self.image_size)
        inputs = {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "token_type_ids": enc["token_type_ids"],
            "pixel_values": x,
            "pixel_mask": torch.ones(x.shape[0], *x.shape[-2:], dtype=torch.int64),
        }
        ids = samples.answers.tolist()
        targets = [self.answers[i] if i >= 0 else "" for i in ids]
        return Batch(inputs, samples.answers.clone(), targets)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Cross-entropy over the answer vocabulary (one exact answer per question)."""
        return F.cross_entropy(model(**batch.inputs).logits, batch.labels)

    @torch.no_grad()
    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Answer logits (N, n_answers)."""
        return model(**batch.inputs).logits

    def respond(self, outputs: torch.Tensor, top_k: int = 1) -> list[dict]:
        """Logits → ``{"answer", "score", "top_k": [{"answer", "score"}, …]}`` with softmax scores."""
        p = outputs.float().softmax(-1)
        vals, idx = p.topk(min(max(1, top_k), p.shape[-1]), dim=-1)
        out = []
        for v, i in zip(vals.tolist(), idx.tolist()):
            ranked = [{"answer": self.answers[k], "score": round(s, 6)} for s, k in zip(v, i)]
            out.append({"answer": ranked[0]["answer"], "score": ranked[0]["score"], "top_k": ranked})
        return out

    def score(self, preds: Sequence[str], targets: Sequence[str]) -> float:
        """Exact-match accuracy (answers come from one closed vocabulary)."""
        return sum(p == t for p, t in zip(preds, targets)) / max(1, len(targets))
