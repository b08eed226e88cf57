"""What every LoRA strategy shares: the context, the training settings and one LoRA learner."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..data import Domain
from ..lora import LoraSettings, get_adapter
from ..settings import TrainSettings
from ..tasks import Task, attach_lora, evaluate


@dataclass
class LearnerContext:
    """Everything a strategy needs that is not its own state."""

    # what is learned (``training.tasks``: classify, vqa, vlm): batches, loss, LoRA targets and scoring come
    # from it, and a domain's batches are the task's samples
    task: Task
    base: nn.Module  # the task's bare pretrained model (``task.build_base``); never trained
    lora: LoraSettings
    train: TrainSettings
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # (domain name, seed) -> adapter trained from the initial adapter on that domain alone: shared by
    # `independent` and `adaptive` (identical computations), across task orders, within one process.
    independent_cache: dict[tuple[str, int], dict[str, torch.Tensor]] = field(default_factory=dict)
    # (domain name, seed) -> accuracy of the initial model: the FWT reference, the same for every method.
    zero_shot_cache: dict[tuple[str, int], float] = field(default_factory=dict)


def accuracy(task: Task, model: nn.Module, domain: Domain, device: torch.device, batch: int) -> float:
    """``task.score`` of ``model`` on the held-out split of ``domain`` (top-1 accuracy for classify)."""
    return evaluate(task, model, domain.test, batch_size=batch, device=device)


class LoraLearner:
    """One peft LoRA model with its optimizer: the training half every strategy uses."""

    def __init__(self, ctx: LearnerContext) -> None:
        self.ctx = ctx
        self.model = attach_lora(ctx.task, copy.deepcopy(ctx.base), ctx.lora, ctx.seed).to(ctx.device)
        self.init_adapter = get_adapter(self.model)
        self.opt: torch.optim.Optimizer | None = None
        self.step = 0  # steps in the current domain

    def reset_optimizer(self) -> None:
        """Fresh AdamW state (each domain starts with no momentum from the last)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=self.ctx.train.lr, weight_decay=self.ctx.train.weight_decay)
        self.step = 0

    def train_step(self, x: Any, y: torch.Tensor) -> torch.Tensor:
        """One AdamW step on a batch from :meth:`Domain.batch` (the task's samples; ``y`` is carried in
        them); returns the detached loss without syncing the device."""
        if self.opt is None:
            self.reset_optimizer()
        dev, task = self.ctx.device, self.ctx.task
        self.model.train()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = task.loss(self.model, task.make_batch(x).to(dev))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step += 1
        return loss.detach()

    def evaluate(self, domain: Domain) -> float:
        """Accuracy of the model as it is now."""
        return accuracy(self.ctx.task, self.model, domain, self.ctx.device, self.ctx.train.eval_batch)
