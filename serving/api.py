"""The HTTP API and the model in one Ray Serve deployment (``Model``): one hop from the proxy to the forward.

Classification decodes, batches (``@serve.batch``) and answers inside the replica that holds the model;
control routes (domains, jobs, adapters, feedback, metrics) call the controller actor. Blocking work
(decoding, archive reading) runs off the event loop. Every error is RFC 9457 problem+json.
"""

import asyncio
import functools
import json
from typing import Any, Literal

import numpy as np
import ray
from fastapi import FastAPI, Path, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from training.ranking import top_k
from training.store import AdapterStore

from . import auth, problems, sse
from .archive import (
    Limits,
    cheap_to_decode,
    decode_b64,
    decode_images,
    decode_opened,
    open_images,
    read_domain,
    read_source,
    read_vqa_domain,
    small_request,
)
from .batching import GreedyBatcher
from .config import DEFAULT_TASK, ServerConfig
from .console import HEADERS, asset
from .controller import NAME, NAMESPACE
from .errors import FRAMEWORK_CODES, PROBLEM_TYPE, RETRY_AFTER_S, Problem, unwrap
from .metrics import Recorder, RequestMiddleware
from .pipeline import Submission, check_hyper, method_catalog
from .schemas import (
    ERRORS,
    Accepted,
    Activated,
    ActivateRequest,
    AdapterImport,
    Adapters,
    AdapterVersion,
    ClassifyRequest,
    ClassifyResponse,
    Domains,
    FeedbackRequest,
    FeedbackResult,
    IngestSource,
    Job,
    JobPage,
    Methods,
    TaskName,
    Tasks,
    VqaRequest,
    VqaResponse,
)

README = """Adapter v{v} of a mergeserve server's {task} lineage ({method}; domains {domains}), in peft's format.

Load it on the same base (pip install mergeserve, which ships the offline weights):

    from peft import PeftModel
    from training.tasks import get_task
    task = get_task("{name}", **{kwargs!r})
    model = PeftModel.from_pretrained(task.build_base(0), "<this folder>").eval()

task.forward(model, task.make_batch(samples)) then gives the server's outputs (logits or probabilities).
"""

api = FastAPI(
    title="mergeserve",
    version="0.2.0",
    description="Inference with a continually merged global LoRA adapter; online domain ingestion.",
)


#: the request body of a question task's inference route
QUESTIONS = {"requestBody": {"content": {"application/json": {"schema": VqaRequest.model_json_schema()}}}}

#: ``dependencies=`` of the routes that change state: OpenAPI marks them as needing the bearer token
SECURED = [Security(auth.BEARER)]


def _doc(model: type, multipart: dict[str, Any]) -> dict:
    """``openapi_extra`` for a route that takes JSON (``model``) or a multipart form."""
    form = {"type": "object", "properties": multipart}
    return {"requestBody": {"content": {"application/json": {"schema": model.model_json_schema()},
                                        "multipart/form-data": {"schema": form}}}}


def _problem(request: Request, p: Problem) -> JSONResponse:
    rid = getattr(request.state, "request_id", None)
    return JSONResponse(p.body(rid), status_code=p.status, media_type=PROBLEM_TYPE, headers=p.headers())


@api.exception_handler(Problem)
async def _on_problem(request: Request, e: Problem) -> JSONResponse:
    return _problem(request, e)


@api.exception_handler(RequestValidationError)
async def _on_invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    return _problem(request, _invalid(e.errors()))


@api.exception_handler(HTTPException)
async def _on_http(request: Request, e: HTTPException) -> JSONResponse:
    code = FRAMEWORK_CODES.get(e.status_code, "http-error")
    return _problem(request, Problem(e.status_code, code, str(e.detail or code)))


@api.exception_handler(Exception)
async def _on_internal(request: Request, e: Exception) -> JSONResponse:
    if isinstance(p := unwrap(e), Problem):  # a dependency restarting: 503 + Retry-After, not a 500
        return _problem(request, p)
    return _problem(request, Problem(500, "internal-error", f"{type(e).__name__}: {e}"[:500]))


