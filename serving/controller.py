"""The controller: a named, detached Ray actor, a thin shell around :class:`~serving.pipeline.Pipeline`.

It owns the job queue (one job at a time), the training worker's lifetime (recreated after it dies), the
long-poll through which replicas learn of new versions, and the Prometheus registry. Replicas long-poll
:meth:`Controller.wait_version`; nothing is pushed to them, so a slow or dead replica never blocks a swap
beyond ``poll_timeout_s``.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import time
from collections.abc import Callable, Coroutine

import ray

from . import canary, versions
from .config import DEFAULT_TASK, ServerConfig
from .errors import Problem
from .metrics import ServerMetrics, TaskState
from .pipeline import Pipeline, Submission
from .supervisor import NAMESPACE, WORKER, RemoteWorker, WorkerSlot  # noqa: F401  (NAMESPACE, WORKER: re-exported)

NAME = "mergeserve-controller"


def encode_cursor(*key: float | int | str) -> str:
    """An opaque page cursor: the sort key of a page's last row (a job's ``(created, id)``, a domain's
    ``(created, name)``, a version's ``(version,)``)."""
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, shape: tuple[type, ...] = (float, str)) -> tuple:
    """Inverse of :func:`encode_cursor` for a key of types ``shape``. Raises: Problem 422 ``bad-cursor``."""
    try:
        key = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(key, list) or len(key) != len(shape) or any(isinstance(k, (list, dict)) for k in key):
            raise ValueError(key)
        return tuple(t(k) for t, k in zip(shape, key))
    except (ValueError, TypeError) as e:
        raise Problem(422, "bad-cursor", "cursor is not one this route returned as next_cursor") from e


def page(rows: list[dict], limit: int, key: Callable[[dict], tuple]) -> tuple[list[dict], str | None]:
    """The first ``limit`` of ``rows`` (fetched with one more, to know) and the cursor after them, or None."""
    return rows[:limit], encode_cursor(*key(rows[limit - 1])) if len(rows) > limit else None


log = logging.getLogger("ray")


def _report(controller: ray.actor.ActorHandle, task: str, job_id: str, step: int, total: int, loss: float) -> None:
    controller.progress.remote(task, job_id, step, total, loss)


def _phase(controller: ray.actor.ActorHandle, task: str, job_id: str, status: str) -> None:
    controller.phase.remote(task, job_id, status)


class Lineage:
    """One task's pipeline, worker interface, replicas and swap signal (the controller holds one per task)."""

    def __init__(self, cfg: ServerConfig, slot: WorkerSlot) -> None:
        self.cfg = cfg
        self.pipe = Pipeline(cfg)
        self.worker = RemoteWorker(cfg, cfg.task, slot)
        self.replicas: dict[str, tuple[int, float]] = {}  # replica id -> (version it serves, last seen)
        self.changed: asyncio.Event | None = None
        self.work: asyncio.Event | None = None
        self.runner: asyncio.Task | None = None


