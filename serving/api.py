"""The HTTP API: a FastAPI app behind ``@serve.ingress``; errors are RFC 9457 problem+json."""

import base64
import binascii
import io
import json
import threading
import time
import uuid

import numpy as np
import ray
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from ray import serve
from starlette.datastructures import UploadFile

from training.backbones import get_spec

from .archive import BadUpload, Limits, read_domain, read_source
from .config import ServerConfig
from .controller import NAME, NAMESPACE, Problem

PROBLEM = "application/problem+json"
api = FastAPI(
    title="mergeserve",
    version="0.1.0",
    description="Inference with a continually merged global LoRA adapter; online domain ingestion.",
)


def problem(request: Request, status: int, code: str, detail: str) -> JSONResponse:
    rid = getattr(request.state, "request_id", None) or uuid.uuid4().hex
    body = {
        "type": f"https://mergeserve.dev/problems/{code}",
        "title": code.replace("-", " ").capitalize(),
        "status": status,
        "detail": detail,
        "request_id": rid,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM)  # Serve's proxy echoes X-Request-ID


@api.exception_handler(Problem)
async def _problem(request: Request, e: Problem) -> JSONResponse:
    return problem(request, e.status, e.code, e.detail)


@api.exception_handler(BadUpload)
async def _bad_upload(request: Request, e: BadUpload) -> JSONResponse:
    return problem(request, 413 if e.code == "too-large" else 422, e.code, e.detail)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    return problem(request, 422, "invalid-request", str(e.errors())[:1000])


@api.exception_handler(Exception)
async def _internal(request: Request, e: Exception) -> JSONResponse:
    return problem(request, 500, "internal-error", f"{type(e).__name__}: {e}"[:500])


@api.exception_handler(404)
async def _not_found(request: Request, e: Exception) -> JSONResponse:
    return problem(request, 404, "not-found", f"no route {request.url.path}")


def _decode_image(raw: bytes, size: int, what: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(raw)) as im:
            return np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
    except (UnidentifiedImageError, OSError) as e:
        raise Problem(422, "bad-image", f"{what} is not a decodable image") from e


def _b64(s: object, what: str) -> bytes:
    if not isinstance(s, str):
        raise Problem(422, "bad-image", f"{what} must be a base64 string")
    try:
        return base64.b64decode(s.split(",", 1)[-1], validate=True)
    except (binascii.Error, ValueError) as e:
        raise Problem(422, "bad-image", f"{what} is not valid base64") from e


