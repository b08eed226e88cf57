"""The training and merge worker: one process (a Ray actor, ``num_gpus = trainer_num_gpus``) that trains a
job's temporary adapter, merges it into a new global version, evaluates every seen domain and persists
the version atomically. It rebuilds everything from the data directory, so it can die and be recreated
without losing accepted work: the controller owns the job record.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from training.backbones import create_backbone, get_spec
from training.buffer import ReplayBuffer
from training.data import Domain
from training.hyper import parse_hyper
from training.lora import materialise, to_delta
from training.online import ALPHA_METHODS, fit_adaptive, merge_into_global, train_domain_adapter, train_temporary
from training.store import AdapterManifest, AdapterStore
from training.strategies import LearnerContext
from training.strategies.base import LoraLearner, accuracy

from .config import ServerConfig
from .engine import build_task
from .pipeline import crash_point, domain_file, save_domain

BUILTIN = "builtin:"


def make_context(cfg: ServerConfig) -> LearnerContext:
    """The base model and settings for training and evaluation: the image backbone (pretrained trunk,
    seeded head) for ``classify``, the task's pretrained model otherwise (``cfg.task``)."""
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # leave cores to the serving replicas
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.task != "classify":
        task = build_task(cfg)
        base = task.build_base(cfg.seed)
        return LearnerContext(None, base.to(device), cfg.lora, cfg.train, cfg.seed, device, task=task)
    base = create_backbone(cfg.backbone, len(cfg.class_names), seed=cfg.seed)
    for p in base.parameters():
        p.requires_grad_(False)
    return LearnerContext(get_spec(cfg.backbone), base.to(device), cfg.lora, cfg.train, cfg.seed, device)


def labels_of(ctx: LearnerContext, cfg: ServerConfig) -> list[str]:
    """What the adapters' manifests record as labels: class names, or the task's answer vocabulary."""
    return list(ctx.task.answers) if ctx.task is not None else cfg.class_names


