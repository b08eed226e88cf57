"""The training and merge worker: one process (a Ray actor, ``num_gpus = trainer_num_gpus``) that trains a
job's temporary adapter, merges it into a new global version, evaluates every seen domain and persists
the version atomically. It rebuilds everything from the data directory, so it can die and be recreated
without losing accepted work: the controller owns the job record.
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from training.buffer import ReplayBuffer
from training.data import Domain
from training.hyper import PamAlign, parse_hyper
from training.lora import materialise, to_delta
from training.online import (
    ALPHA_METHODS,
    Progress,
    fit_adaptive,
    merge_into_global,
    train_domain_adapter,
    train_temporary,
)
from training.store import AdapterManifest, AdapterStore
from training.strategies import LearnerContext
from training.strategies.base import LoraLearner, accuracy
from training.tasks import prepare

from .archive import resize_images
from .config import ServerConfig
from .engine import build_task
from .pipeline import crash_point, domain_file, save_domain
from .versions import COMPONENT, SHADOW, named

BUILTIN = "builtin:"
PREPARED_CACHE = 32  # prepared domains a worker keeps (a 1,000-question film_scenes domain: ~12 MB of features)


def make_context(cfg: ServerConfig) -> LearnerContext:
    """The task's base model and settings for training and evaluation (``cfg.task``)."""
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # leave cores to the serving replicas
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task = build_task(cfg)
    return LearnerContext(task, task.build_base(cfg.seed).to(device), cfg.lora, cfg.train, cfg.seed, device)