class Metrics:
    """Request counts, latencies and predictions, flushed to the controller every second (thread-safe)."""

    def __init__(self, controller: ray.actor.ActorHandle) -> None:
        self.controller, self.lock = controller, threading.Lock()
        self.requests: list = []
        self.predictions: list = []
        threading.Thread(target=self._loop, daemon=True).start()

    def add(self, endpoint: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests.append((endpoint, str(status), seconds))

    def predicted(self, rid: str, domain: str | None, label: str) -> None:
        with self.lock:
            self.predictions.append((rid, domain, label))

    def flush(self) -> ray.ObjectRef | None:
        with self.lock:
            req, pred, self.requests, self.predictions = self.requests, self.predictions, [], []
        return self.controller.record.remote(req, pred) if req or pred else None

    def _loop(self) -> None:
        while True:
            time.sleep(1.0)
            try:
                ref = self.flush()
                if ref is not None:
                    ray.get(ref)
            except Exception:  # noqa: BLE001 - controller restarting; these samples are dropped
                pass


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """Owns the HTTP API; forwards inference to the model deployment and state calls to the controller."""

    def __init__(self, model: serve.handle.DeploymentHandle, cfg: dict) -> None:
        self.model, self.cfg = model, ServerConfig.model_validate(cfg)
        self.size = get_spec(self.cfg.backbone).img_size
        self.controller = ray.get_actor(NAME, namespace=NAMESPACE)
        self.metrics = Metrics(self.controller)
        self.limits = Limits()

        @api.middleware("http")
        async def request_id(request: Request, call_next):  # noqa: ANN001, ANN202
            # Serve's proxy honours a client X-Request-ID (or makes one), passes it here and echoes it back
            rid = request.headers.get("x-request-id") or uuid.uuid4().hex
            request.state.request_id = rid[:128]
            t0 = time.perf_counter()
            response = await call_next(request)
            route = request.scope.get("route")
            self.metrics.add(getattr(route, "path", "unmatched"), response.status_code, time.perf_counter() - t0)
            return response

    # --- helpers -------------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        token = self.cfg.auth_token
        if token and request.headers.get("authorization") != f"Bearer {token}":
            raise Problem(401, "unauthorized", "this endpoint needs 'Authorization: Bearer <token>'")

    async def _body(self, request: Request) -> bytes:
        n = request.headers.get("content-length")
        if n and n.isdigit() and int(n) > self.cfg.max_upload_bytes:
            raise Problem(413, "too-large", f"request body exceeds {self.cfg.max_upload_bytes} bytes")
        body = await request.body()
        if len(body) > self.cfg.max_upload_bytes:
            raise Problem(413, "too-large", f"request body exceeds {self.cfg.max_upload_bytes} bytes")
        return body

    async def _json(self, request: Request) -> dict:
        try:
            data = json.loads(await self._body(request) or b"null")
        except json.JSONDecodeError as e:
            raise Problem(400, "bad-json", f"body is not valid JSON: {e.msg}") from e
        if not isinstance(data, dict):
            raise Problem(400, "bad-json", "body must be a JSON object")
        return data

    def _state(self, res: dict) -> dict:
        if "problem" in res:
            p = res["problem"]
            raise Problem(p["status"], p["code"], p["detail"])
        return res

    # --- routes --------------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self, request: Request) -> JSONResponse:
        try:
            ctrl = await self.controller.ready.remote()
            rep = await self.model.ready.remote()
        except Exception as e:  # noqa: BLE001
            return problem(request, 503, "not-ready", f"{type(e).__name__}: {e}"[:500])
        return JSONResponse({"status": "ready", "active_version": ctrl["active"], "replica": rep})

    @api.post("/v1/classify")
    async def classify(self, request: Request) -> dict:
        rid = request.state.request_id
        ctype = request.headers.get("content-type", "")
        domain, k = None, 3
        if ctype.startswith("multipart/form-data"):
            await self._body(request)
            form = await request.form()
            files = [v for v in form.values() if isinstance(v, UploadFile)]
            arrays = [_decode_image(await f.read(), self.size, f"file {f.filename!r}") for f in files]
            domain = form.get("domain") if isinstance(form.get("domain"), str) else None
            single = len(arrays) == 1
        else:
            data = await self._json(request)
            domain, k = data.get("domain"), data.get("top_k", 3)
            if "image" in data:
                arrays, single = [_decode_image(_b64(data["image"], "image"), self.size, "image")], True
            elif isinstance(data.get("images"), list):
                arrays = [
                    _decode_image(_b64(s, f"images[{i}]"), self.size, f"images[{i}]")
                    for i, s in enumerate(data["images"])
                ]
                single = False
            else:
                raise Problem(422, "no-image", "send {'image': base64} or {'images': [base64, ...]} or multipart files")
        if not arrays:
            raise Problem(422, "no-image", "no image in the request")
        if len(arrays) > 256:
            raise Problem(413, "too-large", "at most 256 images per request")
        if not isinstance(k, int) or not 1 <= k <= len(self.cfg.class_names):
            raise Problem(422, "bad-top-k", f"top_k must be an integer in [1, {len(self.cfg.class_names)}]")
        if domain is not None and not isinstance(domain, str):
            raise Problem(422, "bad-domain", "domain must be a string")
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        probs, version = await self.model.classify.remote(x)
        top = probs.topk(k, dim=-1)
        results = [
            [{"label": self.cfg.class_names[int(i)], "score": round(float(s), 6)} for s, i in zip(ss, ii)]
            for ss, ii in zip(top.values, top.indices)
        ]
        for j, r in enumerate(results):
            self.metrics.predicted(rid if single else f"{rid}:{j}", domain, r[0]["label"])
        body = {"request_id": rid, "adapter_version": version}
        return {**body, "predictions": results[0]} if single else {**body, "results": results}

    @api.post("/v1/domains", status_code=202)
    async def ingest(self, request: Request) -> JSONResponse:
        self._auth(request)
        ctype = request.headers.get("content-type", "")
        hyper: dict = {}
        if ctype.startswith("multipart/form-data"):
            await self._body(request)
            form = await request.form()
            name, archive = form.get("name"), form.get("archive")
            if not isinstance(archive, UploadFile):
                raise Problem(422, "no-archive", "multipart upload needs a file field 'archive'")
            method, frac = form.get("method"), form.get("heldout_fraction")
            if isinstance(form.get("hyper"), str):
                try:
                    hyper = json.loads(form.get("hyper"))
                except json.JSONDecodeError as e:
                    raise Problem(422, "bad-hyper-parameter", "field 'hyper' must be a JSON object") from e
            x, y = read_domain(await archive.read(), self.cfg.class_names, self.size, self.limits)
        else:
            data = await self._json(request)
            name, method, frac, hyper = (
                data.get("name"),
                data.get("method"),
                data.get("heldout_fraction"),
                data.get("hyper", {}),
            )
            if not isinstance(data.get("source"), str):
                raise Problem(422, "no-source", "JSON ingestion needs 'source' (a file:// URI); or upload an archive")
            x, y = read_source(data["source"], self.cfg.class_names, self.size, self.limits)
        if not isinstance(name, str):
            raise Problem(422, "invalid-domain-name", "field 'name' is required")
        if not isinstance(hyper, dict):
            raise Problem(422, "bad-hyper-parameter", "'hyper' must be an object")
        try:
            frac = None if frac in (None, "") else float(frac)
        except (TypeError, ValueError) as e:
            raise Problem(422, "bad-heldout-fraction", "heldout_fraction must be a number in (0, 1)") from e
        if frac is not None and not 0 < frac < 1:
            raise Problem(422, "bad-heldout-fraction", "heldout_fraction must be in (0, 1)")
        res = self._state(
            await self.controller.submit.remote(
                name,
                method if isinstance(method, str) else None,
                hyper,
                request.headers.get("idempotency-key"),
                x,
                y,
                frac,
            )
        )
        job = res["job"]
        return JSONResponse(
            {"job_id": job["id"], "status": job["status"], "domain": job["domain"], "replayed": res["replayed"]},
            status_code=202,
            headers={"Location": f"/v1/jobs/{job['id']}"},
        )

    @api.get("/v1/jobs/{job_id}")
    async def job(self, job_id: str) -> dict:
        j = await self.controller.job.remote(job_id)
        if j is None:
            raise Problem(404, "unknown-job", f"no job {job_id!r}")
        return {
            "id": j["id"],
            "domain": j["domain"],
            "method": j["method"],
            "status": j["status"],
            "progress": {"step": j["step"], "total": j["total"], "loss": j["loss"]},
            "timings": j["timings"],
            "error": j["error"],
            "adapter_version": j["version"],
            "created": j["created"],
            "updated": j["updated"],
        }

    @api.get("/v1/domains")
    async def domains(self) -> dict:
        return {"domains": await self.controller.domains.remote()}

    @api.get("/v1/adapters")
    async def adapters(self) -> dict:
        return await self.controller.adapters.remote()

    @api.post("/v1/adapters/{version}/activate")
    async def activate(self, version: int, request: Request) -> dict:
        self._auth(request)
        return self._state(await self.controller.activate.remote(version))

    @api.post("/v1/feedback")
    async def feedback(self, request: Request) -> dict:
        self._auth(request)
        data = await self._json(request)
        label = data.get("label")
        if not isinstance(label, str):
            raise Problem(422, "unknown-label", "feedback needs 'label'")
        ref = self.metrics.flush()  # make this replica's recent predictions visible first
        if ref is not None:
            await ref
        return self._state(
            await self.controller.feedback.remote(
                data.get("request_id"), data.get("domain"), label, data.get("prediction")
            )
        )

    @api.get("/metrics")
    async def metrics(self) -> Response:
        text = await self.controller.metrics_text.remote()
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")
