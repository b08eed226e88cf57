"""What every LoRA strategy shares: the context, the training settings and one LoRA learner."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import BackboneSpec, preprocess
from ..data import Domain
from ..lora import LoraSettings, attach_lora, get_adapter
from ..settings import TrainSettings


@dataclass
class LearnerContext:
    """Everything a strategy needs that is not its own state."""

    spec: BackboneSpec | None  # the image backbone's preprocessing; None when ``task`` is set
    base: nn.Module  # bare pretrained model (backbone with its seeded head, or the task's model); never trained
    lora: LoraSettings
    train: TrainSettings
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # (domain name, seed) -> adapter trained from the initial adapter on that domain alone: shared by
    # `independent` and `adaptive` (identical computations), across task orders, within one process.
    independent_cache: dict[tuple[str, int], dict[str, torch.Tensor]] = field(default_factory=dict)
    # (domain name, seed) -> accuracy of the initial model: the FWT reference, the same for every method.
    zero_shot_cache: dict[tuple[str, int], float] = field(default_factory=dict)
    # A ``training.tasks.Task`` (e.g. ``vqa``): batches, loss, LoRA targets and scoring come from it, and
    # domain batches are the task's samples. None: image classification on ``spec`` (uint8 images, int labels).
    task: Any = None


@torch.inference_mode()
def accuracy(
    model: nn.Module, spec: BackboneSpec | None, domain: Domain, device: torch.device, batch: int, task: Any = None
) -> float:
    """Top-1 accuracy of ``model`` on the held-out split of ``domain`` (the task's score when ``task`` is set)."""
    if task is not None:
        from ..tasks import evaluate

        return evaluate(task, model, domain.test, batch_size=batch, device=device)
    model.eval()
    correct = 0
    for i in range(0, len(domain.y_test), batch):
        x = preprocess(spec, domain.x_test[i : i + batch].to(device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = model(x).argmax(1)
        correct += int((pred.cpu() == domain.y_test[i : i + batch]).sum())
    return correct / max(1, len(domain.y_test))


class LoraLearner:
    """One peft LoRA model with its optimizer: the training half every strategy uses."""

    def __init__(self, ctx: LearnerContext) -> None:
        self.ctx = ctx
        if ctx.task is not None:
            from ..tasks import attach_lora as attach_task_lora

            self.model = attach_task_lora(ctx.task, copy.deepcopy(ctx.base), ctx.lora, ctx.seed).to(ctx.device)
        else:
            self.model = attach_lora(copy.deepcopy(ctx.base), ctx.lora, ctx.seed).to(ctx.device)
        self.init_adapter = get_adapter(self.model)
        self.opt: torch.optim.Optimizer | None = None
        self.step = 0  # steps in the current domain

    def reset_optimizer(self) -> None:
        """Fresh AdamW state (each domain starts with no momentum from the last)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=self.ctx.train.lr, weight_decay=self.ctx.train.weight_decay)
        self.step = 0

    def train_step(self, x: Any, y: torch.Tensor) -> torch.Tensor:
        """One AdamW step on a batch from :meth:`Domain.batch` (uint8 images, or the task's samples);
        returns the detached loss without syncing the device."""
        if self.opt is None:
            self.reset_optimizer()
        dev, task = self.ctx.device, self.ctx.task
        self.model.train()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            if task is not None:
                loss = task.loss(self.model, task.make_batch(x).to(dev))
            else:
                loss = F.cross_entropy(self.model(preprocess(self.ctx.spec, x.to(dev))), y.to(dev))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step += 1
        return loss.detach()

    def evaluate(self, domain: Domain) -> float:
        """Accuracy of the model as it is now."""
        return accuracy(self.model, self.ctx.spec, domain, self.ctx.device, self.ctx.train.eval_batch, self.ctx.task)
