"""The training actor and the merge actor (Ray actors; ``num_gpus`` from config, 0 on CPU).

Both rebuild what they need from the data directory, so either can die and be restarted without
losing accepted work: the controller owns the job record and re-runs or fails it.
"""

from __future__ import annotations

import os
import time

import ray
import torch
from safetensors.torch import load_file, save_file

from training.backbones import create_backbone, get_spec
from training.data import Domain
from training.lora import materialise, to_delta
from training.online import merge_into_global, train_temporary
from training.store import AdapterManifest, AdapterStore
from training.strategies import LearnerContext
from training.strategies.base import accuracy

from .config import ServerConfig


def domain_file(cfg: ServerConfig, name: str) -> str:
    """Where a domain's train and held-out tensors live."""
    return cfg.path("domains", f"{name}.safetensors")


def save_domain(cfg: ServerConfig, d: Domain) -> None:
    """Persist a domain atomically (before the 202 is sent)."""
    path = domain_file(cfg, d.name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    save_file({"x_train": d.x_train, "y_train": d.y_train, "x_test": d.x_test, "y_test": d.y_test}, tmp)
    os.replace(tmp, path)


def load_domain(cfg: ServerConfig, name: str) -> Domain:
    """Inverse of :func:`save_domain`."""
    t = load_file(domain_file(cfg, name))
    return Domain(name, t["x_train"], t["y_train"], t["x_test"], t["y_test"])


def make_context(cfg: ServerConfig) -> LearnerContext:
    """Backbone (pretrained trunk, seeded head) and settings shared by both actors."""
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # leave cores to the serving replicas
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = create_backbone(cfg.backbone, len(cfg.class_names), seed=cfg.seed)
    for p in base.parameters():
        p.requires_grad_(False)
    return LearnerContext(get_spec(cfg.backbone), base.to(device), cfg.lora, cfg.train, cfg.seed, device)


@ray.remote
class TrainerActor:
    """Fine-tunes the temporary adapter for one domain at a time."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg, self.ctx = cfg, make_context(cfg)
        self.store = AdapterStore(cfg.path("adapters"))

    def train(
        self,
        job_id: str,
        domain: str,
        method: str,
        hyper: dict,
        global_name: str | None,
        n_seen: int,
        controller: ray.actor.ActorHandle,
    ) -> tuple[dict, dict]:
        """Returns ``(temp_adapter, info)``; progress goes to the controller as it happens."""
        t0 = time.perf_counter()
        global_ = None
        if global_name is not None:
            tensors, man = self.store.load(global_name, backbone=self.cfg.backbone)
            global_ = tensors if man.format == "lora" else None
        d = load_domain(self.cfg, domain)

        def progress(step: int, total: int, loss: float) -> None:
            controller.progress.remote(job_id, step, total, loss)

        settings = self.ctx.train.model_copy(update={k: v for k, v in hyper.items() if k in ("steps", "lr")})
        ctx = LearnerContext(self.ctx.spec, self.ctx.base, self.ctx.lora, settings, self.ctx.seed, self.ctx.device)
        method_hyper = {k: v for k, v in hyper.items() if k not in ("steps", "lr")}
        temp, info = train_temporary(ctx, method, method_hyper, global_, n_seen, d, progress)
        info["train_seconds"] = time.perf_counter() - t0
        return {k: v.cpu() for k, v in temp.items()}, info


@ray.remote
class MergeActor:
    """Merges a temporary adapter into a new global version, evaluates it, persists it atomically."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg, self.ctx = cfg, make_context(cfg)
        self.store = AdapterStore(cfg.path("adapters"))

    def merge(
        self,
        method: str,
        global_name: str | None,
        temp: dict,
        name: str,
        parent: int | None,
        domains: list[str],
        metrics: dict,
    ) -> tuple[dict, dict[str, float]]:
        """Returns ``(manifest, accuracy per seen domain)``; ``name`` is the new version's adapter name."""
        global_ = self.store.load(global_name, backbone=self.cfg.backbone)[0] if global_name else None
        merged = merge_into_global(method, global_, temp)
        model = materialise(self.ctx.base, to_delta(merged, self.ctx.lora))
        acc = {
            d: accuracy(model, self.ctx.spec, load_domain(self.cfg, d), self.ctx.device, self.ctx.train.eval_batch)
            for d in domains
        }
        man = AdapterManifest(
            name=name,
            backbone=self.cfg.backbone,
            format="lora",
            lora=self.cfg.lora,
            class_names=self.cfg.class_names,
            parent=None if parent is None else f"v{parent}",
            method=method,
            domains=domains,
            metrics={**metrics, **{f"acc/{k}": v for k, v in acc.items()}},
        )
        man = self.store.save(merged, man)
        return man.model_dump(), acc
