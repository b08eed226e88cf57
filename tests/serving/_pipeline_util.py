"""Drive the ingest pipeline without Ray: a local worker and synthetic domains."""

from __future__ import annotations

import asyncio

import numpy as np
from _util import server_config

from serving.config import ServerConfig
from serving.pipeline import Pipeline, Submission
from serving.worker import IngestWorker


def config(data_dir: str, **over) -> ServerConfig:
    """The HTTP tests' server config, with more training steps (domains here are larger) and no token."""
    base = {**server_config(data_dir), "train": {"steps": 20, "batch_size": 16, "lr": 0.05}, "auth_token": None}
    return ServerConfig.model_validate({**base, **over})


def arrays(seed: int, n: int = 60, shift: int = 0, relabel: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Separable classes: a bright band per class; ``relabel`` rotates the labels (a conflicting domain)."""
    rng = np.random.RandomState(seed)
    y = np.arange(n) % 3
    x = rng.randint(0, 60, (n, 3, 32, 32)).astype(np.uint8)
    for i, c in enumerate(y):
        x[i, (c + shift) % 3, 8 * c : 8 * c + 8] = 250
    return x, ((y + relabel) % 3).astype(np.int64)


def submission(name: str, seed: int = 0, method: str = "pam", **kw) -> Submission:
    x, y = arrays(seed, shift=kw.pop("shift", 0), relabel=kw.pop("relabel", 0))
    return Submission(name, method, kw.pop("hyper", {}), kw.pop("key", None), x, y)


class LocalWorker:
    """The worker interface over an in-process :class:`IngestWorker` (methods run in a thread)."""

    def __init__(self, cfg: ServerConfig, cls: type[IngestWorker] = IngestWorker) -> None:
        self.w = cls(cfg)

    async def run(self, job: dict, parent: dict, version: int, progress: object, phase: object) -> dict:
        return await asyncio.to_thread(self.w.run, job, parent, version, progress, phase)

    async def initial(self) -> dict:
        return await asyncio.to_thread(self.w.initial)


def activate_fn(pipe: Pipeline):
    async def activate(version: int) -> float:
        pipe.set_active(version)
        return 0.0

    return activate


def run_all(pipe: Pipeline, worker) -> list[dict]:
    """Run every pending job (queued or swapping) in order; returns the final job rows."""

    async def go() -> list[dict]:
        await pipe.ensure_initial(worker)
        done = []
        while pending := pipe.db.jobs(("queued", "swapping")):
            done.append(await pipe.run(pending[0], worker, activate_fn(pipe), lambda *a: None))
        return done

    return asyncio.run(go())


def task_submission(task: str, name: str, seed: int = 0, method: str = "pam", **kw) -> Submission:
    """A small domain for ``task``: separable images (classify) or scenes of one question family (vqa)."""
    if task == "classify":
        return submission(name, seed, method, **kw)
    from training.data.scenes import make_family

    s = make_family(kw.pop("family", "count"), 30, seed=seed)
    return Submission(name, method, kw.pop("hyper", {}), kw.pop("key", None), s.images.numpy(), s.answers.numpy(),
                      questions=list(s.questions), task=task)
