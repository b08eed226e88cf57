"""The ``vqa`` task: closed-vocabulary visual question answering with an offline model.

Two models, picked by name from :data:`VQA_MODELS` (``get_task("vqa", model_name=...)``):

* ``film_scenes`` (the default): FiLM on frozen ImageNet EfficientNet-Lite0 features
  (:mod:`.film`, :mod:`.film_scenes`); LoRA on every Linear / conv outside the trunk, trunk features
  cached per domain (:meth:`FilmVqaTask.prepare`);
* ``vilt_scenes``: the tiny ViLT trained from scratch (:mod:`.vilt`); LoRA on the encoder's linears.

Samples are :class:`training.data.scenes.VqaSamples` (uint8 images, questions, answer ids). The answer is a
classification over the fixed answer vocabulary, scored by exact match. No module is in
``modules_to_save``: every domain's adapter is pure LoRA and merges cleanly.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertTokenizerFast

from .. import ranking
from ..data.scenes import VqaDomain, VqaSamples
from .base import Batch, Task, linear_targets, register_task
from .vilt import load_vilt

MEAN, STD = 0.5, 0.5  # pixel normalisation of both offline models (the TF EfficientNet-Lite's [-1, 1] too)


def pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) → normalised float (N, 3, size, size)."""
    x = images.float().div_(255)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x - MEAN) / STD


class VqaTask:
    """Offline VQA over a fixed answer vocabulary; see :class:`training.tasks.Task`. This class is the ViLT
    (``vilt_scenes``); :class:`FilmVqaTask` overrides the model-specific parts (loading, LoRA targets, inputs).

    Args:
        weights: The model's pretrained weights; default the cached, else shipped, ones (pretrained on first
            use when neither exists).
        model: Use this model instead of loading one (tests, pretraining); it is never modified.
        tokenizer: Its tokenizer (required with ``model``).
        answers: Its answer vocabulary (default: the model config's ``id2label``).
        ensure_pretrained: Pretrain the default weights when missing instead of failing.
    """

    name = "vqa"
    model_name = "vilt_scenes"  # the registry name of the model (VQA_MODELS; the adapters' ``backbone``)
    modules_to_save: tuple[str, ...] = ()  # nothing trained in full: an adapter is LoRA factors only
    load: Callable[..., tuple[nn.Module, BertTokenizerFast, dict]] = staticmethod(load_vilt)  # (weights, ensure)

    def __init__(
        self,
        weights: str | None = None,
        model: nn.Module | None = None,
        tokenizer: BertTokenizerFast | None = None,
        answers: list[str] | None = None,
        ensure_pretrained: bool = True,
    ) -> None:
        if (model is None) != (tokenizer is None):
            raise ValueError("pass model and tokenizer together")
        if model is None:
            model, tokenizer, _ = self.load(weights, ensure_pretrained)
        self._model, self.tokenizer = model, tokenizer
        cfg = model.config
        self.answers = list(answers or [cfg.id2label[i] for i in range(cfg.num_labels)])
        self.answer_id = {a: i for i, a in enumerate(self.answers)}
        self._configure(cfg)

    def _configure(self, cfg: Any) -> None:
        """Read the input sizes from the model's config."""
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

    def samples(self, images: torch.Tensor, questions: Sequence[str] | None = None) -> VqaSamples:
        """Inference samples: uint8 images (N, 3, H, W), one question each, answers unknown."""
        return VqaSamples.unanswered(images, questions)

    def make_batch(self, samples: VqaSamples) -> Batch:
        """Images + questions → model inputs; answer ids < 0 mean unknown (inference requests)."""
        enc = self.tokenizer(
            list(samples.questions),
            padding="longest",
            truncation=True,
            max_length=self.max_text_len,
            return_tensors="pt",
        )
        ids = samples.answers.tolist()
        targets = [self.answers[i] if i >= 0 else "" for i in ids]
        return Batch(self._inputs(enc, samples), samples.answers.clone(), targets)

    def _inputs(self, enc: Any, samples: VqaSamples) -> dict[str, torch.Tensor]:
        """ViLT's forward arguments: tokens with their types, pixels and an all-ones pixel mask."""
        x = pixels(samples.images, self.image_size)
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "token_type_ids": enc["token_type_ids"],
            "pixel_values": x,
            "pixel_mask": torch.ones(x.shape[0], *x.shape[-2:], dtype=torch.int64),
        }

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Cross-entropy over the answer vocabulary (one exact answer per question)."""
        return F.cross_entropy(model(**batch.inputs).logits, batch.labels)

    @torch.no_grad()
    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Answer logits (N, n_answers)."""
        return model(**batch.inputs).logits

    def respond(self, outputs: torch.Tensor, top_k: int = 1) -> list[dict]:
        """Logits → ``{"answer", "score", "top_k": [{"answer", "score"}, …]}`` with softmax scores."""
        return ranking.responses(outputs.float().softmax(-1).numpy(), self.answers, top_k)

    def score(self, preds: Sequence[str], targets: Sequence[str]) -> float:
        """Exact-match accuracy (answers come from one closed vocabulary)."""
        return ranking.exact_match(preds, targets)