class IngestWorker:
    """Plain class; the controller runs it inside its ``Worker`` actor, tests call it in process."""

    def __init__(self, cfg: ServerConfig | dict) -> None:
        self.cfg = ServerConfig.model_validate(cfg)
        self.ctx = make_context(self.cfg)
        self.store = AdapterStore(self.cfg.path("adapters"))
        self.labels = labels_of(self.ctx, self.cfg)

    def initial(self) -> dict:
        """Persist ``global@v0``: the backbone's seeded head and LoRA at its initialisation (ΔW = 0)."""
        man = AdapterManifest(name="global@v0", backbone=self.cfg.backbone, format="lora", lora=self.cfg.lora,
                              class_names=self.labels, method="init")
        return self.store.save(LoraLearner(self.ctx).init_adapter, man).model_dump(mode="json")

    # --- data ----------------------------------------------------------------------------------
    def domain(self, name: str, source: str | None = None) -> Domain:
        """A stored domain; a built-in source (``builtin:<benchmark>/<domain>``) is written on first use."""
        path = domain_file(self.cfg, name)
        if not os.path.exists(path) and source and source.startswith(BUILTIN):
            from training.data import load_benchmark

            bench, dom = source[len(BUILTIN) :].split("/", 1)
            d = load_benchmark(bench, domains=[dom]).domain(dom)
            arrays = {"x_train": d.x_train, "y_train": d.y_train, "x_test": d.x_test, "y_test": d.y_test}
            questions = {"q_train": d.q_train, "q_test": d.q_test} if hasattr(d, "q_train") else None
            save_domain(self.cfg, name, {k: v.numpy() for k, v in arrays.items()}, questions)
        t = load_file(path)
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if "q_train" in meta:  # a vqa domain: images, questions, answer ids
            from training.data.scenes import VqaDomain

            return VqaDomain(name, t["x_train"], t["y_train"].long(), t["x_test"], t["y_test"].long(),
                             q_train=json.loads(meta["q_train"]), q_test=json.loads(meta["q_test"]))
        return Domain(name, t["x_train"], t["y_train"].long(), t["x_test"], t["y_test"].long())

    def _accuracy(self, adapter: dict[str, torch.Tensor], domains: list[Domain]) -> dict[str, float]:
        model = materialise(self.ctx.base, to_delta(adapter, self.ctx.lora)).to(self.ctx.device)
        return {d.name: accuracy(model, self.ctx.spec, d, self.ctx.device, self.ctx.train.eval_batch, self.ctx.task)
                for d in domains}

    def _buffer(self, d: Domain) -> int:
        """Add the domain to the class-balanced replay buffer (once); returns its sample count there.

        Only the adaptive methods read the buffer, and they are offered for image classification only.
        """
        if self.ctx.task is not None:
            return 0
        path = self.cfg.path("buffer.safetensors")
        buf = ReplayBuffer.load(path) if os.path.exists(path) else ReplayBuffer(self.cfg.buffer_spc)
        if d.name not in buf.domains():
            buf.add(d.name, d.x_train, d.y_train)
            buf.save(path)
        return sum(len(v) for (dom, _), v in buf.slots.items() if dom == d.name)

    # --- the two steps -------------------------------------------------------------------------
    def train(self, job: dict, parent: dict, progress: Callable[[int, int, float], None] | None = None) -> tuple:
        """Train ``job``'s temporary adapter starting from ``parent`` (a version row).

        Returns:
            ``(adapter, info)``; ``info`` has ``zero_shot`` (the parent's accuracy on the new domain, for
            the activation gate), ``A_t``, PAM's reset counts, ``n_train``/``n_heldout`` and ``buffer_size``.
        """
        t0 = time.perf_counter()
        hyper = parse_hyper(job["method"], job["hyper"], self.cfg.max_steps)
        d = self.domain(job["domain"], job.get("source"))
        tensors, man = self.store.load(parent["name"], backbone=self.cfg.backbone)
        zero_shot = self._accuracy(tensors, [d])[d.name]
        n_seen = len(parent["domains"])
        global_ = tensors if n_seen and man.format == "lora" else None

        def report(step: int, total: int, loss: float) -> None:
            crash_point("during-training")
            if progress is not None:
                progress(step, total, loss)

        if job["method"] in ALPHA_METHODS:  # the domain's own LoRA from the initial adapter (Coleman et al.)
            temp, info = train_domain_adapter(self.ctx, hyper, d, report)
        else:
            temp, info = train_temporary(self.ctx, job["method"], hyper, global_, n_seen, d, report)
        info.update(zero_shot=zero_shot, n_train=len(d.y_train), n_heldout=len(d.y_test),
                    buffer_size=self._buffer(d), train_seconds=time.perf_counter() - t0)
        return {k: v.cpu() for k, v in temp.items()}, info

    def merge(self, job: dict, parent: dict, temp: dict, version: int) -> dict:
        """Merge ``temp`` into ``parent``, evaluate every seen domain, persist ``global@v{version}`` atomically.

        Returns:
            ``{"manifest": ..., "accuracy": {domain: acc}}``.
        """
        hyper = parse_hyper(job["method"], job["hyper"], self.cfg.max_steps)
        seen = parent["domains"]
        extra: dict = {"metrics": {}, "coefficients": {}}
        if job["method"] in ALPHA_METHODS:
            merged, extra = self._alpha_merge(job, parent, temp, version, hyper)
        else:
            global_ = self.store.load(parent["name"], backbone=self.cfg.backbone)[0] if seen else None
            merged = merge_into_global(job["method"], global_, temp, hyper)
        domains = [*seen, job["domain"]]
        acc = self._accuracy(merged, [self.domain(n) for n in domains])
        man = AdapterManifest(
            name=f"global@v{version}",
            backbone=self.cfg.backbone,
            format="delta" if job["method"] in ALPHA_METHODS else "lora",
            lora=self.cfg.lora,
            class_names=self.labels,
            parent=parent["name"],
            method=job["method"],
            domains=domains,
            metrics={f"acc/{k}": v for k, v in acc.items()},
        )
        man = self.store.save(merged, man)
        return {"manifest": man.model_dump(mode="json"), "accuracy": acc, **extra}

    def _alpha_merge(self, job: dict, parent: dict, temp: dict, version: int, hyper: object) -> tuple[dict, dict]:
        """Adaptive merging online: every domain's own adapter, merged with α fit on the replay buffer.

        The components of an adaptive version are listed in its metrics as ``c/<adapter>`` (the logits
        the next fit starts from). A parent from the global-LoRA family contributes its global adapter
        as one component standing in for the domains it holds (no per-domain adapters exist for them).

        Returns:
            ``(merged delta, {"metrics": {"c/<adapter>": c}, "coefficients": {domain: α}})``.
        """
        comps = [k[2:] for k in parent["metrics"] if k.startswith("c/")]
        c_init = torch.tensor([parent["metrics"]["c/" + n] for n in comps]) if comps else None
        if not comps and parent["domains"]:
            comps = [parent["name"]]
        own = self.store.save(temp, AdapterManifest(
            name=f"domain@{job['domain']}@v{version}", backbone=self.cfg.backbone, format="lora",
            lora=self.cfg.lora, class_names=self.labels, method=job["method"], domains=[job["domain"]]))
        comps.append(own.name)
        adapters = [self.store.load(n, backbone=self.cfg.backbone)[0] for n in comps]
        buf = ReplayBuffer.load(self.cfg.path("buffer.safetensors"))
        domains = [*parent["domains"], job["domain"]]
        merged, alpha, c = fit_adaptive(self.ctx, adapters, buf.subset(domains, hyper.spc), hyper, c_init)
        covered = {n: self.store.manifest(n).domains for n in comps}
        coefficients = {d: float(a) for n, a in zip(comps, alpha) for d in covered[n]}
        return merged, {"metrics": {f"c/{n}": float(v) for n, v in zip(comps, c)}, "coefficients": coefficients}