@ray.remote(num_cpus=0)
class Controller:
    """Owns domains, jobs, adapter versions, the accuracy matrix and the worker, per task.

    Every method takes ``task`` (default ``classify``, so clients of the single-task API keep working);
    each task has its own lineage under its own data directory (:meth:`ServerConfig.for_task`).
    """

    def __init__(self, cfg: dict) -> None:
        self.cfg = ServerConfig.model_validate(cfg)
        self.metrics = ServerMetrics(tuple(self.cfg.tasks_held()))
        self.lines: dict[str, Lineage] = {}
        self.slot = slot = WorkerSlot()  # one worker actor for every task
        self._reaper: asyncio.Task | None = None
        for task in self.cfg.tasks_held():
            line = self.lines[task] = Lineage(self.cfg.for_task(task), slot)
            recovered = line.pipe.recover()
            self.metrics.jobs.labels(task, "retried").inc(len(recovered["requeued"]))
            self.metrics.jobs.labels(task, "failed").inc(len(recovered["gave_up"]))
            if any(recovered.values()):
                log.warning("mergeserve: %s recovered after a restart: %s", task, recovered)
        self.healthy = True
        self._accepting = asyncio.Lock()
        self._background: set[asyncio.Task] = set()  # what _spawn runs, kept from the garbage collector

    def _line(self, task: str) -> Lineage:
        if task not in self.lines:
            raise Problem(422, "unknown-task", f"unknown task {task!r}; this server holds {list(self.lines)}")
        return self.lines[task]

    async def _start(self, task: str = DEFAULT_TASK) -> Lineage:
        line = self._line(task)
        if self._reaper is None and self.cfg.worker_idle_s > 0:
            self._reaper = asyncio.get_running_loop().create_task(self._reap())
        if line.runner is None:
            line.changed, line.work = asyncio.Event(), asyncio.Event()
            await line.pipe.ensure_initial(line.worker)
            line.runner = asyncio.get_running_loop().create_task(self._run_jobs(task))
        return line

    # --- queries -------------------------------------------------------------------------------
    async def ready(self, task: str = DEFAULT_TASK) -> dict:
        """Start-up barrier for replicas and ``/readyz``: v0 exists and the job runner is up."""
        line = await self._start(task)
        return {"active": line.pipe.active, "ingest": await self.ingest_health(task)}

    async def ingest_health(self, task: str = DEFAULT_TASK) -> dict:
        line = self._line(task)
        h = await line.worker.health()
        self.healthy = h["worker"] in ("ok", "idle", "busy")
        queued = len(line.pipe.db.jobs(("queued",)))
        return {**h, "runner": "ok" if line.runner and not line.runner.done() else "stopped", "queued": queued}

    async def release_idle_worker(self, idle_s: float | None = None) -> bool:
        """Stop the training worker if it has been idle ``idle_s`` seconds (default ``worker_idle_s``)."""
        return await self.slot.release(self.cfg.worker_idle_s if idle_s is None else idle_s)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(self.cfg.worker_idle_s, 5.0))
            try:
                await self.release_idle_worker()
            except Exception:  # a failed kill must not end the loop; the next tick tries again
                log.exception("mergeserve: stopping the idle training worker failed")

    def job(self, job_id: str) -> dict | None:
        """A job of any task (ids are unique across tasks); its row says which task."""
        for task, line in self.lines.items():
            if (j := line.pipe.db.job(job_id)) is not None:
                return {**j, "task": task}
        return None

    def jobs(self, limit: int = 20, cursor: str | None = None, task: str | None = None) -> dict:
        """Jobs of every task (or of ``task``), newest first: ``{"jobs": [...], "next_cursor": str | None}``.

        Raises:
            Problem: 422 for a cursor this server did not hand out.
        """
        before = decode_cursor(cursor) if cursor else None
        lines = [self._line(task)] if task else list(self.lines.values())
        rows = [{**j, "task": line.cfg.task} for line in lines for j in line.pipe.db.job_page(limit + 1, before)]
        rows.sort(key=lambda j: (j["created"], j["id"]), reverse=True)
        jobs, cursor = page(rows, limit, lambda j: (j["created"], j["id"]))
        return {"jobs": jobs, "next_cursor": cursor}

    def domains(self, task: str = DEFAULT_TASK) -> list[dict]:
        return self._line(task).pipe.domains_view()

    def domain_page(self, task: str = DEFAULT_TASK, limit: int = 100, cursor: str | None = None) -> dict:
        """Learned domains in learning order, ``limit`` at a time: ``{"domains", "next_cursor"}``.

        Raises:
            Problem: 422 ``bad-cursor`` for a cursor this route did not hand out.
        """
        after = decode_cursor(cursor) if cursor else None
        rows = self._line(task).pipe.domains_view(limit + 1, after)
        domains, nxt = page(rows, limit, lambda d: (d["created"], d["name"]))
        return {"domains": domains, "next_cursor": nxt}

    def adapters(self, task: str = DEFAULT_TASK, limit: int | None = None, cursor: str | None = None) -> dict:
        """The active version and the stored versions, oldest first; all of them, or ``limit`` at a time
        (``next_cursor``: the page after; None on the last).

        Raises:
            Problem: 422 ``bad-cursor`` for a cursor this route did not hand out.
        """
        pipe = self._line(task).pipe
        if limit is None:
            return {**pipe.adapters_view(), "next_cursor": None}
        after = decode_cursor(cursor, (int,))[0] if cursor else None
        view = pipe.adapters_view(limit + 1, after)
        versions, nxt = page(view["versions"], limit, lambda v: (v["version"],))
        return {**view, "versions": versions, "next_cursor": nxt}  # the canary and its history too

    def adapter(self, version: int, task: str = DEFAULT_TASK) -> dict | None:
        """One stored version's row (name, method, domains, ...); None when there is none."""
        return self._line(task).pipe.db.version(version)

    async def labels(self, task: str = DEFAULT_TASK) -> list[str]:
        """The task's class names or answer vocabulary (recorded with its v0)."""
        return (await self._start(task)).pipe.labels

    async def tasks(self) -> list[dict]:
        """Every task: its model, labels, active version and domains (``GET /v1/tasks``)."""
        out = []
        for task, line in self.lines.items():
            await self._start(task)
            p = line.pipe
            out.append({"name": task, "model": line.cfg.backbone, "labels": p.labels, "active_version": p.active,
                        "domains": p.db.domain_names(), "default_method": line.cfg.default_method})
        return out

    # --- ingestion -----------------------------------------------------------------------------
    async def submit(self, s: Submission) -> dict:
        """Validate and persist a domain and its job, then queue it. Raises :class:`Problem`."""
        line = await self._start(s.task)
        async with self._accepting:  # one acceptance at a time: name checks and writes don't interleave
            job, replayed = await asyncio.to_thread(line.pipe.accept, s)  # hashing + fsync off the loop
        if not replayed:
            self.metrics.jobs.labels(s.task, "accepted").inc()
            line.work.set()
        return {"job": {**job, "task": s.task}, "replayed": replayed}

    def progress(self, task: str, job_id: str, step: int, total: int, loss: float) -> None:
        self._line(task).pipe.db.update_job(job_id, step=step, total=total, loss=loss)

    def phase(self, task: str, job_id: str, status: str) -> None:
        """The worker moved a job on (``merging`` once training is done)."""
        self._line(task).pipe.db.update_job(job_id, status=status)

    async def _run_jobs(self, task: str) -> None:
        line = self.lines[task]
        me = ray.get_runtime_context().current_actor
        report, phase = functools.partial(_report, me, task), functools.partial(_phase, me, task)
        while True:
            pending = line.pipe.db.jobs(("queued", "swapping"))
            if not pending:
                line.work.clear()
                await line.work.wait()
                continue
            job = pending[0]
            t0 = time.time()
            activate = functools.partial(self._activate_learned, task)
            done = await line.pipe.run(job, line.worker, activate, functools.partial(report, job["id"]),
                                       functools.partial(phase, job["id"]))
            self.metrics.jobs.labels(task, done["status"]).inc()
            if done["status"] != "failed" and "training" in (done["timings"] or {}):
                self.metrics.train.labels(task).observe(done["timings"]["training"])
            log.info("mergeserve: %s job %s %s in %.1fs", task, job["id"], done["status"], time.time() - t0)

    # --- versions and hot swap -----------------------------------------------------------------
    async def activate(self, version: int, task: str = DEFAULT_TASK, traffic: float = 1.0,
                       promote_when: dict | None = None) -> dict:
        """Roll back or forward to a stored version through the same swap path; with ``traffic`` below 1, make
        it a canary instead, beside the active version (``promote_when``: decided by live feedback).

        Raises:
            Problem: 404 unknown version, 409 corrupt adapter, 409 ``already-active`` (a canary of the active one).
        """
        line = await self._start(task)
        row = line.pipe.db.version(version)
        if row is None:
            raise Problem(404, "unknown-version", f"no {task} adapter version {version}")
        try:
            await asyncio.to_thread(line.pipe.store.verify, row["name"], line.cfg.backbone)
        except ValueError as e:
            raise Problem(409, "corrupt-adapter", str(e)) from e
        if traffic < 1:
            state = canary.start(line.pipe, version, traffic, promote_when)
            dt = await self._publish(task, lambda served: served[1] == version)
            return {"active": line.pipe.active, "swap_seconds": dt, "canary": state}
        if (running := canary.current(line.pipe)) is not None:
            canary.end(line.pipe, "promoted" if running["version"] == version else "stopped")
        return {"active": version, "swap_seconds": await self._activate(task, version), "canary": None}

    async def end_canary(self, task: str = DEFAULT_TASK) -> dict:
        """Stop the running canary: every request goes to the active version again."""
        line = await self._start(task)
        done = canary.end(line.pipe, "stopped")
        if done is None:
            raise Problem(404, "no-canary", f"no {task} canary is running")
        await self._publish(task, lambda served: served[1] is None)
        return done

    async def delete(self, version: int, task: str = DEFAULT_TASK) -> dict:
        """Delete a version a rollback cannot need. Raises :class:`Problem` (404, 409 ``version-protected``)."""
        line = await self._start(task)
        async with self._accepting:  # not beside an acceptance or a job's record
            return versions.delete(line.pipe, version)

    async def import_adapter(self, tensors: dict, fmt: str, lora: dict, task: str = DEFAULT_TASK) -> dict:
        """Record an adapter trained elsewhere (numpy arrays, checked by the replica) as an inactive version,
        then have the worker measure it on every learned domain (in the background)."""
        line = await self._start(task)
        async with self._accepting:
            row = await asyncio.to_thread(versions.record_import, line.pipe, tensors, fmt, lora, line.cfg.backbone)
        domains = [d["name"] for d in line.pipe.db.domains()]
        self._spawn(self._evaluate(line, row, domains))
        return {**row, "accuracy": {}, "active": False}

    async def _evaluate(self, line: Lineage, row: dict, domains: list[str]) -> None:
        try:
            line.pipe.db.set_accuracy(row["version"], await line.worker.evaluate(row["name"], domains))
        except Exception:  # noqa: BLE001 - the version stays, without numbers; the log says why
            log.exception("mergeserve: evaluating imported v%s failed", row["version"])

    async def _activate(self, task: str, version: int) -> float:
        line = self.lines[task]
        line.pipe.set_active(version)
        dt = await self._publish(task, lambda served: served[0] == version)
        self.metrics.swap.labels(task).observe(dt)
        return dt

    async def _activate_learned(self, task: str, version: int) -> float:
        """A job's new version becomes the active one. A running canary ends ``superseded``: it was judged against
        the version this one replaces, and promoting it later would drop the domain the job just learned."""
        line = self.lines[task]
        if (running := canary.current(line.pipe)) is not None:
            judged = canary.judge(line.pipe)
            canary.end(line.pipe, "superseded", judged[1] if judged else None, superseded_by=version)
            log.info("mergeserve: %s canary v%s superseded by v%s", task, running["version"], version)
        return await self._activate(task, version)

    async def _publish(self, task: str, done: Callable[[tuple], bool]) -> float:
        """Wake every replica's long-poll and wait (``swap_timeout_s`` at most) until each live one serves what
        ``done`` wants of its ``(active, canary)``; returns the seconds it took."""
        line, t0 = self.lines[task], time.time()
        line.changed.set()
        line.changed = asyncio.Event()
        while time.time() - t0 < self.cfg.swap_timeout_s:
            live = [s for s, seen in line.replicas.values() if time.time() - seen < self.cfg.poll_timeout_s + 1]
            if all(done(s) for s in live):
                break
            await asyncio.sleep(0.02)
        return time.time() - t0

    @staticmethod
    def _serving(line: Lineage) -> tuple[dict, dict | None]:
        return line.pipe.db.version(line.pipe.active), canary.current(line.pipe)

    async def wait_version(self, replica_id: str, known: int, timeout: float | None = None,
                           task: str = DEFAULT_TASK, known_canary: int | None = None) -> dict:
        """Long-poll: returns as soon as what replicas should serve (the active version, and the canary's
        candidate if any) differs from what this one serves (``known``, ``known_canary``), or after ``timeout``.

        Returns:
            ``{"version", "name", "canary": {"version", "name", "traffic"} | None}``.
        """
        line = await self._start(task)
        served = (known, known_canary)
        line.replicas[replica_id] = (served, time.time())
        row, c = self._serving(line)
        if (row["version"], c and c["version"]) == served:
            try:
                await asyncio.wait_for(line.changed.wait(), self.cfg.poll_timeout_s if timeout is None else timeout)
            except asyncio.TimeoutError:
                pass
        line.replicas[replica_id] = (served, time.time())
        row, c = self._serving(line)
        cand = {k: c[k] for k in ("version", "name", "traffic")} if c else None
        return {"version": row["version"], "name": row["name"], "canary": cand}

    def ack(self, replica_id: str, version: int, task: str = DEFAULT_TASK, canary_version: int | None = None) -> None:
        self._line(task).replicas[replica_id] = ((version, canary_version), time.time())

    # --- feedback and metrics ------------------------------------------------------------------
    def record(self, requests: list[tuple[str, str, float]], predictions: list[tuple]) -> int:
        """Request samples and predictions ``(request_id, domain, label, task[, version])`` from the replicas
        (flushed every second); returns rows dropped."""
        self.metrics.observe_requests(requests)
        by_task: dict[str, list] = {}
        for rid, domain, label, task, *version in predictions:
            by_task.setdefault(task, []).append((rid, domain, label, version[0] if version else None))
        dropped = 0
        for task, rows in by_task.items():
            if task in self.lines:
                dropped += self.lines[task].pipe.db.remember_predictions(
                    rows, self.cfg.prediction_retention, self.cfg.prediction_ttl_s)
        return dropped

    async def feedback(self, request_id: str | None, domain: str | None, label: str, prediction: str | None,
                       task: str | None = None) -> dict:
        """Feedback for a prediction; with a ``request_id`` and no ``task`` the task that served it is found.
        Counted in ``mergeserve_feedback_total`` once per ``request_id`` (a replay counts nothing); a canary
        with ``promote_when`` is judged on it (``canary.judge``) and promoted or rolled back in the background."""
        if task is None:
            found = (t for t, line in self.lines.items() if request_id and line.pipe.db.prediction(request_id))
            task = next(found, DEFAULT_TASK)
        line = self._line(task)
        res = line.pipe.feedback(request_id, domain, label, prediction)
        if not res["replayed"]:
            self.metrics.count_feedback(task, res["domain"], res["version"], res["correct"])
            self._decide_canary(task, line)
        return {**res, "task": task}

    def _decide_canary(self, task: str, line: Lineage) -> None:
        """End a canary its live feedback has decided: the history keeps the numbers, then the replicas follow
        (promoted: the candidate becomes the active version; rolled back: every request to the active one)."""
        judged = canary.judge(line.pipe)
        if judged is None or judged[0] is None:
            return
        decision, numbers = judged
        done = canary.end(line.pipe, decision, numbers)  # at once, so the next feedback finds no canary
        log.info("mergeserve: %s canary v%s %s on live feedback: %s", task, done["version"], decision, numbers)
        if decision == "promoted":
            self._spawn(self._activate(task, done["version"]))
        else:
            self._spawn(self._publish(task, lambda served: served[1] is None))

    def _spawn(self, work: Coroutine) -> None:
        """Run ``work`` in the background, referenced until it ends (the loop keeps only weak references)."""
        job = asyncio.get_running_loop().create_task(work)
        self._background.add(job)
        job.add_done_callback(self._background.discard)

    def metrics_text(self) -> bytes:
        states = {}
        for task, line in self.lines.items():
            st = task_state(line.pipe)
            if st is not None:
                states[task] = st
        return self.metrics.render(states, self.healthy)


def task_state(pipe: Pipeline, now: float | None = None) -> TaskState | None:
    """What one task's gauges show (None before its v0 exists): accuracy of the active version and what it
    lost against its parent, feedback accuracy, the queue and how long the running job has been silent."""
    db, active, now = pipe.db, pipe.active, time.time() if now is None else now
    row = db.version(active)
    if row is None:
        return None
    holdout = db.accuracy(active)
    parent = db.accuracy(row["parent"]) if row["parent"] is not None else {}
    queued = db.jobs(("queued",))
    running = db.jobs(("training", "merging", "swapping"))
    c = canary.current(pipe)
    return TaskState(
        active=active, holdout=holdout, feedback=db.feedback(), coefficients=row["coefficients"] or {},
        parent=row["parent"], drop={d: round(parent[d] - a, 6) for d, a in holdout.items() if d in parent},
        queued=len(queued), oldest_queued_s=now - queued[0]["created"] if queued else 0.0,
        stalled_s=max(now - j["updated"] for j in running) if running else 0.0,
        canary=(c["version"], c["traffic"]) if c else None,
    )


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
