"""Settings shared by training and serving, kept free of torch so the control plane can import them."""

from __future__ import annotations

from pydantic import BaseModel, Field

#: file name endings read as images (class folders, uploads)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class TrainSettings(BaseModel):
    """Per-domain training recipe (defaults: the offline ``digits5`` setting, see docs/results.md)."""

    steps: int = Field(80, ge=0, description="optimizer steps per domain")
    batch_size: int = Field(64, ge=1, description="images per step, sampled with replacement")
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate for LoRA factors and head")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (0: decay would pull LoRA to 0)")
    eval_batch: int = Field(512, ge=1, description="images per forward pass when evaluating")
