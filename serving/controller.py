"""The controller: a named, detached Ray actor, a thin shell around :class:`~serving.pipeline.Pipeline`.

It owns the job queue (one job at a time), the training worker's lifetime (recreated after it dies), the
long-poll through which replicas learn of new versions, and the Prometheus registry. Replicas long-poll
:meth:`Controller.wait_version`; nothing is pushed to them, so a slow or dead replica never blocks a swap
beyond ``poll_timeout_s``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

import ray
from ray.exceptions import RayActorError

from .config import ServerConfig
from .errors import Problem
from .metrics import ServerMetrics
from .pipeline import Pipeline, Submission

NAME, NAMESPACE, WORKER = "mergeserve-controller", "mergeserve", "mergeserve-worker"
log = logging.getLogger("ray")


def _report(controller: ray.actor.ActorHandle, job_id: str, step: int, total: int, loss: float) -> None:
    controller.progress.remote(job_id, step, total, loss)


@ray.remote
class Worker:
    """The worker's Ray actor: a shell that imports torch in its own process only (the controller never does)."""

    def __init__(self, cfg: dict) -> None:
        from .worker import IngestWorker

        self.w = IngestWorker(cfg)

    def ping(self) -> bool:
        return True

    def initial(self) -> dict:
        return self.w.initial()

    def train(self, job: dict, parent: dict, progress: object) -> tuple[dict, dict]:
        return self.w.train(job, parent, progress)

    def merge(self, job: dict, parent: dict, temp: dict, version: int) -> dict:
        return self.w.merge(job, parent, temp, version)