#: first invalid field -> the problem code clients already know for it
FIELD_CODES = {"name": "invalid-domain-name", "top_k": "bad-top-k", "heldout_fraction": "bad-heldout-fraction",
               "hyper": "bad-hyper-parameter", "domain": "bad-domain", "label": "unknown-label"}


def _invalid(errors: list[dict]) -> Problem:
    if any(err.get("type") == "json_invalid" for err in errors):
        return Problem(400, "bad-json", "body is not valid JSON (UTF-8)")
    fields = [x for x in (errors[0].get("loc") or ()) if x != "body"] if errors else []
    code = FIELD_CODES.get(str(fields[0]) if fields else "", "invalid-request")
    parts = [f"{'.'.join(str(x) for x in err.get('loc', ()) if x != 'body') or 'body'}: {err.get('msg')}"
             for err in errors[:5]]
    return Problem(422, code, "; ".join(parts))


def _parse(model: type, body: bytes) -> Any:
    try:
        return model.model_validate_json(body or b"null")
    except ValidationError as e:
        raise _invalid(e.errors(include_url=False)) from None


def _job_view(j: dict) -> dict:
    """A job row as the API shows it (:class:`~serving.schemas.Job`)."""
    progress = {"step": j["step"], "total": j["total"], "loss": j["loss"]}
    return {**j, "progress": progress, "adapter_version": j["version"]}


async def _call(ref: ray.ObjectRef, what: str = "the controller") -> Any:
    """Await a remote call; a :class:`Problem` raised there is raised here, and a dead or restarting actor
    is a 503 with ``Retry-After`` (:func:`~serving.errors.unwrap`)."""
    try:
        return await ref
    except Exception as e:
        raise unwrap(e, what) from None