class FilmVqaTask(VqaTask):
    """``film_scenes``: FiLM on frozen EfficientNet-Lite0 features (:class:`~.film.FilmVqaModel`).

    LoRA adapts every ``nn.Linear`` / ``nn.Conv2d`` outside the trunk (question encoder, CoordConv stem,
    FiLM generator, block convs, classifier, answer layer). The trunk is never adapted, so its output for
    an image is the same under every adapter: :meth:`prepare` computes it once per domain and every
    batch of that domain then skips the trunk (the features travel in ``VqaSamples.features``).
    """

    model_name = "film_scenes"
    feature_batch = 256  # images per trunk forward when caching features

    @staticmethod
    def load(weights: str | None = None, ensure_pretrained: bool = True) -> tuple[nn.Module, BertTokenizerFast, dict]:
        from .film_scenes import load_film

        return load_film(weights, ensure_pretrained)

    def _configure(self, cfg: Any) -> None:
        self.image_size = int(cfg.image_size)
        self.max_text_len = int(cfg.max_question_len)

    def lora_targets(self, model: nn.Module) -> list[str]:
        """Every Linear / Conv2d outside the frozen trunk (the model lists them: ``head_modules``)."""
        bare = model.get_base_model() if hasattr(model, "get_base_model") else model
        return bare.head_modules()

    def _inputs(self, enc: Any, samples: VqaSamples) -> dict[str, torch.Tensor]:
        """Tokens + cached trunk features when the samples carry them, else pixels (the trunk runs)."""
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if samples.features is not None:
            return {**inputs, "image_features": samples.features}
        return {**inputs, "pixel_values": pixels(samples.images, self.image_size)}

    @torch.no_grad()  # not inference_mode: training batches feed these tensors to layers autograd records
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, 3, H, W) → the frozen trunk's features (N, C, h, w), in batches."""
        trunk = self._model
        out = [trunk.image_features(pixels(images[i : i + self.feature_batch], self.image_size))
               for i in range(0, len(images), self.feature_batch)]
        return torch.cat(out) if out else torch.empty(0)

    def prepare(self, domain: Any) -> Any:
        """``domain`` with its images' trunk features cached (``VqaSamples`` or ``VqaDomain``; other types
        and already-prepared data are returned as they are)."""
        if isinstance(domain, VqaSamples):
            return domain if domain.features is not None else dataclasses.replace(
                domain, features=self.features(domain.images))
        if isinstance(domain, VqaDomain) and domain.f_train is None:
            return dataclasses.replace(domain, f_train=self.features(domain.x_train),
                                       f_test=self.features(domain.x_test))
        return domain


#: model name → task class; ``get_task("vqa", model_name=...)`` picks one (default: :data:`DEFAULT_MODEL`).
VQA_MODELS: dict[str, type[VqaTask]] = {"film_scenes": FilmVqaTask, "vilt_scenes": VqaTask}
DEFAULT_MODEL = "film_scenes"


@register_task("vqa")
def vqa_task(model_name: str = DEFAULT_MODEL, **kwargs: Any) -> Task:
    """The ``vqa`` task on model ``model_name`` (keyword arguments: :class:`VqaTask`'s).

    Raises:
        KeyError: an unknown model name, listing the known ones.
    """
    if model_name not in VQA_MODELS:
        raise KeyError(f"unknown vqa model {model_name!r}; known: {sorted(VQA_MODELS)}")
    return VQA_MODELS[model_name](**kwargs)
