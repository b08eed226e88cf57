"""The peers mergeserve is compared with, on the same model: the simplest idiomatic plain Ray Serve app and
FastAPI + uvicorn in one process (no Ray).

Both run the product's own pieces, so the comparison cannot drift from what mergeserve serves: the model is
built as ``serving.engine.Engine._build`` builds it, images are decoded by :mod:`serving.archive`, and the
response is ranked by :func:`training.ranking.top_k`. ``python -m benchmarks.serve.peers SPEC`` runs the
FastAPI peer (a subprocess of ``--peers``).
"""

# No ``from __future__ import annotations`` here: FastAPI reads the peers' route annotations at run time,
# in a Serve replica too, where a class pickled by value cannot resolve annotation strings.
import json
import os
import sys
import threading
import time
import uuid

import numpy as np
from pydantic import BaseModel


class PeerRequest(BaseModel):
    """The classify body every peer takes (mergeserve's JSON shape)."""

    image: str | None = None
    images: list[str] | None = None
    top_k: int = 3

    def raws(self) -> list[bytes]:
        """The encoded images, base64 decoded as mergeserve decodes them."""
        from serving.archive import decode_b64

        if self.image is not None:
            return [decode_b64(self.image, "image")]
        return [decode_b64(s, f"images[{i}]") for i, s in enumerate(self.images or [])]


def served_model_args(backbone: str, cfg: object, active: dict) -> dict:
    """What a peer needs to build the model mergeserve serves: ``cfg`` is the server's ``ServerConfig``,
    ``active`` its active row of ``GET /v1/adapters``."""
    return {"backbone": backbone, "adapters": cfg.path("adapters"), "name": active["name"],
            "class_names": cfg.class_names, "seed": cfg.seed, "version": active["version"],
            "max_images": cfg.max_images, "max_image_pixels": cfg.max_image_pixels}


class ServedModel:
    """mergeserve's classify path without the server: the ``classify`` task and the model built as
    ``Engine._build`` builds it, :func:`serving.archive.decode_images`, ``Engine.forward``'s task batch +
    forward, and the response ranked by :func:`training.ranking.top_k`."""

    def __init__(self, m: dict) -> None:
        from serving.archive import Limits
        from training.fold import materialise, to_delta
        from training.store import AdapterStore
        from training.tasks import get_task

        self.names, self.version = m["class_names"], m["version"]
        self.limits = Limits(max_images=m["max_images"], max_image_pixels=m["max_image_pixels"])
        tensors, man = AdapterStore(m["adapters"]).load(m["name"], backbone=m["backbone"])
        self.task = get_task("classify", backbone=m["backbone"], class_names=self.names)
        self.model = materialise(self.task.build_base(m["seed"]), to_delta(tensors, man.lora))

    def decode(self, req: PeerRequest) -> np.ndarray:
        """The request's images → uint8 (N, 3, size, size)."""
        from serving.archive import decode_images

        return decode_images(req.raws(), self.task.image_size, self.limits)

    def forward(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, 3, H, W) → probabilities (N, C), as ``Engine.forward`` on CPU."""
        import torch

        with torch.inference_mode():
            batch = self.task.make_batch(self.task.samples(torch.from_numpy(images)))
            return self.task.forward(self.model, batch).numpy()

    def respond(self, req: PeerRequest, probs: np.ndarray) -> dict:
        """mergeserve's response body: the top-``k`` labels and scores of each image."""
        return respond(probs, self.names, req.top_k, req.image is not None, self.version)


def respond(probs: np.ndarray, names: list[str], k: int, single: bool, version: int) -> dict:
    """mergeserve's classify response: ``predictions`` (one image) or ``results``, ranked by ``top_k``."""
    from training.ranking import top_k

    res = [[{"label": n, "score": s} for n, s in row] for row in top_k(probs, names, k)]
    body = {"request_id": uuid.uuid4().hex, "adapter_version": version}
    return {**body, "predictions": res[0]} if single else {**body, "results": res}


def plain_serve_app(model_args: dict, max_ongoing_requests: int) -> object:
    """The plain Ray Serve peer: one deployment, FastAPI ingress, ``@serve.batch``; decode and forward inline."""
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()

    @serve.deployment(name="PlainModel", max_ongoing_requests=max_ongoing_requests)
    @serve.ingress(api)
    class PlainModel:
        def __init__(self, m: dict) -> None:
            import torch

            self.served = ServedModel(m)
            self.threads = torch.get_num_threads()

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
        async def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
            probs = self.served.forward(np.concatenate(images))
            return np.split(probs, np.cumsum([len(x) for x in images])[:-1])

        @api.get("/healthz")
        async def healthz(self) -> dict:
            return {"status": "ok"}

        @api.get("/info")
        async def info(self) -> dict:
            return {"pid": os.getpid(), "torch_threads": self.threads}

        @api.post("/v1/classify")
        async def classify(self, req: PeerRequest) -> dict:
            return self.served.respond(req, await self.predict(self.served.decode(req)))

    return PlainModel.bind(model_args)


def fastapi_app(model_args: dict) -> object:
    """The FastAPI + uvicorn peer (no Ray): a sync route, so decode + forward run in FastAPI's threadpool."""
    import torch
    from fastapi import FastAPI

    served = ServedModel(model_args)
    api = FastAPI()

    @api.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @api.get("/info")
    def info() -> dict:
        return {"pid": os.getpid(), "torch_threads": torch.get_num_threads()}

    @api.post("/v1/classify")
    def classify(req: PeerRequest) -> dict:
        return served.respond(req, served.forward(served.decode(req)))

    return api


def main(spec: dict) -> None:
    """Serve :func:`fastapi_app` on ``spec["port"]`` until stopped, or until the bench that started it dies."""
    import uvicorn

    parent = os.getppid()

    def orphaned() -> None:  # the bench died without stopping this server: stop with it
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=orphaned, daemon=True).start()
    uvicorn.run(fastapi_app(spec["model"]), host="127.0.0.1", port=spec["port"], log_level="warning",
                access_log=False)


if __name__ == "__main__":  # --peers' subprocess: `python -m benchmarks.serve.peers SPEC_JSON`
    main(json.loads(sys.argv[1]))
