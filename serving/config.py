"""Server configuration: one pydantic model, every default commented, overridable by CLI or Serve config."""

from __future__ import annotations

import os

from pydantic import BaseModel, Field

from training.settings import LoraSettings, TrainSettings


def _default_data_dir() -> str:
    return os.environ.get("MERGESERVE_DATA", os.path.join(os.path.expanduser("~"), ".local", "share", "mergeserve"))


class GateSettings(BaseModel):
    """When a freshly merged version may replace the active one (otherwise the job ends ``rejected``)."""

    max_drop: float = Field(0.25, ge=0, le=1)  # largest allowed fall of any seen domain's held-out accuracy
    require_gain: bool = True  # the new domain must beat the active version's zero-shot accuracy on it


class ServerConfig(BaseModel):
    """Everything ``mergeserve serve`` and ``deploy/serve.yaml`` can set."""

    data_dir: str = Field(default_factory=_default_data_dir)  # SQLite + adapters + uploaded domains
    state_path: str | None = None  # SQLite file; None = <data_dir>/state.sqlite. Keep it on the head's local
    # disk on a cluster (WAL needs shared memory; not on NFS), while data_dir is a shared volume
    backbone: str = "vit_tiny_offline"  # registered backbone; the offline default ships its weights
    class_names: list[str] = Field(default_factory=lambda: [str(i) for i in range(10)])  # served labels
    bootstrap: list[str] = Field(default_factory=lambda: ["mnist"])  # digits5 domains learned on first start
    default_method: str = "pam"  # online method when a request names none
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    max_steps: int = Field(2000, ge=1)  # upper bound on a request's hyper "steps" (CPU minutes, not hours)
    gate: GateSettings = Field(default_factory=GateSettings)
    max_attempts: int = Field(3, ge=1)  # a job interrupted by restarts is retried this many times in all
    buffer_spc: int = 5  # replay samples kept per class per domain (class-balanced, first-k)
    heldout_fraction: float = Field(0.2, gt=0, lt=1)  # default held-out share of an uploaded domain
    source_roots: list[str] = Field(default_factory=list)  # file:// sources allowed under; [] = <data_dir>/sources
    num_replicas: int | str = 1  # model replicas, or "auto" to use `autoscaling`
    autoscaling: dict = Field(
        default_factory=lambda: {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
    )
    max_ongoing_requests: int = 64  # per replica; Serve's default (5) starves @serve.batch under concurrency
    max_batch_size: int = 32  # @serve.batch dynamic batching
    batch_wait_timeout_s: float = 0.005  # how long a batch waits to fill
    trainer_num_gpus: float = 0.0  # GPUs for the training/merge worker (0 on CPU)
    replica_num_gpus: float = 0.0  # GPUs per model replica
    auth_token: str | None = Field(default_factory=lambda: os.environ.get("MERGESERVE_TOKEN"))  # bearer token
    max_upload_bytes: int = 64 * 2**20  # request body limit, enforced while the body streams in
    max_images: int = 256  # images per classify request
    max_image_pixels: int = 4096 * 4096  # per decoded image, checked from the header
    max_domains: int = 100  # caps metric label cardinality and stored domains
    prediction_retention: int = 100_000  # predictions kept for delayed feedback (most recent)
    prediction_ttl_s: float = 7 * 24 * 3600.0  # ... and none older than this
    poll_timeout_s: float = 2.0  # replicas' long-poll for a new version; a replica silent longer is not waited for
    swap_timeout_s: float = 60.0  # how long a job waits for every live replica to acknowledge a new version
    seed: int = 0

    def path(self, *parts: str) -> str:
        """A path under the data directory."""
        return os.path.join(self.data_dir, *parts)

    def roots(self) -> list[str]:
        """Directories ``file://`` sources may be read from."""
        return self.source_roots or [self.path("sources")]
