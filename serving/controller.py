"""The controller: the one owner of server state (SQLite + adapter store) and of the ingest pipeline.

A named, detached Ray actor. Jobs run one at a time: training actor → merge actor (merge, evaluate,
persist atomically) → activate the new version → wait until every live replica has swapped. Replicas
long-poll :meth:`Controller.wait_version`; nothing is pushed to them, so a slow or restarting replica
never blocks a swap for the others beyond ``swap_timeout_s``.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid

import ray
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from training.backbones import create_backbone
from training.buffer import ReplayBuffer
from training.data import Domain
from training.data.images import split
from training.lora import attach_lora, get_adapter
from training.online import ONLINE_METHODS
from training.store import AdapterManifest, AdapterStore

from .config import ServerConfig
from .state import StateDB
from .workers import MergeActor, TrainerActor, save_domain

NAME, NAMESPACE = "mergeserve-controller", "mergeserve"
DOMAIN_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Problem(Exception):
    """An error for the HTTP client: status, problem type code and detail (RFC 9457)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail

    def as_dict(self) -> dict:
        return {"problem": {"status": self.status, "code": self.code, "detail": self.detail}}


def _metrics(reg: CollectorRegistry) -> dict:
    return {
        "accuracy": Gauge("mergeserve_domain_accuracy", "Accuracy per domain", ["domain", "source"], registry=reg),
        "version": Gauge("mergeserve_adapter_version", "Active global adapter version", registry=reg),
        "jobs": Counter("mergeserve_ingest_jobs_total", "Ingest jobs by terminal status", ["status"], registry=reg),
        "train": Histogram(
            "mergeserve_training_seconds",
            "Training time per ingest job",
            registry=reg,
            buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
        ),
        "swap": Histogram(
            "mergeserve_swap_seconds",
            "Activation to last replica swapped",
            registry=reg,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        ),
        "requests": Counter("mergeserve_requests", "HTTP requests", ["endpoint", "status"], registry=reg),
        "latency": Histogram(
            "mergeserve_request_latency_seconds",
            "HTTP request latency",
            ["endpoint"],
            registry=reg,
            buckets=LATENCY_BUCKETS,
        ),
    }