@serve.deployment(name="Model", health_check_period_s=5)
@serve.ingress(api)
class Model:
    """One replica: the HTTP API, the decoder and the model; ``num_replicas`` / autoscaling from config."""

    def __init__(self, cfg: dict, handles: dict[str, Any] | None = None) -> None:
        from .engine import Engine  # torch is imported in replicas only, never in the driver

        self.cfg = ServerConfig.model_validate(cfg)
        self.handles = handles or {}  # each other task's TaskModel deployment (serving/app.py), by task name
        self._labels: dict[str, list[str]] = {}
        self.limits = Limits(max_image_pixels=self.cfg.max_image_pixels, max_images=self.cfg.max_images)
        self.controller = ray.get_actor(NAME, namespace=NAMESPACE)
        self.engine = Engine(self.cfg, self.controller)
        self.size = self.engine.spec.img_size
        # a batch is cut when the model is free; a long forward runs beside the event loop (batching.py)
        inline = self.engine.device.type == "cpu"
        self.batcher = GreedyBatcher(self.engine.forward, self.cfg.max_batch_images, self.cfg.batch_wait_timeout_s,
                                     inline=inline)
        # a running canary's requests batch apart: one batch, one model (engine.pick decides who goes there)
        self.canary_batcher = GreedyBatcher(functools.partial(self.engine.forward, candidate=True),
                                            self.cfg.max_batch_images, self.cfg.batch_wait_timeout_s, inline=inline)
        self.recorder = Recorder(lambda req, pred: ray.get(self.controller.record.remote(req, pred)))
        api.add_middleware(RequestMiddleware, max_body=self.cfg.max_upload_bytes, record=self.recorder.add)

    # --- helpers -------------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        auth.check(self.cfg.auth_token, request.headers.get("authorization"))

    async def _form(self, request: Request) -> Any:
        return await request.form(max_files=self.cfg.max_images, max_fields=32)

    async def _decode(self, raws: list[bytes]) -> np.ndarray:
        """The request's images at the model's size. A few small ones are decoded on the event loop, as
        the plain Serve app does (the thread hop costs more than decoding them); headers are read once."""
        if not small_request(raws):
            return await asyncio.to_thread(decode_images, raws, self.size, self.limits)
        ims = open_images(raws, self.limits)  # headers only: microseconds for a request this small
        if cheap_to_decode(ims):
            return decode_opened(ims, self.size)
        return await asyncio.to_thread(decode_opened, ims, self.size)

    # --- routes --------------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz", responses=ERRORS)
    async def readyz(self) -> dict:
        """Serving readiness (503 problem when not ready) with the ingest pipeline's health beside it."""
        try:
            ctrl = await self.controller.ready.remote()
        except Exception as e:  # noqa: BLE001
            raise Problem(503, "not-ready", f"controller unavailable: {type(e).__name__}",
                          retry_after=RETRY_AFTER_S) from e
        version = self.engine.current[0]
        return {"status": "ready", "active_version": ctrl["active"], "ingest": ctrl["ingest"],
                "replica": {"replica": self.engine.replica_id, "adapter_version": version,
                            "swaps": len(self.engine.swaps)}}

    async def _classify_input(self, request: Request) -> tuple[ClassifyRequest, np.ndarray, bool]:
        """The request's fields, its images at the model's size and whether it sent one ``image``."""
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await self._form(request)
            raws = [await f.read() for f in form.values() if isinstance(f, UploadFile)]
            domain = form.get("domain") if isinstance(form.get("domain"), str) else None
            req = ClassifyRequest(domain=domain)
            single = len(raws) == 1
        else:
            req = _parse(ClassifyRequest, await request.body())
            if req.image is not None:
                raws, single = [decode_b64(req.image, "image")], True
            elif req.images is not None:
                raws, single = [decode_b64(s, f"images[{i}]") for i, s in enumerate(req.images)], False
            else:
                raise Problem(422, "no-image", "send {'image': base64} or {'images': [base64, ...]} or multipart files")
        n_labels = len(self.cfg.class_names)
        if req.top_k > n_labels:
            raise Problem(422, "bad-top-k", f"top_k must be an integer in [1, {n_labels}]")
        return req, await self._decode(raws), single

    @api.post("/v1/classify", response_model=ClassifyResponse, responses=ERRORS,
              openapi_extra=_doc(ClassifyRequest, {"file": {"type": "string", "format": "binary"},
                                                   "domain": {"type": "string"}}))
    async def classify(self, request: Request) -> JSONResponse:
        """Classify one image or a batch (JSON base64, or multipart files)."""
        rid = request.state.request_id
        with self.batcher.incoming():  # a batch cut meanwhile may wait for this request (up to its wait)
            req, x, single = await self._classify_input(request)
        candidate = self.engine.pick(request.headers.get("x-client-id") or rid, req.adapter_version)
        probs, version = await (self.canary_batcher if candidate else self.batcher)(x)
        results = [[{"label": n, "score": s} for n, s in row] for row in top_k(probs, self.cfg.class_names, req.top_k)]
        ids = [rid] if single else [f"{rid}:{j}" for j in range(len(results))]
        self.recorder.predicted([(i, req.domain, r[0]["label"], self.cfg.task, version) for i, r in zip(ids, results)])
        body = {"request_id": rid, "adapter_version": version}
        return JSONResponse({**body, "predictions": results[0]} if single else {**body, "results": results})

    @api.post("/v1/domains", status_code=202, response_model=Accepted, responses=ERRORS, dependencies=SECURED,
              openapi_extra=_doc(IngestSource, {
                  "name": {"type": "string"}, "archive": {"type": "string", "format": "binary"},
                  "method": {"type": "string"}, "hyper": {"type": "string", "description": "JSON object"},
                  "heldout_fraction": {"type": "number"}}))
    async def ingest(self, request: Request) -> JSONResponse:
        """Learn a new domain: a zip / tar(.gz) archive in class_name/image layout, or a file:// source."""
        self._auth(request)
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await self._form(request)
            archive = form.get("archive")
            if not isinstance(archive, UploadFile):
                raise Problem(422, "no-archive", "multipart upload needs a file field 'archive'")
            keys = ("name", "method", "hyper", "heldout_fraction", "task")
            fields = {k: v for k in keys if isinstance(v := form.get(k), str)}
            try:
                fields["hyper"] = json.loads(fields.get("hyper") or "{}")
                if fields.get("heldout_fraction"):
                    fields["heldout_fraction"] = float(fields["heldout_fraction"])
            except ValueError as e:
                raise Problem(422, "invalid-request", "'hyper' must be JSON, 'heldout_fraction' a number") from e
            meta = _parse(IngestSource, json.dumps({"name": "", **fields, "source": "upload"}).encode())
            self._check_hyper(meta)
            data = await archive.read()
        else:
            meta = _parse(IngestSource, await request.body())
            self._check_hyper(meta)
            data = None
        questions = None
        if meta.task in self.handles:  # a question task: images + questions.jsonl
            answers, size = await self._task_labels(meta.task), self.cfg.served()[meta.task].image_size
            if data is None:  # a file:// source: a VQA archive file under the source roots
                data = await asyncio.to_thread(self._source_archive, meta.source)
            x, questions, y = await asyncio.to_thread(read_vqa_domain, data, answers, size, self._upload_limits())
        elif data is not None:
            x, y = await asyncio.to_thread(read_domain, data, self.cfg.class_names, self.size, self._upload_limits())
        else:
            x, y = await asyncio.to_thread(read_source, meta.source, self.cfg.class_names, self.size,
                                           self.cfg.roots(), self._upload_limits(), self.cfg.max_upload_bytes)
        sub = Submission(meta.name, meta.method, meta.hyper, request.headers.get("idempotency-key"), x, y,
                         meta.heldout_fraction, questions=questions, task=meta.task)
        res = await _call(self.controller.submit.remote(sub))
        job = res["job"]
        return JSONResponse(
            {"job_id": job["id"], "status": job["status"], "domain": job["domain"], "task": meta.task,
             "replayed": res["replayed"]},
            status_code=202,
            headers={"Location": f"/v1/jobs/{job['id']}"},
        )

    def _check_hyper(self, meta: IngestSource) -> None:
        """Task, method and hyper-parameters before any decoding (the controller checks again, with state)."""
        self._task(meta.task)
        check_hyper(meta.method or self.cfg.for_task(meta.task).default_method, meta.hyper, self.cfg.max_steps)

    async def _task_labels(self, task: str) -> list[str]:
        """A task's labels (answer vocabulary), asked of the controller once per replica."""
        if task not in self._labels:
            self._labels[task] = await _call(self.controller.labels.remote(task))
        return self._labels[task]

    def _source_archive(self, uri: str) -> bytes:
        from .archive import source_members

        got = source_members(uri, self.cfg.roots(), self._upload_limits(), self.cfg.max_upload_bytes)
        if not isinstance(got, bytes):
            raise Problem(422, "bad-source", "a question task's source must be an archive file (zip / tar) holding "
                          "questions.jsonl")
        return got

    def _upload_limits(self) -> Limits:
        return Limits(max_image_pixels=self.cfg.max_image_pixels)

    @api.post("/v1/vqa", response_model=VqaResponse, responses=ERRORS, openapi_extra=QUESTIONS)
    async def vqa_route(self, request: Request) -> JSONResponse:
        """Answer questions about images with the ``vqa`` task's model (``POST /v1/{task}`` for ``vqa``)."""
        return await self._answer("vqa", request)

    async def _answer(self, task: str, request: Request) -> JSONResponse:
        """A question task's answers (its own model deployment and adapter lineage)."""
        rid = request.state.request_id
        if task not in self.handles:
            raise Problem(404, "unknown-task", f"no task {task!r} is served here; tasks: {self.cfg.tasks_held()}")
        req = _parse(VqaRequest, await request.body())
        answers = await self._task_labels(task)
        limit = self.cfg.served()[task].max_questions
        if req.top_k > len(answers):
            raise Problem(422, "bad-top-k", f"top_k must be an integer in [1, {len(answers)}]")
        if req.items is not None and (req.image is not None or req.question is not None):
            raise Problem(422, "invalid-request", "send image + question, or items, not both")
        if req.items is not None:
            if len(req.items) > limit:
                raise Problem(413, "too-many-questions", f"at most {limit} items per request")
            raws = [decode_b64(it.image, f"items[{i}].image") for i, it in enumerate(req.items)]
            questions = [it.question for it in req.items]
        elif req.image is not None and req.question is not None:
            raws, questions = [decode_b64(req.image, "image")], [req.question]
        else:
            raise Problem(422, "no-question", "send {'image': base64, 'question': str} or {'items': [...]}")
        key = request.headers.get("x-client-id") or rid
        results, version = await _call(self.handles[task].answer.remote(raws, questions, req.top_k, key,
                                                                        req.adapter_version), f"the {task} model")
        ids = [rid] if len(results) == 1 else [f"{rid}:{j}" for j in range(len(results))]
        self.recorder.predicted([(i, req.domain, r["answer"], task, version) for i, r in zip(ids, results)])
        return JSONResponse({"request_id": rid, "adapter_version": version, "answers": results})

    @api.get("/v1/tasks", response_model=Tasks, responses=ERRORS)
    async def tasks(self) -> dict:
        """Every task this server holds: its model, labels or answer vocabulary, active version, domains."""
        return {"tasks": await _call(self.controller.tasks.remote())}

    @api.get("/v1/methods", response_model=Methods, responses=ERRORS)
    async def methods(self) -> dict:
        """Each online method's hyper-parameters (the JSON schema of the model ``POST /v1/domains`` validates
        ``hyper`` with) and, per task, the methods offered, the default and the training defaults."""
        return method_catalog(self.cfg)

    @api.get("/v1/jobs", response_model=JobPage, responses=ERRORS)
    async def jobs(self, limit: int = Query(20, ge=1, le=200), cursor: str | None = Query(None, max_length=200),
                   task: TaskName | None = Query(None)) -> dict:
        """Ingest jobs of every task (or of ``task``), newest first; pass ``next_cursor`` back as ``cursor``
        for the next page (``null``: this was the last)."""
        page = await _call(self.controller.jobs.remote(limit, cursor, task and self._task(task)))
        return {"jobs": [_job_view(j) for j in page["jobs"]], "next_cursor": page["next_cursor"]}

    @api.get("/v1/jobs/{job_id}", response_model=Job, responses=ERRORS)
    async def job(self, job_id: str = Path(max_length=64)) -> dict:
        j = await _call(self.controller.job.remote(job_id))
        if j is None:
            raise Problem(404, "unknown-job", f"no job {job_id!r}")
        return _job_view(j)

    @api.get("/v1/jobs/{job_id}/events", responses={**ERRORS, 200: {
        "content": {sse.MEDIA_TYPE: {"schema": {"type": "string"}}},
        "description": "Server-Sent Events: `status` (each status, the first at once) and `progress` (step, "
                       "loss), each with the job as GET /v1/jobs/{id} shows it; the stream ends after the "
                       "terminal status (an `error` event with a problem if the controller is lost)"}})
    async def job_events(self, job_id: str = Path(max_length=64)) -> StreamingResponse:
        """Follow a job without polling: its status and progress as Server-Sent Events until it ends."""
        job = await self.job(job_id)

        async def fetch() -> dict:
            return await self.job(job_id)

        return StreamingResponse(sse.job_events(fetch, job), media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)

    @api.get("/v1/domains", response_model=Domains, responses=ERRORS)
    async def domains(self, task: TaskName = Query(DEFAULT_TASK), limit: int = Query(100, ge=1, le=1000),
                      cursor: str | None = Query(None, max_length=400)) -> dict:
        """Learned domains in learning order; pass ``next_cursor`` back as ``cursor`` for the next page
        (``null``: this was the last; the default page holds every domain of a default server)."""
        return await _call(self.controller.domain_page.remote(self._task(task), limit, cursor))

    @api.get("/v1/adapters", response_model=Adapters, responses=ERRORS)
    async def adapters(self, task: TaskName = Query(DEFAULT_TASK), limit: int = Query(100, ge=1, le=1000),
                       cursor: str | None = Query(None, max_length=200)) -> dict:
        """The active version and the stored versions, oldest first; pass ``next_cursor`` back as
        ``cursor`` for the next page (``null``: this was the last)."""
        return await _call(self.controller.adapters.remote(self._task(task), limit, cursor))

    @api.post("/v1/adapters/{version}/activate", response_model=Activated, responses=ERRORS, dependencies=SECURED)
    async def activate(
        self, request: Request, version: int = Path(ge=0, le=2**31 - 1), task: TaskName = Query(DEFAULT_TASK)
    ) -> dict:
        """Roll back or forward to a stored version (also one the activation gate rejected), or, with a body
        ``{"traffic": 0.1, "promote_when": {"min_feedback": N, "max_drop": d}}``, start it as a canary that
        answers that share of the requests (sticky per ``X-Client-ID``)."""
        self._auth(request)
        body = await request.body()
        act = _parse(ActivateRequest, body) if body.strip() else ActivateRequest()
        promote = act.promote_when.model_dump() if act.promote_when else None
        return await _call(self.controller.activate.remote(version, self._task(task), act.traffic, promote))

    @api.delete("/v1/canary", responses=ERRORS, dependencies=SECURED)
    async def stop_canary(self, request: Request, task: TaskName = Query(DEFAULT_TASK)) -> dict:
        """End the running canary: every request goes to the active version again."""
        self._auth(request)
        return await _call(self.controller.end_canary.remote(self._task(task)))

    @api.get("/v1/adapters/{version}/download", response_class=Response, responses={
        **ERRORS, 200: {"content": {"application/zip": {}}, "description": "the adapter's files, zipped"}})
    async def download(self, version: int = Path(ge=0, le=2**31 - 1),
                       format: Literal["peft", "mergeserve"] = Query("peft"),  # noqa: A002 - the API's word
                       task: TaskName = Query(DEFAULT_TASK)) -> Response:
        """A version's files: ``peft`` (load with ``PeftModel.from_pretrained`` on the same base; README inside)
        or ``mergeserve`` (the store's weights and manifest, checksum included)."""
        task = self._task(task)
        row = await _call(self.controller.adapter.remote(version, task))
        if row is None:
            raise Problem(404, "unknown-version", f"no {task} adapter version {version}")
        from .transfer import store_zip  # torch: replicas import it, never the driver

        store = AdapterStore(self.cfg.for_task(task).path("adapters"))
        if format == "mergeserve":
            data = await asyncio.to_thread(store_zip, store, row["name"])
        else:
            base, head, shapes = await self._base_of(task)
            spec = self.cfg.for_task(task).task_spec()
            data = await asyncio.to_thread(self._peft_zip, store, row, base, head, shapes, task, spec)
        disposition = f'attachment; filename="mergeserve-{task}-v{version}-{format}.zip"'
        return Response(data, media_type="application/zip", headers={"Content-Disposition": disposition})

    @staticmethod
    def _peft_zip(store: AdapterStore, row: dict, base: str, head: str | None, shapes: dict, task: str,
                  spec: tuple[str, dict]) -> bytes:
        from training.portable import to_peft

        from .transfer import peft_zip

        tensors, man = store.load(row["name"])
        config, sd = to_peft(tensors, man.format, man.lora, head, base, shapes)
        return peft_zip(config, sd, README.format(v=row["version"], task=task, method=row["method"],
                                                  domains=row["domains"], name=spec[0], kwargs=spec[1]))

    @api.post("/v1/adapters", status_code=201, response_model=AdapterVersion, responses=ERRORS, dependencies=SECURED,
              openapi_extra=_doc(
        AdapterImport, {"archive": {"type": "string", "format": "binary"}, "task": {"type": "string"},
                        "sha256": {"type": "string"}}))
    async def import_adapter(self, request: Request) -> JSONResponse:
        """Import a peft LoRA adapter trained elsewhere on the same base (a zip or tar of its folder) as a new,
        inactive version; its accuracy on every learned domain follows when the worker has measured it."""
        from training.portable import AdapterMismatch, from_peft

        from .transfer import read_peft_upload

        self._auth(request)
        form = await self._form(request)
        archive = form.get("archive")
        if not isinstance(archive, UploadFile):
            raise Problem(422, "no-archive", "multipart upload needs a file field 'archive' (a peft adapter folder)")
        meta = _parse(AdapterImport, json.dumps({k: v for k in ("task", "sha256")
                                                  if isinstance(v := form.get(k), str)}).encode())
        task, lora = self._task(meta.task), self.cfg.for_task(meta.task).lora
        base, head, shapes = await self._base_of(task)
        config, sd = await asyncio.to_thread(read_peft_upload, await archive.read(), self._upload_limits(), meta.sha256)
        try:
            tensors, fmt, lora = from_peft(config, sd, lora, head, base, shapes)
        except AdapterMismatch as e:
            raise Problem(422, "adapter-mismatch", str(e)) from None
        arrays = {k: v.detach().float().numpy() for k, v in tensors.items()}  # the controller imports no torch
        row = await _call(self.controller.import_adapter.remote(arrays, fmt, lora.model_dump(), task))
        return JSONResponse(row, status_code=201, headers={"Location": f"/v1/adapters?task={task}"})

    @api.delete("/v1/adapters/{version}", responses=ERRORS, dependencies=SECURED)
    async def delete_adapter(self, request: Request, version: int = Path(ge=0, le=2**31 - 1),
                             task: TaskName = Query(DEFAULT_TASK)) -> dict:
        """Delete a version no rollback can need (not the active one, nor one it descends from)."""
        self._auth(request)
        return await _call(self.controller.delete.remote(version, self._task(task)))

    async def _base_of(self, task: str) -> tuple[str, str | None, dict]:
        """What the format conversion needs of ``task``'s base: its name, classifier (None: frozen), shapes."""
        if task == self.cfg.task:  # the task this replica serves itself
            return self.cfg.backbone, self.engine.spec.head, self.engine.shapes
        d = await _call(self.handles[task].describe.remote(), f"the {task} model")
        return d["base"], None, d["shapes"]

    def _task(self, task: str) -> str:
        if task not in self.cfg.tasks_held():
            raise Problem(422, "unknown-task", f"task {task!r} is not served; tasks: {self.cfg.tasks_held()}")
        return task

    @api.post("/v1/feedback", response_model=FeedbackResult, responses=ERRORS, dependencies=SECURED,
              openapi_extra={"requestBody": {"content": {"application/json": {
                  "schema": FeedbackRequest.model_json_schema()}}}})
    async def feedback(self, request: Request) -> dict:
        """Delayed ground truth for a served prediction (by ``request_id``) or an explicit one."""
        self._auth(request)
        fb = _parse(FeedbackRequest, await request.body())
        req, pred = self.recorder.take()  # make this replica's recent predictions visible first
        try:
            await self.controller.record.remote(req, pred)
        except Exception:  # noqa: BLE001 - controller restarting: keep them for the next flush
            self.recorder.give_back(req, pred)
        return await _call(self.controller.feedback.remote(fb.request_id, fb.domain, fb.label, fb.prediction, fb.task))

    # registered after every fixed POST /v1/<route>, which match first
    @api.post("/v1/{task}", response_model=VqaResponse | ClassifyResponse, responses=ERRORS, openapi_extra=QUESTIONS)
    async def task_route(self, request: Request, task: str = Path(max_length=32)) -> JSONResponse:
        """Inference on any task this server holds: ``classify`` takes images (as ``POST /v1/classify``), a
        question task (``vqa``, ``vlm``, ...) an image + question or ``items`` (as ``POST /v1/vqa``)."""
        return await (self.classify(request) if task == self.cfg.task else self._answer(task, request))

    @api.get("/problems", response_class=HTMLResponse)
    async def problem_index(self) -> HTMLResponse:
        """Every problem type (RFC 9457) this server answers with."""
        return HTMLResponse(problems.index())

    @api.get("/problems/{code}", response_class=HTMLResponse, responses=ERRORS)
    async def problem_doc(self, request: Request, code: str = Path(max_length=64)) -> Response:
        """What a problem ``type`` means (its body's ``type`` points here): HTML, or JSON when asked for."""
        if code not in problems.PROBLEMS:
            raise Problem(404, "not-found", f"no problem type {code!r}; GET /problems lists them")
        name, text = problems.PROBLEMS[code]
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse({"type": f"/problems/{code}", "title": name, "description": text})
        return HTMLResponse(problems.page(code))

    @api.get("/metrics")
    async def metrics(self) -> Response:
        text = await _call(self.controller.metrics_text.remote())
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.api_route("/ui", methods=["GET", "HEAD"], include_in_schema=False)  # HEAD: `curl -I`, link checkers
    async def console(self) -> Response:
        """The built-in console (``serving/console.py``): a page that only calls the routes above."""
        return self._asset("index.html")

    @api.api_route("/ui/{name}", methods=["GET", "HEAD"], include_in_schema=False)
    async def console_file(self, name: str = Path(max_length=64)) -> Response:
        return self._asset(name)

    @staticmethod
    def _asset(name: str) -> Response:
        body, media = asset(name)
        return Response(body, media_type=media, headers=HEADERS)

    def reconfigure(self, user_config: dict) -> None:
        """Only batching knobs; adapter swaps never go through here (reconfigure is not zero-downtime)."""
        for b in (self.batcher, self.canary_batcher):
            b.max_items = int(user_config.get("max_batch_images", 512))
            b.wait_s = float(user_config.get("batch_wait_timeout_s", 0.005))