class IngestWorker:
    """Plain class; the controller runs it inside its ``Worker`` actor, tests call it in process."""

    def __init__(self, cfg: ServerConfig | dict) -> None:
        self.cfg = ServerConfig.model_validate(cfg)
        self.ctx = make_context(self.cfg)
        self.store = AdapterStore(self.cfg.path("adapters"))
        self.labels = list(self.ctx.task.answers)  # what the adapters' manifests record
        # every stored domain is read at this one size, so the buffer, evaluation and the α fit, which
        # read several domains together, never meet two sizes: the backbone's input, or the task's own
        self.size = self.cfg.upload_size() or self.ctx.task.image_size
        # prepared domains (a task's per-domain cache, e.g. frozen-trunk features) by (name, file identity):
        # computed once per stored file, reused by every later job's training and evaluation
        self._prepared: OrderedDict[tuple, Domain] = OrderedDict()

    def initial(self) -> dict:
        """Persist ``global@v0``: the backbone's seeded head and LoRA at its initialisation (ΔW = 0)."""
        man = AdapterManifest(name="global@v0", backbone=self.cfg.backbone, format="lora", lora=self.cfg.lora,
                              class_names=self.labels, method="init")
        return self.store.save(LoraLearner(self.ctx).init_adapter, man).model_dump(mode="json")

    # --- data ----------------------------------------------------------------------------------
    def domain(self, name: str, source: str | None = None) -> Domain:
        """A stored domain at the task's one image size (:attr:`size`), whatever size it was stored at (data
        dirs written before sizes were canonical hold built-in domains at the benchmark's 32 px); a built-in
        source (``builtin:<benchmark>/<domain>``) is written on first use. Prepared by the task
        (``training.tasks.prepare``); a task that prepares something keeps the result for the next jobs
        (the :data:`PREPARED_CACHE` most recent files)."""
        path = domain_file(self.cfg, name)
        if not os.path.exists(path) and source and source.startswith(BUILTIN):
            self._materialise(name, source[len(BUILTIN) :])
        st = os.stat(path)
        key = (name, st.st_mtime_ns, st.st_size)  # a re-ingested name (after a rejected job) is a new file
        if key in self._prepared:
            self._prepared.move_to_end(key)
            return self._prepared[key]
        d = prepare(self.ctx.task, self._read(name, path))
        if getattr(self.ctx.task, "prepare", None) is not None:
            self._prepared[key] = d
            while len(self._prepared) > PREPARED_CACHE:
                self._prepared.popitem(last=False)
        return d

    def _read(self, name: str, path: str) -> Domain:
        t = {k: v.numpy() for k, v in load_file(path).items()}
        x_train, x_test = (torch.from_numpy(resize_images(t[k], self.size)) for k in ("x_train", "x_test"))
        y_train, y_test = torch.from_numpy(t["y_train"]).long(), torch.from_numpy(t["y_test"]).long()
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if "q_train" in meta:  # a vqa domain: images, questions, answer ids
            from training.data.scenes import VqaDomain

            return VqaDomain(name, x_train, y_train, x_test, y_test,
                             q_train=json.loads(meta["q_train"]), q_test=json.loads(meta["q_test"]))
        return Domain(name, x_train, y_train, x_test, y_test)

    def _materialise(self, name: str, source: str) -> None:
        """Write built-in domain ``<benchmark>/<domain>`` as an upload would be stored: at :attr:`size`."""
        from training.data import load_benchmark

        bench, dom = source.split("/", 1)
        d = load_benchmark(bench, domains=[dom]).domain(dom)
        arrays = {"x_train": resize_images(d.x_train.numpy(), self.size), "y_train": d.y_train.numpy(),
                  "x_test": resize_images(d.x_test.numpy(), self.size), "y_test": d.y_test.numpy()}
        questions = {"q_train": d.q_train, "q_test": d.q_test} if hasattr(d, "q_train") else None
        save_domain(self.cfg, name, arrays, questions)

    def _accuracy(self, adapter: dict[str, torch.Tensor], domains: list[Domain]) -> dict[str, float]:
        model = materialise(self.ctx.base, to_delta(adapter, self.ctx.lora)).to(self.ctx.device)
        return {d.name: accuracy(self.ctx.task, model, d, self.ctx.device, self.ctx.train.eval_batch)
                for d in domains}

    def _buffer(self, d: Domain) -> int:
        """Add the domain to the class-balanced replay buffer (once; a VQA domain with its questions, a class
        being an answer); returns its sample count there. The adaptive method fits α on it."""
        path = self.cfg.path("buffer.safetensors")
        buf = ReplayBuffer.load(path) if os.path.exists(path) else ReplayBuffer(self.cfg.buffer_spc)
        buf.map_images(lambda x: torch.from_numpy(resize_images(x.numpy(), self.size)))  # an older data dir's size
        if d.name not in buf.domains():
            buf.add_domain(d)
            buf.save(path)
        return sum(len(v) for (dom, _), v in buf.slots.items() if dom == d.name)

    # --- one job -----------------------------------------------------------------------------
    def run(self, job: dict, parent: dict, version: int, progress: Progress | None = None,
            phase: Callable[[str], None] | None = None) -> dict:
        """Train ``job``'s temporary adapter from ``parent`` (a version row), merge it into
        ``global@v{version}``, evaluate every seen domain and persist the version atomically.

        One call per job: the temporary adapter never leaves this process (the controller, which only
        records numbers, never loads torch), the parent is loaded once and ``hyper`` parsed once.

        Args:
            job: The job row (``domain``, ``method``, ``hyper``, ``source``).
            parent: The active version's row; its adapter is where training starts.
            version: The number the new version takes (allocated by the pipeline).
            progress: ``progress(step, total, loss)`` while training.
            phase: Called with ``"merging"`` once training is done.

        Returns:
            ``{"manifest", "accuracy": {domain: acc}, "info", "metrics", "coefficients", "timings"}``;
            ``info`` has ``zero_shot`` (the parent's accuracy on the new domain, for the activation gate),
            ``A_t``, PAM's reset counts, ``n_train``/``n_heldout`` and ``buffer_size``.
        """
        t0 = time.perf_counter()
        hyper = parse_hyper(job["method"], job["hyper"], self.cfg.max_steps)
        tensors, man = self.store.load(parent["name"], backbone=self.cfg.backbone)
        # an imported adapter holds what it learned elsewhere: it counts as one domain's worth in the merge
        n_seen = max(len(parent["domains"]), int(parent["method"] == "import"))
        global_ = tensors if n_seen and man.format == "lora" else None
        if isinstance(hyper, PamAlign) and job["method"] in ALPHA_METHODS:  # pam_adaptive: its own lineage
            global_, n_seen = self._shadow(parent, global_, n_seen)
        temp, info, d = self._train(job, hyper, tensors, global_, n_seen, progress)
        if phase is not None:
            phase("merging")
        t1 = time.perf_counter()
        if job["method"] in ALPHA_METHODS:
            merged, extra = self._alpha_merge(job, parent, temp, version, hyper)
            if isinstance(hyper, PamAlign):
                extra["metrics"].update(self._next_shadow(global_, temp, version, hyper))
        else:
            merged, extra = merge_into_global(job["method"], global_, temp, hyper), {"metrics": {}, "coefficients": {}}
        domains = [*parent["domains"], job["domain"]]
        acc = self._accuracy(merged, [*(self.domain(n) for n in parent["domains"]), d])  # d: read once per job
        man = self.store.save(merged, AdapterManifest(
            name=f"global@v{version}", backbone=self.cfg.backbone,
            format="delta" if job["method"] in ALPHA_METHODS else "lora", lora=self.cfg.lora,
            class_names=self.labels, parent=parent["name"], method=job["method"], domains=domains,
            metrics={f"acc/{k}": v for k, v in acc.items()},
        ))
        timings = {"training": t1 - t0, "merging_and_evaluating": time.perf_counter() - t1}
        return {"manifest": man.model_dump(mode="json"), "accuracy": acc, "info": info, "timings": timings, **extra}

    def evaluate(self, name: str, domains: list[str]) -> dict[str, float]:
        """Held-out accuracy of adapter ``name`` on each of ``domains`` (an imported version's numbers)."""
        tensors, _ = self.store.load(name, backbone=self.cfg.backbone)
        return self._accuracy(tensors, [self.domain(d) for d in domains]) if domains else {}

    def _train(self, job: dict, hyper: object, parent: dict[str, torch.Tensor], global_: dict | None, n_seen: int,
               progress: Progress | None) -> tuple[dict[str, torch.Tensor], dict, Domain]:
        """The temporary adapter (or, for the α methods, the domain's own), what the gate needs to know, and the
        new domain as read."""
        t0 = time.perf_counter()
        d = self.domain(job["domain"], job.get("source"))
        zero_shot = self._accuracy(parent, [d])[d.name]

        def report(step: int, total: int, loss: float) -> None:
            crash_point("during-training")
            if progress is not None:
                progress(step, total, loss)

        if job["method"] in ALPHA_METHODS and not isinstance(hyper, PamAlign):  # the domain's own LoRA from the
            # initial adapter (Coleman et al.); pam_adaptive's is a PAM temporary of its shadow global LoRA
            temp, info = train_domain_adapter(self.ctx, hyper, d, report)
        else:
            temp, info = train_temporary(self.ctx, job["method"], hyper, global_, n_seen, d, report)
        info.update(zero_shot=zero_shot, n_train=len(d.y_train), n_heldout=len(d.y_test),
                    buffer_size=self._buffer(d), train_seconds=time.perf_counter() - t0)
        return temp, info, d

    def _shadow(self, parent: dict, global_: dict | None, n_seen: int) -> tuple[dict | None, int]:
        """``pam_adaptive``'s factor-space global LoRA (never served; ``training/strategies/adaptive.py``,
        ``pam_adaptive``) that the next temporary is cloned from and aligned with, and the domains it holds:
        the parent's own (named in its metrics as ``s/<adapter>``), else the parent's global LoRA when it is
        one, else none (a dense adaptive parent: the temporary starts from the initial adapter)."""
        names = named(parent["metrics"], SHADOW)
        if names:
            return self.store.load(names[0], backbone=self.cfg.backbone)[0], len(parent["domains"])
        return global_, n_seen if global_ is not None else 0

    def _next_shadow(self, global_: dict | None, temp: dict, version: int, hyper: object) -> dict[str, float]:
        """Store ``Avg(W_{G,t-1}, W')`` (PAM, Alg. 1) as version ``version``'s shadow; its metrics entry."""
        shadow = merge_into_global("pam_adaptive", global_, temp, hyper)
        man = self.store.save(shadow, AdapterManifest(
            name=f"pam@v{version}", backbone=self.cfg.backbone, format="lora", lora=self.cfg.lora,
            class_names=self.labels, method="pam_adaptive"))
        return {SHADOW + man.name: 1.0}

    def _alpha_merge(self, job: dict, parent: dict, temp: dict, version: int, hyper: object) -> tuple[dict, dict]:
        """Adaptive merging online: every domain's own adapter, merged with α fit on the replay buffer.

        The components of an adaptive version are listed in its metrics as ``c/<adapter>`` (the logits
        the next fit starts from). A parent from the global-LoRA family contributes its global adapter
        as one component standing in for the domains it holds (no per-domain adapters exist for them).

        Returns:
            ``(merged delta, {"metrics": {"c/<adapter>": c}, "coefficients": {domain: α}})``.
        """
        comps = named(parent["metrics"], COMPONENT)
        c_init = torch.tensor([parent["metrics"][COMPONENT + n] for n in comps]) if comps else None
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
        return merged, {"metrics": {COMPONENT + n: float(v) for n, v in zip(comps, c)}, "coefficients": coefficients}
