"""The task seam's types and helpers (:class:`Task`, :class:`Batch`, the registry, LoRA attach, evaluation);
the package ``training.tasks`` re-exports them and registers the built-in tasks, which import them from here."""


from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..registry import Registry
from ..settings import LoraSettings

if TYPE_CHECKING:  # peft is imported where LoRA is attached: serving replicas never need it
    from peft import LoraConfig, PeftModel


@dataclass
class Batch:
    """One model-ready batch.

    ``inputs`` are keyword arguments of the model's forward; ``labels`` are what the loss compares with
    (answer ids, or token ids with the prompt masked by -100); ``targets`` are the reference answers as
    strings, for :meth:`Task.score`.
    """

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor | None = None
    targets: list[str] = field(default_factory=list)
    # Generative tasks: the prompt-only inputs that ``generate`` continues (left-padded).
    prompt_inputs: dict[str, torch.Tensor] | None = None

    def to(self, device: torch.device | str) -> Batch:
        """The batch with every tensor on ``device``."""

        def mv(d: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
            return None if d is None else {k: v.to(device) for k, v in d.items()}

        labels = None if self.labels is None else self.labels.to(device)
        return Batch(mv(self.inputs) or {}, labels, list(self.targets), mv(self.prompt_inputs))


@runtime_checkable
class Task(Protocol):
    """What one kind of model needs from the shared loop, store and server.

    ``Samples`` is the task's stored-example type (e.g. :class:`training.data.scenes.VqaSamples`: images,
    questions, answer ids; for classification: images and int labels); it must support ``len()``.
    """

    name: str  # registry name
    answers: list[str]  # the fixed answer vocabulary (classes); [] for open-ended generation
    modules_to_save: tuple[str, ...]  # non-LoRA modules trained and saved with the adapter; () for VQA

    def build_base(self, seed: int = 0) -> nn.Module:
        """The pretrained base model in eval mode, every parameter frozen (identical for equal seeds)."""
        ...

    def lora_targets(self, model: nn.Module) -> list[str]:
        """Full names of the ``nn.Linear`` modules LoRA adapts, derived from ``model`` (never hard-coded)."""
        ...

    def samples(self, images: torch.Tensor, questions: Sequence[str] | None = None) -> Any:
        """A request's inputs as the task's samples (uint8 images (N, 3, H, W), one question each for a
        question task), with unknown labels: what a serving replica batches."""
        ...

    def make_batch(self, samples: Any) -> Batch:
        """Stored samples → a model-ready :class:`Batch` on the CPU."""
        ...

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Scalar training loss of ``model`` (bare or peft-wrapped) on ``batch``."""
        ...

    def forward(self, model: nn.Module, batch: Batch) -> Any:
        """Raw inference outputs (logits, or generated token ids) for :meth:`respond`; no grad."""
        ...

    def respond(self, outputs: Any, top_k: int = 1) -> list[dict]:
        """Outputs → one JSON-able response body per example: ``{"answer": str, "score": float | None,
        "top_k": [{"answer": str, "score": float}, …]}``."""
        ...

    def score(self, preds: Sequence[str], targets: Sequence[str]) -> float:
        """Accuracy of predicted against reference answers (the task's own matching rule)."""
        ...

    # Optional: ``prepare(domain) -> domain``, what the task computes once per domain before training on
    # it (e.g. frozen-trunk features, so each step skips the trunk). Callers go through :func:`prepare`.


def prepare(task: Task | None, domain: Any) -> Any:
    """``task.prepare(domain)`` where the task has one (a domain, a benchmark's domain, or samples), else
    ``domain`` itself: the one hook through which the loop, the benchmark and the server cache per-domain
    work. Idempotent for a prepared domain."""
    fn = getattr(task, "prepare", None)
    return domain if fn is None else fn(domain)


TaskFactory = Callable[..., Task]

TASKS: Registry[TaskFactory] = Registry("task")
register_task = TASKS.register  # decorator: ``@register_task("name")``


def get_task(name: str, **kwargs: Any) -> Task:
    """Build the task called ``name``.

    Raises:
        KeyError: for an unknown name, listing the registered ones.
    """
    return TASKS.get(name)(**kwargs)


def _targets(names: list[str], leaves: tuple[str, ...] | None) -> list[str]:
    """``names`` whose leaf is one of ``leaves`` (all of them for None).

    Raises:
        ValueError: nothing left.
    """
    kept = [n for n in names if leaves is None or n.split(".")[-1] in leaves]
    if not kept:
        ends = sorted({n.split(".")[-1] for n in names})
        raise ValueError(f"no LoRA target named {leaves}; the task's targets end in {ends}")
    return kept


def lora_config(task: Task, model: nn.Module, settings: LoraSettings) -> LoraConfig:
    """peft config: the task's derived targets and ``modules_to_save``, rank/alpha/dropout from ``settings``."""
    from peft import LoraConfig

    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=_targets(task.lora_targets(model), settings.targets),
        modules_to_save=list(task.modules_to_save) or None,
    )


def attach_lora(task: Task, model: nn.Module, settings: LoraSettings, seed: int = 0) -> PeftModel:
    """Wrap ``model`` (in place) with the task's LoRA; A factors seeded so every run starts alike.

    Raises:
        ValueError: ``modules_to_save`` would make peft wrap other modules too (:func:`training.lora.wrap`).
    """
    from ..lora import wrap

    return wrap(model, lora_config(task, model, settings), seed)


def predict(task: Task, model: nn.Module, batch: Batch) -> list[str]:
    """Top-1 answers of ``model`` on ``batch``."""
    return [r["answer"] for r in task.respond(task.forward(model, batch), top_k=1)]


@torch.inference_mode()
def evaluate(
    task: Task, model: nn.Module, samples: Any, batch_size: int = 256, device: torch.device | str | None = None
) -> float:
    """``task.score`` of ``model`` over all ``samples`` (a type with ``len`` and ``subset(slice)``)."""
    model.eval()
    preds: list[str] = []
    targets: list[str] = []
    for i in range(0, len(samples), batch_size):
        b = task.make_batch(samples.subset(slice(i, i + batch_size)))
        b = b if device is None else b.to(device)
        preds += predict(task, model, b)
        targets += b.targets
    return task.score(preds, targets)


def linear_targets(module: nn.Module, prefix: str = "") -> list[str]:
    """Full names (``prefix`` + local name) of every ``nn.Linear`` inside ``module``."""
    p = f"{prefix}." if prefix else ""
    return [p + n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