class RemoteWorker:
    """The pipeline's worker interface over the Ray actor; recreates the actor after it died."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg, self.handle = cfg, None
        self.last_error: str | None = None

    def get(self) -> ray.actor.ActorHandle:
        if self.handle is None:
            opts = {"name": WORKER, "namespace": NAMESPACE, "max_restarts": -1, "get_if_exists": True}
            self.handle = Worker.options(num_cpus=0.5, num_gpus=self.cfg.trainer_num_gpus, **opts).remote(
                self.cfg.model_dump(mode="json")
            )
        return self.handle

    async def _call(self, what: str, method: str, *args: object) -> object:
        try:
            return await getattr(self.get(), method).remote(*args)
        except RayActorError as e:
            self.handle, self.last_error = None, f"training worker died during {what}: {type(e).__name__}"
            raise RuntimeError(self.last_error) from e

    async def train(self, job: dict, parent: dict, progress: object) -> tuple[dict, dict]:
        return await self._call("training", "train", job, parent, progress)

    async def merge(self, job: dict, parent: dict, temp: dict, version: int) -> dict:
        return await self._call("merging", "merge", job, parent, temp, version)

    async def initial(self) -> dict:
        return await self._call("start-up", "initial")

    async def health(self, timeout: float = 5.0) -> dict:
        try:
            await asyncio.wait_for(self.get().ping.remote(), timeout)
            return {"worker": "ok", "last_error": self.last_error}
        except asyncio.TimeoutError:
            return {"worker": "busy-or-starting", "last_error": self.last_error}
        except RayActorError as e:
            self.handle, self.last_error = None, f"training worker died: {type(e).__name__}"
            return {"worker": "restarting", "last_error": self.last_error}


@ray.remote(num_cpus=0)
class Controller:
    """Owns domains, jobs, adapter versions, the accuracy matrix and the worker."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = ServerConfig.model_validate(cfg)
        self.pipe = Pipeline(self.cfg)
        self.metrics = ServerMetrics()
        recovered = self.pipe.recover()
        self.metrics.jobs.labels("retried").inc(len(recovered["requeued"]))
        self.metrics.jobs.labels("failed").inc(len(recovered["gave_up"]))
        if any(recovered.values()):
            log.warning("mergeserve: recovered after a restart: %s", recovered)
        self.worker = RemoteWorker(self.cfg)
        self.replicas: dict[str, tuple[int, float]] = {}
        self.healthy = True
        self._changed: asyncio.Event | None = None
        self._work: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None
        self._accepting = asyncio.Lock()

    async def _start(self) -> None:
        if self._runner is None:
            self._changed, self._work = asyncio.Event(), asyncio.Event()
            await self.pipe.ensure_initial(self.worker)
            self._runner = asyncio.get_running_loop().create_task(self._run_jobs())

    # --- queries -------------------------------------------------------------------------------
    async def ready(self) -> dict:
        """Start-up barrier for replicas and ``/readyz``: v0 exists and the job runner is up."""
        await self._start()
        return {"active": self.pipe.active, "ingest": await self.ingest_health()}

    async def ingest_health(self) -> dict:
        h = await self.worker.health()
        self.healthy = h["worker"] == "ok"
        queued = len(self.pipe.db.jobs(("queued",)))
        return {**h, "runner": "ok" if self._runner and not self._runner.done() else "stopped", "queued": queued}

    def job(self, job_id: str) -> dict | None:
        return self.pipe.db.job(job_id)

    def domains(self) -> list[dict]:
        return self.pipe.domains_view()

    def adapters(self) -> dict:
        return self.pipe.adapters_view()

    # --- ingestion -----------------------------------------------------------------------------
    async def submit(self, s: Submission) -> dict:
        """Validate and persist a domain and its job, then queue it. Raises :class:`Problem`."""
        await self._start()
        async with self._accepting:  # one acceptance at a time: name checks and writes don't interleave
            job, replayed = await asyncio.to_thread(self.pipe.accept, s)  # hashing + fsync off the loop
        if not replayed:
            self.metrics.jobs.labels("accepted").inc()
            self._work.set()
        return {"job": job, "replayed": replayed}

    def progress(self, job_id: str, step: int, total: int, loss: float) -> None:
        self.pipe.db.update_job(job_id, step=step, total=total, loss=loss)

    async def _run_jobs(self) -> None:
        report = functools.partial(_report, ray.get_runtime_context().current_actor)
        while True:
            pending = self.pipe.db.jobs(("queued", "swapping"))
            if not pending:
                self._work.clear()
                await self._work.wait()
                continue
            job = pending[0]
            t0 = time.time()
            done = await self.pipe.run(job, self.worker, self._activate, functools.partial(report, job["id"]))
            self.metrics.jobs.labels(done["status"]).inc()
            if done["status"] != "failed" and "training" in (done["timings"] or {}):
                self.metrics.train.observe(done["timings"]["training"])
            log.info("mergeserve: job %s %s in %.1fs", job["id"], done["status"], time.time() - t0)

    # --- versions and hot swap -----------------------------------------------------------------
    async def activate(self, version: int) -> dict:
        """Roll back or forward to a stored version through the same swap path. Raises :class:`Problem`."""
        await self._start()
        row = self.pipe.db.version(version)
        if row is None:
            raise Problem(404, "unknown-version", f"no adapter version {version}")
        try:
            await asyncio.to_thread(self.pipe.store.verify, row["name"], self.cfg.backbone)
        except ValueError as e:
            raise Problem(409, "corrupt-adapter", str(e)) from e
        return {"active": version, "swap_seconds": await self._activate(version)}

    async def _activate(self, version: int) -> float:
        t0 = time.time()
        self.pipe.set_active(version)
        self._changed.set()
        self._changed = asyncio.Event()
        while time.time() - t0 < self.cfg.swap_timeout_s:
            live = [v for v, seen in self.replicas.values() if time.time() - seen < self.cfg.poll_timeout_s + 1]
            if all(v == version for v in live):
                break
            await asyncio.sleep(0.02)
        dt = time.time() - t0
        self.metrics.swap.observe(dt)
        return dt

    async def wait_version(self, replica_id: str, known: int, timeout: float | None = None) -> dict:
        """Long-poll: returns as soon as the active version differs from ``known`` (or after ``timeout``)."""
        await self._start()
        self.replicas[replica_id] = (known, time.time())
        if self.pipe.active == known:
            try:
                await asyncio.wait_for(self._changed.wait(), self.cfg.poll_timeout_s if timeout is None else timeout)
            except asyncio.TimeoutError:
                pass
        self.replicas[replica_id] = (known, time.time())
        row = self.pipe.db.version(self.pipe.active)
        return {"version": row["version"], "name": row["name"]}

    def ack(self, replica_id: str, version: int) -> None:
        self.replicas[replica_id] = (version, time.time())

    # --- feedback and metrics ------------------------------------------------------------------
    def record(self, requests: list[tuple[str, str, float]], predictions: list[tuple[str, str | None, str]]) -> int:
        """Request samples and predictions from the replicas (flushed every second); returns rows dropped."""
        self.metrics.observe_requests(requests)
        if not predictions:
            return 0
        return self.pipe.db.remember_predictions(predictions, self.cfg.prediction_retention, self.cfg.prediction_ttl_s)

    def feedback(self, request_id: str | None, domain: str | None, label: str, prediction: str | None) -> dict:
        return self.pipe.feedback(request_id, domain, label, prediction)

    def metrics_text(self) -> bytes:
        db, active = self.pipe.db, self.pipe.active
        row = db.version(active)
        return self.metrics.render(active, db.accuracy(active), db.feedback(), row["coefficients"], self.healthy)


def get_or_create_controller(cfg: ServerConfig) -> ray.actor.ActorHandle:
    """The detached controller actor, created on first use."""
    return Controller.options(
        name=NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_concurrency=64,
        resources={"node:__internal_head__": 0.001},  # on the head, beside SQLite (as Serve pins its own)
    ).remote(cfg.model_dump(mode="json"))
