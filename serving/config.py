"""Server configuration: one pydantic model, every default commented, overridable by CLI or Serve config."""

from __future__ import annotations

import os

from pydantic import BaseModel, Field

from training.lora import LoraSettings
from training.strategies import TrainSettings


def _default_data_dir() -> str:
    return os.environ.get("MERGESERVE_DATA", os.path.join(os.path.expanduser("~"), ".local", "share", "mergeserve"))


class ServerConfig(BaseModel):
    """Everything ``mergeserve serve`` and ``deploy/serve.yaml`` can set."""

    data_dir: str = Field(default_factory=_default_data_dir)  # SQLite + adapters + uploaded domains
    backbone: str = "vit_tiny_offline"  # registered backbone; the offline default is built on first use
    class_names: list[str] = Field(default_factory=lambda: [str(i) for i in range(10)])  # served labels
    bootstrap: list[str] = Field(default_factory=lambda: ["mnist"])  # digits5 domains learned on first start
    default_method: str = "pam"  # online method when a request names none
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    buffer_spc: int = 5  # replay samples kept per class per domain (class-balanced, first-k)
    heldout_fraction: float = Field(0.2, gt=0, lt=1)  # default held-out share of an uploaded domain
    num_replicas: int | str = 1  # model replicas, or "auto" to use `autoscaling`
    autoscaling: dict = Field(
        default_factory=lambda: {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
    )
    max_batch_size: int = 32  # @serve.batch dynamic batching
    batch_wait_timeout_s: float = 0.005  # how long a batch waits to fill
    trainer_num_gpus: float = 0.0  # GPUs for the training and merge actors (0 on CPU)
    replica_num_gpus: float = 0.0  # GPUs per model replica
    auth_token: str | None = Field(default_factory=lambda: os.environ.get("MERGESERVE_TOKEN"))  # bearer token
    max_upload_bytes: int = 64 * 2**20  # request body limit for uploads
    max_domains: int = 100  # caps metric label cardinality and stored domains
    swap_timeout_s: float = 60.0  # how long a job waits for every replica to acknowledge a new version
    seed: int = 0

    def path(self, *parts: str) -> str:
        """A path under the data directory."""
        return os.path.join(self.data_dir, *parts)