@ray.remote(num_cpus=0)
class Controller:
    """Owns domains, jobs, adapter versions and the accuracy matrix."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = ServerConfig.model_validate(cfg)
        os.makedirs(self.cfg.data_dir, exist_ok=True)
        self.db = StateDB(self.cfg.path("state.sqlite"))
        self.store = AdapterStore(self.cfg.path("adapters"))
        self.reg = CollectorRegistry()
        self.m = _metrics(self.reg)
        for j in self.db.jobs():  # accepted work that a crash interrupted: report it, never hide it
            self.db.update_job(j["id"], status="failed", error="interrupted by a server restart; resubmit the domain")
            self.m["jobs"].labels("failed").inc()
        if not self.db.versions():
            self._create_initial_version()
        self.active: int = self.db.get("active", self.db.versions()[-1]["version"])
        self.replicas: dict[str, tuple[int, float]] = {}
        self._changed: asyncio.Event | None = None
        self._work: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None
        self.trainer = TrainerActor.options(num_cpus=0.5, num_gpus=self.cfg.trainer_num_gpus).remote(self.cfg)
        self.merger = MergeActor.options(num_cpus=0.25, num_gpus=self.cfg.trainer_num_gpus).remote(self.cfg)

    def _create_initial_version(self) -> None:
        """v0: the pretrained backbone with the seeded head and LoRA at its initialisation (ΔW = 0)."""
        model = attach_lora(
            create_backbone(self.cfg.backbone, len(self.cfg.class_names), seed=self.cfg.seed),
            self.cfg.lora,
            self.cfg.seed,
        )
        man = self.store.save(
            get_adapter(model),
            AdapterManifest(
                name="global@v0",
                backbone=self.cfg.backbone,
                format="lora",
                lora=self.cfg.lora,
                class_names=self.cfg.class_names,
                method="init",
            ),
        )
        self.db.add_version(0, man.name, None, "init", [], {}, man.sha256, {})
        self.db.put("active", 0)

    async def _events(self) -> None:
        if self._changed is None:
            self._changed, self._work = asyncio.Event(), asyncio.Event()
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self._run_jobs())

    # --- queries -------------------------------------------------------------------------------
    async def ready(self) -> dict:
        await self._events()
        return {"active": self.active, "config": self.cfg.model_dump(mode="json")}

    def job(self, job_id: str) -> dict | None:
        return self.db.job(job_id)

    def domains(self) -> list[dict]:
        now = self.db.accuracy(self.active)
        fb = self.db.feedback()
        buf_path = self.cfg.path("buffer.safetensors")
        sizes: dict[str, int] = {}
        if os.path.exists(buf_path):
            for (dom, _), xs in ReplayBuffer.load(buf_path).slots.items():
                sizes[dom] = sizes.get(dom, 0) + len(xs)
        return [
            {
                "name": d["name"],
                "samples": d["samples"],
                "heldout": d["heldout"],
                "learned_version": d["learned_version"],
                "accuracy_when_learned": d["acc_learned"],
                "accuracy_now": now.get(d["name"]),
                "feedback_accuracy": fb.get(d["name"]),
                "buffer_size": sizes.get(d["name"], 0),
            }
            for d in self.db.domains()
        ]

    def adapters(self) -> dict:
        return {
            "active": self.active,
            "versions": [
                {**v, "version": v["version"], "parent": v["parent"], "active": v["version"] == self.active}
                for v in self.db.versions()
            ],
        }

    # --- ingestion -----------------------------------------------------------------------------
    async def submit(
        self,
        name: str,
        method: str | None,
        hyper: dict,
        key: str | None,
        x: torch.Tensor,
        y: torch.Tensor,
        heldout_fraction: float | None,
    ) -> dict:
        """Validate and persist a new domain and its job, then queue it. Returns the job or a problem."""
        await self._events()
        if key and (prior := self.db.job_by_key(key)):
            return {"job": prior, "replayed": True}
        try:
            job = self._accept(
                name, method or self.cfg.default_method, hyper, key, x, y, heldout_fraction or self.cfg.heldout_fraction
            )
        except Problem as p:
            return p.as_dict()
        self._work.set()
        return {"job": job, "replayed": False}

    def _accept(
        self, name: str, method: str, hyper: dict, key: str | None, x: torch.Tensor, y: torch.Tensor, frac: float
    ) -> dict:
        if not DOMAIN_NAME.match(name or ""):
            raise Problem(422, "invalid-domain-name", "domain name must match [a-z0-9][a-z0-9_-]{0,62}")
        if method not in ONLINE_METHODS:
            raise Problem(422, "unknown-method", f"method {method!r} is not one of {list(ONLINE_METHODS)}")
        if self.db.active_job_for(name):
            raise Problem(409, "domain-busy", f"domain {name!r} already has an ingest job running")
        if any(d["name"] == name for d in self.db.domains()):
            raise Problem(409, "domain-exists", f"domain {name!r} is already learned; use a new name")
        if len(self.db.domains()) + len(self.db.jobs()) >= self.cfg.max_domains:
            raise Problem(409, "too-many-domains", f"the server holds at most {self.cfg.max_domains} domains")
        for k, v in hyper.items():
            if not isinstance(v, (int, float, str)) or isinstance(v, bool):
                raise Problem(422, "bad-hyper-parameter", f"hyper-parameter {k!r} must be a number or string")
        n_test = max(1, int(round(frac * len(y))))
        if len(y) - n_test < 1:
            raise Problem(422, "empty-domain", f"{len(y)} images leave nothing to train on after the held-out split")
        x_tr, y_tr, x_te, y_te = split(x, y, n_test, self.cfg.seed)
        job_id = uuid.uuid4().hex[:16]
        save_domain(self.cfg, Domain(name, x_tr, y_tr, x_te, y_te))  # data first, then the job row: no orphan job
        buf_path = self.cfg.path("buffer.safetensors")
        buf = ReplayBuffer.load(buf_path) if os.path.exists(buf_path) else ReplayBuffer(self.cfg.buffer_spc)
        buf.add(name, x_tr, y_tr)
        buf.save(buf_path)
        self.db.add_job(job_id, name, method, hyper, key, len(y_tr), len(y_te))
        self.m["jobs"].labels("accepted").inc()
        return self.db.job(job_id)

    def progress(self, job_id: str, step: int, total: int, loss: float) -> None:
        self.db.update_job(job_id, step=step, total=total, loss=loss)

    def set_status(self, job_id: str, status: str) -> None:
        self.db.update_job(job_id, status=status)

    async def _run_jobs(self) -> None:
        while True:
            queued = self.db.jobs(("queued",))
            if not queued:
                self._work.clear()
                await self._work.wait()
                continue
            await self._run(queued[0])

    async def _run(self, job: dict) -> None:
        jid, t0 = job["id"], time.time()
        timings: dict[str, float] = {}
        try:
            parent = self.active
            parent_row = self.db.version(parent)
            seen = parent_row["domains"] if parent_row else []
            self.db.update_job(jid, status="training")
            temp, info = await self.trainer.train.remote(
                jid,
                job["domain"],
                job["method"],
                job["hyper"],
                parent_row["name"],
                len(seen),
                ray.get_runtime_context().current_actor,
            )
            timings["training"] = time.time() - t0
            self.m["train"].observe(timings["training"])
            self.db.update_job(jid, status="merging")
            version = max(v["version"] for v in self.db.versions()) + 1
            t1 = time.time()
            domains = [*seen, job["domain"]]
            man, acc = await self.merger.merge.remote(
                job["method"],
                parent_row["name"] if seen else None,
                temp,
                f"global@v{version}",
                parent,
                domains,
                {"A_t": info["A_t"]},
            )
            timings["merging_and_evaluating"] = time.time() - t1
            self.db.add_version(
                version,
                man["name"],
                parent,
                job["method"],
                domains,
                {"A_t": info["A_t"], "n_reset": info["n_reset"]},
                man["sha256"],
                acc,
            )
            self.db.add_domain(job["domain"], jid, job["n_train"], job["n_heldout"], version, acc[job["domain"]])
            self.db.update_job(jid, status="swapping", version=version)
            timings["swap"] = await self._activate(version)
            self.db.update_job(jid, status="succeeded", timings={**timings, "total": time.time() - t0})
            self.m["jobs"].labels("succeeded").inc()
        except Exception as e:  # noqa: BLE001 - any failure is reported on the job, never swallowed
            self.db.update_job(jid, status="failed", error=f"{type(e).__name__}: {e}"[:2000], timings=timings)
            self.m["jobs"].labels("failed").inc()

    # --- versions and hot swap -----------------------------------------------------------------
    async def activate(self, version: int) -> dict:
        """Roll back or forward to a stored version through the same swap path."""
        await self._events()
        row = self.db.version(version)
        if row is None:
            return Problem(404, "unknown-version", f"no adapter version {version}").as_dict()
        try:
            self.store.load(row["name"], backbone=self.cfg.backbone)
        except ValueError as e:
            return Problem(409, "corrupt-adapter", str(e)).as_dict()
        swap = await self._activate(version)
        return {"active": version, "swap_seconds": swap}

    async def _activate(self, version: int) -> float:
        await self._events()
        t0 = time.time()
        self.db.put("active", version)
        self.active = version
        self._changed.set()
        self._changed = asyncio.Event()
        while time.time() - t0 < self.cfg.swap_timeout_s:
            live = [v for v, seen in self.replicas.values() if time.time() - seen < 30]
            if all(v == version for v in live):
                break
            await asyncio.sleep(0.02)
        dt = time.time() - t0
        self.m["swap"].observe(dt)
        return dt

    async def wait_version(self, replica_id: str, known: int, timeout: float = 10.0) -> dict:
        """Long-poll: returns as soon as the active version differs from ``known`` (or after ``timeout``)."""
        await self._events()
        self.replicas[replica_id] = (known, time.time())
        if self.active == known:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        row = self.db.version(self.active)
        return {"version": self.active, "name": row["name"]}

    def ack(self, replica_id: str, version: int) -> None:
        self.replicas[replica_id] = (version, time.time())

    # --- feedback and metrics ------------------------------------------------------------------
    def record(self, requests: list[tuple[str, str, float]], predictions: list[tuple[str, str | None, str]]) -> None:
        """Batched request metrics and predictions from the ingress replicas (flushed every second)."""
        for endpoint, status, seconds in requests:
            self.m["requests"].labels(endpoint, status).inc()
            self.m["latency"].labels(endpoint).observe(seconds)
        if predictions:
            self.db.remember_predictions(predictions)

    def feedback(self, request_id: str | None, domain: str | None, label: str, prediction: str | None) -> dict:
        if label not in self.cfg.class_names:
            return Problem(422, "unknown-label", f"label {label!r} is not one of {self.cfg.class_names}").as_dict()
        if request_id:
            p = self.db.prediction(request_id)
            if p is None:
                return Problem(404, "unknown-request", f"no recorded prediction for request {request_id!r}").as_dict()
            domain, prediction = domain or p["domain"], p["label"]
        if prediction is None or not domain:
            return Problem(422, "incomplete-feedback", "give request_id, or domain + label + prediction").as_dict()
        if domain not in {d["name"] for d in self.db.domains()}:
            return Problem(
                422, "unknown-domain", f"domain {domain!r} is not learned (label values stay bounded)"
            ).as_dict()
        correct, total = self.db.add_feedback(domain, prediction == label)
        return {"domain": domain, "correct": prediction == label, "feedback_accuracy": correct / total, "n": total}

    def metrics_text(self) -> bytes:
        self.m["version"].set(self.active)
        for d, a in self.db.accuracy(self.active).items():
            self.m["accuracy"].labels(d, "holdout").set(a)
        for d, a in self.db.feedback().items():
            self.m["accuracy"].labels(d, "feedback").set(a)
        return generate_latest(self.reg)


def get_or_create_controller(cfg: ServerConfig) -> ray.actor.ActorHandle:
    """The detached controller actor, created on first use."""
    return Controller.options(
        name=NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, max_restarts=-1, max_concurrency=64
    ).remote(cfg.model_dump(mode="json"))
