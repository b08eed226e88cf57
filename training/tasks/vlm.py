"""The ``vlm`` task: generative VQA with a hub image-text-to-text model (PaliGemma, LLaVA, …).

For users with a hub or a local model directory: ``get_task("vlm", model_id="google/paligemma-3b-pt-224",
local_files_only=False)`` loads ``AutoModelForImageTextToText`` + ``AutoProcessor``. LoRA adapts every
``nn.Linear`` of the language model's decoder (attention and MLP projections, found through
``get_decoder()``, never by name); the vision tower, projector and ``lm_head`` stay frozen. The loss covers
the answer tokens only (prompt positions are -100), prediction is greedy ``generate`` + decode, and the
score is VQA-normalised exact match (:func:`normalize_answer`).

Samples are :class:`training.data.scenes.VqaSamples`; answer ids are turned into text with the task's
``answers`` list (default: the ``scenes_vqa`` vocabulary).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.scenes import ANSWERS, VqaSamples
from .base import Batch, linear_targets, register_task

#: config.model_type -> prompt template; ``{image}`` is the processor's image token, ``{question}`` the text.
PROMPTS: dict[str, str] = {
    "paligemma": "{image}answer en {question}",  # the processor expands {image}, adds <bos> and the "\n"
    "llava": "USER: {image}\n{question} ASSISTANT:",
}
DEFAULT_PROMPT = "{image}{question}"

_ARTICLES = {"a", "an", "the"}
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_PUNCT = re.compile(r"[^\w\s]")


def _input_size(image_processor: Any, default: int = 224) -> int:
    """The square side an image processor feeds the model (its crop, else its size), for decoding uploads."""
    for attr in ("crop_size", "size"):
        size = getattr(image_processor, attr, None)
        if isinstance(size, int):
            return size
        # a dict, or transformers' SizeDict (attributes, and .get on recent versions)
        side = getattr(size, "height", None) or getattr(size, "shortest_edge", None) if size is not None else None
        if side is None and isinstance(size, dict):
            side = size.get("height") or size.get("shortest_edge")
        if side:
            return int(side)
    return default


def normalize_answer(text: str) -> str:
    """VQA-style answer normalisation: lowercase, punctuation → space, articles dropped, number words → digits.

    A simplified form of the official VQA evaluation's rules (no contraction table).
    """
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


class VlmTask:
    """Generative VQA with an image-text-to-text model; see :class:`training.tasks.Task`.

    Args:
        build: ``seed -> model`` returning a fresh base model (hub load, or a config-built one in tests).
        processor: The model's processor (image processor + tokenizer), already built.
        answers: Answer vocabulary that turns sample answer ids into text.
        model_type: The model's ``config.model_type``; picks the default prompt from :data:`PROMPTS`.
        prompt: Prompt template overriding that default.
        max_new_tokens: Generation budget per answer.
    """

    name = "vlm"
    modules_to_save: tuple[str, ...] = ()

    def __init__(
        self,
        build: Callable[[int], nn.Module],
        processor: Any,
        answers: Sequence[str] = ANSWERS,
        model_type: str | None = None,
        prompt: str | None = None,
        max_new_tokens: int = 8,
    ) -> None:
        self._build, self.processor = build, processor
        self.tokenizer = processor.tokenizer
        self.answers = list(answers)
        self.prompt = prompt or PROMPTS.get(model_type or "", DEFAULT_PROMPT)
        self.max_new_tokens = max_new_tokens
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.image_token = getattr(processor, "image_token", None) or "<image>"
        self.image_inputs = set(processor.image_processor.model_input_names)
        self.image_size = _input_size(processor.image_processor)  # what a server decodes requests to

    @classmethod
    def from_pretrained(cls, model_id: str, local_files_only: bool = True, **kwargs: Any) -> VlmTask:
        """A task over a hub (or local) checkpoint, loaded with the Auto classes."""
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(model_id, local_files_only=local_files_only)
        kwargs.setdefault(
            "model_type", AutoConfig.from_pretrained(model_id, local_files_only=local_files_only).model_type
        )

        def build(seed: int) -> nn.Module:
            return AutoModelForImageTextToText.from_pretrained(model_id, local_files_only=local_files_only)

        return cls(build, processor, **kwargs)

    def build_base(self, seed: int = 0) -> nn.Module:
        """A fresh frozen base model in eval mode."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            m = self._build(seed).eval()
        for p in m.parameters():
            p.requires_grad_(False)
        return m

    def lora_targets(self, model: nn.Module) -> list[str]:
        """Every ``nn.Linear`` of the language model's decoder (q/k/v/o and MLP projections)."""
        bare = model.get_base_model() if hasattr(model, "get_base_model") else model
        dec = bare.get_decoder()
        prefix = next(n for n, m in bare.named_modules() if m is dec)
        head = bare.get_output_embeddings()
        names = [n for n in linear_targets(dec, prefix) if bare.get_submodule(n) is not head]
        if not names:
            raise ValueError(f"no nn.Linear in the decoder of {type(bare).__name__}")
        return names

    def _prompt(self, question: str) -> str:
        return self.prompt.format(image=self.image_token, question=question)

    def samples(self, images: torch.Tensor, questions: Sequence[str] | None = None) -> VqaSamples:
        """Inference samples: uint8 images (N, 3, H, W), one question each, answers unknown."""
        return VqaSamples.unanswered(images, questions)

    def make_batch(self, samples: VqaSamples) -> Batch:
        """Prompt + answer + EOS per example, right-padded; labels -100 except on answer tokens.

        ``prompt_inputs`` holds the prompts alone, left-padded, for ``generate``. Answer ids < 0 (inference
        requests) give empty answers.
        """
        rows, targets, extras = [], [], []
        for img, q, a in zip(samples.images, samples.questions, samples.answers.tolist()):
            enc = self.processor(images=[img], text=[self._prompt(q)], return_tensors="pt")
            p_ids = enc["input_ids"][0]
            answer = self.answers[a] if a >= 0 else ""
            a_ids = torch.tensor(
                self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            )
            tt = enc.get("token_type_ids")
            rows.append((p_ids, a_ids, None if tt is None else tt[0]))
            targets.append(answer)
            extras.append({k: v for k, v in enc.items() if k in self.image_inputs})  # pixel_values, image_sizes…
        inputs, labels = self._pad_train(rows)
        prompt_inputs = self._pad_prompts(rows)
        for k in extras[0]:
            v = torch.cat([e[k] for e in extras])
            inputs[k], prompt_inputs[k] = v, v
        return Batch(inputs, labels, targets, prompt_inputs)

    def _pad_train(self, rows: list) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        n, length = len(rows), max(len(p) + len(a) for p, a, _ in rows)
        ids = torch.full((n, length), self.pad_id, dtype=torch.int64)
        mask = torch.zeros(n, length, dtype=torch.int64)
        labels = torch.full((n, length), -100, dtype=torch.int64)
        types = torch.zeros(n, length, dtype=torch.int64)
        for i, (p, a, _) in enumerate(rows):
            lp, la = len(p), len(a)
            ids[i, : lp + la] = torch.cat([p, a])
            mask[i, : lp + la] = 1
            labels[i, lp : lp + la] = a  # the loss sees the answer and EOS only
            types[i, lp : lp + la] = 1  # PaliGemma: prefix (0) attends bidirectionally, suffix (1) causally
        out = {"input_ids": ids, "attention_mask": mask}
        if rows[0][2] is not None:
            out["token_type_ids"] = types
        return out, labels

    def _pad_prompts(self, rows: list) -> dict[str, torch.Tensor]:
        n, length = len(rows), max(len(p) for p, _, _ in rows)
        ids = torch.full((n, length), self.pad_id, dtype=torch.int64)
        mask = torch.zeros(n, length, dtype=torch.int64)
        for i, (p, _, _) in enumerate(rows):
            ids[i, length - len(p) :] = p  # left padding: generation continues every row at the same column
            mask[i, length - len(p) :] = 1
        out = {"input_ids": ids, "attention_mask": mask}
        if rows[0][2] is not None:
            out["token_type_ids"] = torch.zeros_like(ids)
        return out

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Next-token cross-entropy on the answer tokens (prompt and padding are -100)."""
        logits = model(**batch.inputs).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch.labels[:, 1:].flatten(), ignore_index=-100)

    @torch.no_grad()
    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Greedy generation; returns only the new tokens (N, ≤ max_new_tokens)."""
        assert batch.prompt_inputs is not None, "make_batch builds prompt_inputs"
        out = model.generate(
            **batch.prompt_inputs, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=self.pad_id
        )
        return out[:, batch.prompt_inputs["input_ids"].shape[1] :]

    def respond(self, outputs: torch.Tensor, top_k: int = 1) -> list[dict]:
        """Generated ids → ``{"answer": text, "score": None, "top_k": [...]}`` (greedy: one answer)."""
        texts = self.tokenizer.batch_decode(outputs, skip_special_tokens=True)
        return [{"answer": t.strip(), "score": None, "top_k": [{"answer": t.strip(), "score": None}]} for t in texts]

    def score(self, preds: Sequence[str], targets: Sequence[str]) -> float:
        """Normalised exact match (:func:`normalize_answer`)."""
        hits = sum(normalize_answer(p) == normalize_answer(t) for p, t in zip(preds, targets))
        return hits / max(1, len(targets))


@register_task("vlm")
def vlm_task(model_id: str | None = None, local_files_only: bool = True, **kwargs: Any) -> VlmTask:
    """Registry factory: ``model_id`` → :meth:`VlmTask.from_pretrained`; or pass ``build`` + ``processor``."""
    if model_id is not None:
        return VlmTask.from_pretrained(model_id, local_files_only=local_files_only, **kwargs)
    return VlmTask(**kwargs)
