"""The model deployment: the backbone with the active global adapter folded in, batched inference.

Hot swap without downtime: a background thread long-polls the controller; on a new version it loads
the adapter (checksum verified), builds a complete standby model with ΔW folded into the weights, and
publishes it with one reference assignment. A batch takes a local reference to ``(version, model)``
when it starts, so in-flight requests finish on the old weights and new ones get the new; nothing is
freed while a request may hold it (Python's reference counting frees the old model after the last
batch that holds it). No ``reconfigure()``, no replica restart, no not-ready window.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid

import ray
import torch
from ray import serve

from training.backbones import create_backbone, get_spec, preprocess
from training.lora import materialise, to_delta
from training.store import AdapterStore

from .config import ServerConfig
from .controller import NAME, NAMESPACE

log = logging.getLogger("ray.serve")


@serve.deployment(name="Model", health_check_period_s=5)
class ModelReplica:
    """One replica; ``num_replicas`` / autoscaling come from the Serve config."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = ServerConfig.model_validate(cfg)
        self.spec = get_spec(self.cfg.backbone)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.base = create_backbone(self.cfg.backbone, len(self.cfg.class_names), seed=self.cfg.seed).eval()
        self.store = AdapterStore(self.cfg.path("adapters"))
        self.controller = ray.get_actor(NAME, namespace=NAMESPACE)
        self.replica_id = uuid.uuid4().hex[:8]
        info = ray.get(self.controller.wait_version.remote(self.replica_id, -1, 0.0))
        self.current = (info["version"], self._build(info["name"]))
        ray.get(self.controller.ack.remote(self.replica_id, info["version"]))
        self.swaps: list[float] = []
        threading.Thread(target=self._poll, daemon=True, name="adapter-poller").start()

    def _build(self, name: str) -> torch.nn.Module:
        tensors, man = self.store.load(name, backbone=self.cfg.backbone)
        return materialise(self.base, to_delta(tensors, man.lora)).to(self.device)

    def _poll(self) -> None:
        while True:
            version = self.current[0]
            try:
                info = ray.get(self.controller.wait_version.remote(self.replica_id, version, 10.0))
                if info["version"] != version:
                    t0 = time.perf_counter()
                    standby = self._build(info["name"])  # fully built before anyone can see it
                    self.current = (info["version"], standby)  # the swap: one reference assignment
                    self.swaps.append(time.perf_counter() - t0)
                    log.info("replica %s swapped to adapter v%s", self.replica_id, info["version"])
                self.controller.ack.remote(self.replica_id, self.current[0])
            except Exception:  # noqa: BLE001 - controller restarting or adapter unreadable: keep serving, retry
                log.exception("adapter poll failed; serving v%s and retrying", version)
                time.sleep(1.0)

    @torch.inference_mode()
    def _forward(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return model(preprocess(self.spec, x.to(self.device))).float().softmax(-1).cpu()

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _batched(self, images: list[torch.Tensor]) -> list[tuple[torch.Tensor, int]]:
        version, model = self.current  # one consistent (version, weights) pair for the whole batch
        sizes = [len(x) for x in images]
        probs = await asyncio.to_thread(self._forward, model, torch.cat(images))
        return [(p, version) for p in probs.split(sizes)]

    async def classify(self, images: torch.Tensor) -> tuple[torch.Tensor, int]:
        """uint8 (N, 3, H, W) → class probabilities (N, C) and the adapter version that produced them."""
        return await self._batched(images)

    def ready(self) -> dict:
        """Readiness detail for ``/readyz``."""
        return {"replica": self.replica_id, "adapter_version": self.current[0], "swaps": len(self.swaps)}

    def reconfigure(self, user_config: dict) -> None:
        """Only batching knobs; adapter swaps never go through here (reconfigure is not zero-downtime)."""
        self._batched.set_max_batch_size(int(user_config.get("max_batch_size", 32)))
        self._batched.set_batch_wait_timeout_s(float(user_config.get("batch_wait_timeout_s", 0.005)))
