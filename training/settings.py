"""Settings shared by training and serving, kept free of torch so the control plane can import them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

#: file name endings read as images (class folders, uploads)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class TrainSettings(BaseModel):
    """Per-domain training recipe (defaults: the offline ``digits5`` setting, see docs/results.md)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not a silently kept default

    steps: int = Field(80, ge=0, description="optimizer steps per domain")
    batch_size: int = Field(64, ge=1, description="images per step, sampled with replacement")
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate for LoRA factors and head")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (0: decay would pull LoRA to 0)")
    eval_batch: int = Field(512, ge=1, description="images per forward pass when evaluating")


class LoraSettings(BaseModel):
    """LoRA hyper-parameters (defaults: small-backbone setting; PAM uses rank 32 on ViT-B/16)."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(8, ge=1, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, description="lora_alpha; scaling s = alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    targets: tuple[str, ...] | None = Field(
        None,
        description="leaf names of target nn.Linear / 1×1 nn.Conv2d modules; None: the backbone's lora_targets "
        "(without a spec: every such module outside the classifier)",
    )

    @property
    def scaling(self) -> float:
        """s = alpha / r."""
        return self.alpha / self.rank