@serve.deployment(name="TaskModel", health_check_period_s=5)
class TaskModel:
    """One question task's model replicas (its model + the task's global adapter), one deployment per task
    (``serving/app.py`` names it ``VqaModel``, ``VlmModel``, ...), called by ``Model``'s ``POST /v1/<task>``:
    decoding at the model's size, dynamic batching and the same hot swap as classification."""

    def __init__(self, cfg: dict, task: str) -> None:
        from .engine import Engine

        self.cfg = ServerConfig.model_validate(cfg).for_task(task)
        ts = self.cfg.task_config()
        self.limits = Limits(max_image_pixels=self.cfg.max_image_pixels, max_images=ts.max_questions)
        controller = ray.get_actor(NAME, namespace=NAMESPACE)
        self.engine = Engine(self.cfg, controller)
        self.size = self.engine.task.image_size

    def describe(self) -> dict:
        """The base model's name and parameter shapes (for adapter download and import)."""
        return {"base": self.engine.cfg.backbone, "shapes": self.engine.shapes}

    async def answer(self, raws: list[bytes], questions: list[str], top_k: int, key: str = "",
                     pinned: int | None = None) -> tuple[list[dict], int]:
        """Decode (off the loop), then answer in a dynamic batch with other requests' questions (the canary's
        candidate model for the requests ``key`` routes there, or that pin its version)."""
        candidate = self.engine.pick(key, pinned)
        x = await asyncio.to_thread(decode_images, raws, self.size, self.limits)
        results, version = await self._batched((x, questions, candidate))
        return [{**r, "top_k": r["top_k"][:top_k]} for r in results], version

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _batched(self, reqs: list[tuple[np.ndarray, list[str], bool]]) -> list[tuple[list[dict], int]]:
        out: list = [None] * len(reqs)
        for candidate in (False, True):  # one forward per model in the batch
            idx = [i for i, r in enumerate(reqs) if r[2] == candidate]
            if idx:
                for i, res in zip(idx, self._answer([reqs[i] for i in idx], candidate)):
                    out[i] = res
        return out

    def _answer(self, reqs: list[tuple[np.ndarray, list[str], bool]], candidate: bool) -> list[tuple[list[dict], int]]:
        sizes = np.cumsum([len(q) for _, q, _ in reqs])[:-1]
        k = len(self.engine.task.answers)  # full ranking once; each request keeps its own top_k
        out, version = self.engine.answer(np.concatenate([x for x, _, _ in reqs]), sum((q for _, q, _ in reqs), []),
                                          k, candidate)
        return [(list(part), version) for part in np.split(np.array(out, dtype=object), sizes)]
