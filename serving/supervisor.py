"""The training worker's supervision: one Ray actor (``Worker``) for every task's jobs, started on demand,
restarted when it dies, stopped when idle; the controller talks to it through :class:`RemoteWorker`.

The actor is the only process that imports torch on the control side: the controller never does.
"""

from __future__ import annotations

import asyncio
import logging
import time

import ray
from ray.exceptions import NodeDiedError, OutOfMemoryError, RayActorError, WorkerCrashedError

from .config import DEFAULT_TASK, ServerConfig
from .pipeline import WorkerLost

NAMESPACE, WORKER = "mergeserve", "mergeserve-worker"

log = logging.getLogger("ray")


class WorkerSlot:
    """The worker actor's handle, last error and use, shared by every task's :class:`RemoteWorker`."""

    def __init__(self) -> None:
        self.handle: ray.actor.ActorHandle | None = None
        self.last_error: str | None = None
        self.busy = 0  # calls in flight
        self.last_used = time.monotonic()
        self.released = False  # stopped for idleness (not dead): health says "idle", the next call starts it
        self.free = asyncio.Event()  # cleared while a stopped worker's name is still taken
        self.free.set()

    async def release(self, idle_s: float) -> bool:
        """Stop the worker process when nothing used it for ``idle_s`` seconds; returns whether it stopped.

        The process holds torch and the models (~1 GB); between ingests it is only a cost. The new one
        is created under the same name, so this waits until Ray has let go of the old one
        (``get_if_exists`` would otherwise hand back the dying actor).
        """
        if self.handle is None or self.busy or time.monotonic() - self.last_used < idle_s:
            return False
        h, self.handle, self.released = self.handle, None, True
        self.free.clear()
        try:
            ray.kill(h, no_restart=True)
            for _ in range(100):
                try:
                    ray.get_actor(WORKER, namespace=NAMESPACE)
                except ValueError:
                    break
                await asyncio.sleep(0.1)
        finally:
            self.free.set()
        log.info("mergeserve: training worker stopped after %.0f s idle", idle_s)
        return True


@ray.remote
class Worker:
    """The worker's Ray actor: a shell that imports torch in its own process only (the controller never does).

    One process for every task (one job runs at a time anyway; a second process would cost ~1 GB of
    memory): each task's :class:`~serving.worker.IngestWorker` is built on its first call.
    """

    def __init__(self, cfg: dict) -> None:
        self.cfg = ServerConfig.model_validate(cfg)
        self.w: dict[str, object] = {}

    def _get(self, task: str) -> object:
        if task not in self.w:
            from training.memory import release_unused_gpu_libraries

            from .worker import IngestWorker

            self.w[task] = IngestWorker(self.cfg.for_task(task))
            release_unused_gpu_libraries()  # ~370 MB of CUDA library pages on a machine without a GPU
        return self.w[task]

    def ping(self) -> bool:
        return True

    def initial(self, task: str) -> dict:
        return self._get(task).initial()

    def evaluate(self, task: str, name: str, domains: list[str]) -> dict[str, float]:
        return self._get(task).evaluate(name, domains)

    def run(self, task: str, job: dict, parent: dict, version: int, progress: object, phase: object) -> dict:
        from training.memory import trim_heap

        try:
            return self._get(task).run(job, parent, version, progress, phase)
        finally:
            trim_heap()  # the job's activations go back to the system, not to an idle process's heap


class RemoteWorker:
    """One task's worker interface over the shared Ray actor; recreates the actor after it died.

    Every task's interface holds the same :class:`WorkerSlot`, so a handle replaced after a death is the one
    all tasks use next (a stale handle would fail the other task's next job for nothing).
    """

    def __init__(self, cfg: ServerConfig, task: str = DEFAULT_TASK, slot: WorkerSlot | None = None) -> None:
        self.cfg, self.task, self.slot = cfg, task, slot or WorkerSlot()

    @property
    def handle(self) -> ray.actor.ActorHandle | None:
        return self.slot.handle

    @handle.setter
    def handle(self, h: ray.actor.ActorHandle | None) -> None:
        self.slot.handle = h

    @property
    def last_error(self) -> str | None:
        return self.slot.last_error

    @last_error.setter
    def last_error(self, e: str | None) -> None:
        self.slot.last_error = e

    def get(self) -> ray.actor.ActorHandle:
        if self.handle is None:
            self.slot.released = False
            opts = {"name": WORKER, "namespace": NAMESPACE, "max_restarts": -1, "get_if_exists": True}
            self.handle = Worker.options(num_cpus=0.5, num_gpus=self.cfg.trainer_num_gpus, **opts).remote(
                self.cfg.model_dump(mode="json")
            )
        return self.handle

    async def _call(self, what: str, method: str, *args: object) -> object:
        self.slot.busy += 1
        try:
            await self.slot.free.wait()
            return await getattr(self.get(), method).remote(self.task, *args)
        except (RayActorError, WorkerCrashedError, NodeDiedError, OutOfMemoryError) as e:
            self.handle, self.last_error = None, f"training worker died during {what}: {type(e).__name__}"
            raise WorkerLost(self.last_error) from e
        finally:
            self.slot.busy -= 1
            self.slot.last_used = time.monotonic()

    async def run(self, job: dict, parent: dict, version: int, progress: object, phase: object) -> dict:
        return await self._call("a job", "run", job, parent, version, progress, phase)

    async def initial(self) -> dict:
        return await self._call("start-up", "initial")

    async def evaluate(self, name: str, domains: list[str]) -> dict[str, float]:
        return await self._call("an evaluation", "evaluate", name, domains)

    async def health(self, timeout: float = 5.0) -> dict:
        """``worker``: ``idle`` (stopped on purpose), ``busy`` (a call in flight), ``ok`` (answered a ping),
        ``busy-or-starting`` (no answer within ``timeout``) or ``restarting`` (it died)."""
        if self.handle is None and self.slot.released:
            return {"worker": "idle", "last_error": self.last_error}  # stopped on purpose; starts on demand
        if self.slot.busy:
            # the actor runs one call at a time: a ping would wait for the training run (and /readyz with
            # it: 5 s per probe, longer than a Kubernetes probe's 1 s). A worker that dies fails that call,
            # which records it, so the call in flight is the liveness signal
            return {"worker": "busy", "last_error": self.last_error}
        try:
            await asyncio.wait_for(self.get().ping.remote(), timeout)
            return {"worker": "ok", "last_error": self.last_error}
        except asyncio.TimeoutError:
            return {"worker": "busy-or-starting", "last_error": self.last_error}
        except RayActorError as e:
            self.handle, self.last_error = None, f"training worker died: {type(e).__name__}"
            return {"worker": "restarting", "last_error": self.last_error}
