"""The inference engine inside a model replica: the backbone with the active adapter folded in, hot-swapped.

Hot swap without downtime: a thread long-polls the controller; on a new version it loads the adapter
(checksum verified), builds a complete standby model with ΔW folded into the weights, and publishes it
with one reference assignment. A batch takes ``(version, model)`` once when it starts, so in-flight
requests finish on the old weights and new ones get the new; Python's reference counting frees the old
model after the last batch that holds it. No ``reconfigure()``, no replica restart, no not-ready window.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import numpy as np
import ray
import torch

from training.fold import materialise, to_delta
from training.memory import release_unused_gpu_libraries
from training.store import AdapterStore
from training.tasks import Task, get_task

from .canary import route
from .config import ServerConfig
from .errors import Problem

log = logging.getLogger("ray.serve")


def build_task(cfg: ServerConfig) -> Task:
    """The ``training.tasks`` entry ``cfg.task`` serves (its model loaded once)."""
    name, kwargs = cfg.task_spec()
    return get_task(name, **kwargs)


class Engine:
    """One replica's model and its swap thread, for any task (``cfg.task``'s lineage)."""

    def __init__(self, cfg: ServerConfig, controller: ray.actor.ActorHandle) -> None:
        self.cfg, self.controller, self.task_name = cfg, controller, cfg.task
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.base = self._base().eval()
        self.shapes = {k: tuple(v.shape) for k, v in self.base.named_parameters()}  # adapter download/import
        self.store = AdapterStore(cfg.path("adapters"))
        self.replica_id = uuid.uuid4().hex[:8]
        info = ray.get(controller.wait_version.remote(self.replica_id, -1, 0.0, self.task_name))
        self.current = (info["version"], self._build(info["name"]))
        self.candidate: tuple[int, torch.nn.Module, float] | None = None  # a canary's (version, model, traffic)
        self._follow_canary(info["canary"])
        ray.get(controller.ack.remote(self.replica_id, info["version"], self.task_name, self._canary_version))
        self.swaps: list[float] = []
        threading.Thread(target=self._poll, daemon=True, name="adapter-poller").start()
        if freed := release_unused_gpu_libraries():
            log.info("%s replica: released %.0f MB of CUDA library pages (no GPU here)", self.task_name, freed / 2**20)

    def _base(self) -> torch.nn.Module:
        self.task = build_task(self.cfg)
        self.spec = getattr(self.task, "spec", None)  # an image classifier's backbone spec (input size, head)
        return self.task.build_base(self.cfg.seed)

    def _build(self, name: str) -> torch.nn.Module:
        tensors, man = self.store.load(name, backbone=self.cfg.backbone)
        return materialise(self.base, to_delta(tensors, man.lora)).to(self.device)

    @property
    def _canary_version(self) -> int | None:
        return self.candidate[0] if self.candidate else None

    def _poll(self) -> None:
        while True:
            version = self.current[0]
            try:
                info = ray.get(self.controller.wait_version.remote(self.replica_id, version, None, self.task_name,
                                                                   self._canary_version))
                if info["version"] != version:
                    t0 = time.perf_counter()
                    cand = self.candidate  # a promoted canary's model is already built
                    standby = cand[1] if cand and cand[0] == info["version"] else self._build(info["name"])
                    self.current = (info["version"], standby)  # the swap: one reference assignment
                    self.swaps.append(time.perf_counter() - t0)
                    log.info("%s replica %s swapped to adapter v%s", self.task_name, self.replica_id, info["version"])
                self._follow_canary(info["canary"])
                self.controller.ack.remote(self.replica_id, self.current[0], self.task_name, self._canary_version)
            except Exception:  # noqa: BLE001 - controller restarting or adapter unreadable: keep serving, retry
                log.exception("adapter poll failed; serving v%s and retrying", version)
                time.sleep(1.0)

    def _follow_canary(self, canary: dict | None) -> None:
        """Hold the canary's candidate model beside the active one (at most one), or drop it."""
        if canary is None:
            self.candidate = None
        elif self.candidate and self.candidate[0] == canary["version"]:
            self.candidate = (canary["version"], self.candidate[1], canary["traffic"])
        else:
            model = self.current[1] if canary["version"] == self.current[0] else self._build(canary["name"])
            self.candidate = (canary["version"], model, canary["traffic"])

    def pick(self, key: str, pinned: int | None = None) -> bool:
        """Whether the request keyed ``key`` (its client id, else its request id) is the candidate's.

        Raises:
            Problem: 409 ``version-not-loaded`` for a pinned version this replica does not hold.
        """
        cand = self.candidate
        if pinned is not None:
            if pinned == self.current[0] or (cand and pinned == cand[0]):
                return bool(cand) and pinned == cand[0]
            held = [self.current[0], *([cand[0]] if cand else [])]
            raise Problem(409, "version-not-loaded", f"adapter v{pinned} is not served now (served: {held})")
        return bool(cand) and route(key, cand[2])

    def _model(self, candidate: bool) -> tuple[int, torch.nn.Module]:
        """``(version, model)`` once per batch: the canary's candidate with ``candidate`` when one is held,
        else the active version."""
        cand = self.candidate
        return cand[:2] if candidate and cand else self.current

    @torch.inference_mode()
    def forward(self, images: np.ndarray, candidate: bool = False) -> tuple[np.ndarray, int]:
        """uint8 (N, 3, H, W) → the task's raw outputs as an array (class probabilities (N, C) for
        ``classify``) and the adapter version that produced them."""
        version, model = self._model(candidate)
        batch = self.task.make_batch(self.task.samples(torch.from_numpy(images))).to(self.device)
        return self.task.forward(model, batch).cpu().numpy(), version

    @torch.inference_mode()
    def answer(self, images: np.ndarray, questions: list[str], top_k: int,
               candidate: bool = False) -> tuple[list[dict], int]:
        """uint8 (N, 3, H, W) images with one question each → the task's responses and the adapter version."""
        version, model = self._model(candidate)
        batch = self.task.make_batch(self.task.samples(torch.from_numpy(images), questions)).to(self.device)
        return self.task.respond(self.task.forward(model, batch).cpu(), top_k), version
