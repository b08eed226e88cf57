"""Tasks: what differs between an image classifier and a VQA model, behind one small interface.

A :class:`Task` owns its base model, which modules LoRA adapts (and what else is trained), how stored
samples become a batch, the loss, the score and the response body. Everything else — the training loop,
merging, the store, versions, the hot swap — is shared and only talks to a task through this protocol
(torchtune's recipe/model split, in miniature). Answers are strings everywhere (class names, answer
words, generated text), so scoring and responses need no task-specific types.

======================  ==================================================================================
task                    model
======================  ==================================================================================
``classify``            image classification over the served labels on a registered timm backbone
                        (:mod:`.classify`): LoRA on the backbone's targets, the head trained in full
``vqa``                 offline, answer = classification over a fixed answer vocabulary (:mod:`.vqa`):
                        ``film_scenes`` (default; FiLM on frozen ImageNet EfficientNet-Lite0 features,
                        :mod:`.film`) or ``vilt_scenes`` (ViLT from scratch, 0.65 M params, :mod:`.vilt`)
``vlm``                 any hub image-text-to-text model (PaliGemma, LLaVA, …): answer = generated text
                        (:mod:`.vlm`); needs weights from a hub or local directory
======================  ==================================================================================

Use::

    task = get_task("vqa")
    model = task.build_base(seed=0)                       # frozen base, pretrained
    pm = attach_lora(task, model, LoraSettings(rank=8))  # peft model; targets derived from the model
    batch = task.make_batch(domain.train.subset(idx))
    task.loss(pm, batch).backward()
    acc = evaluate(task, pm, domain.test)
"""

from . import classify, vlm, vqa  # noqa: E402,F401,I001  (register the built-in tasks)
from .base import (
    TASKS,
    Batch,
    Task,
    TaskFactory,
    attach_lora,
    evaluate,
    get_task,
    linear_targets,
    lora_config,
    predict,
    prepare,
    register_task,
)

__all__ = [
    "Batch",
    "Task",
    "TASKS",
    "TaskFactory",
    "attach_lora",
    "evaluate",
    "get_task",
    "linear_targets",
    "lora_config",
    "predict",
    "prepare",
    "register_task",
]
