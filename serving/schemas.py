"""Request and response bodies as pydantic models, so ``/docs`` shows every schema.

Models are strict (``top_k: true`` is not an integer, a list is not a string) and reject unknown keys;
every string is checked to be encodable UTF-8, since a lone surrogate from JSON (``"\\ud800"``) would
otherwise reach SQLite and fail there for every client in the same batch.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from .config import DEFAULT_TASK

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"  # pydantic's regex: `$` is the end of the text, not before "\n"


def _utf8(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError("string is not valid UTF-8 (lone surrogate)") from e
    return s


Text = Annotated[str, AfterValidator(_utf8), StringConstraints(max_length=256)]
DomainName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


# --- classification ------------------------------------------------------------------------------
class ClassifyRequest(Strict):
    """One image (``image``) or a batch (``images``), base64-encoded (a ``data:`` prefix is allowed)."""

    image: str | None = None
    images: list[str] | None = Field(None, min_length=1)
    top_k: int = Field(3, ge=1, description="labels returned per image (at most the label count)")
    domain: Text | None = Field(None, description="where the image comes from; monitoring only")
    adapter_version: int | None = Field(None, ge=0, description="answer with this version (the active one or a "
                                        "running canary's; 409 otherwise)")


class Prediction(BaseModel):
    label: str
    score: float


class ClassifyResponse(BaseModel):
    request_id: str
    adapter_version: int
    predictions: list[Prediction] | None = Field(None, description="for a single image")
    results: list[list[Prediction]] | None = Field(None, description="for a batch, in request order")


# --- visual question answering -------------------------------------------------------------------
#: a task's name (``classify``, ``vqa`` or one from the server's ``tasks`` config); an unknown one is a 422
TaskName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
Question = Annotated[str, AfterValidator(_utf8), StringConstraints(min_length=1, max_length=512)]


class VqaItem(Strict):
    image: str = Field(description="base64 image (a ``data:`` prefix is allowed)")
    question: Question


class VqaRequest(Strict):
    """One question about one image (``image`` + ``question``), or a batch of them (``items``)."""

    image: str | None = None
    question: Question | None = None
    items: list[VqaItem] | None = Field(None, min_length=1)
    top_k: int = Field(1, ge=1, description="answers returned per question (at most the answer vocabulary)")
    domain: Text | None = Field(None, description="which question family or source; monitoring only")
    adapter_version: int | None = Field(None, ge=0, description="answer with this version (the active one or a "
                                        "running canary's; 409 otherwise)")


class Answer(BaseModel):
    answer: str
    score: float


class VqaResult(BaseModel):
    answer: str = Field(description="the top answer")
    score: float
    top_k: list[Answer]


class VqaResponse(BaseModel):
    request_id: str
    adapter_version: int
    answers: list[VqaResult] = Field(description="one per question, in request order")


class TaskInfo(BaseModel):
    name: str
    model: str = Field(description="backbone or model the task serves")
    labels: list[str] = Field(description="class names (classify) or the answer vocabulary (vqa)")
    active_version: int
    domains: list[str]
    default_method: str


class Tasks(BaseModel):
    tasks: list[TaskInfo]


# --- ingestion -----------------------------------------------------------------------------------
class IngestSource(Strict):
    """JSON ingestion from a ``file://`` source under one of the server's configured source roots."""

    name: DomainName
    source: Text
    method: str | None = Field(None, description="online merge method; the server default when omitted")
    hyper: dict[str, Any] = Field(default_factory=dict, description="method hyper-parameters (validated)")
    heldout_fraction: float | None = Field(None, gt=0, lt=1)
    task: TaskName = Field(DEFAULT_TASK, description="whose adapter lineage learns the domain")


class Accepted(BaseModel):
    job_id: str
    task: str
    status: str
    domain: str
    replayed: bool = Field(description="true when an Idempotency-Key replayed an earlier identical request")


class MethodInfo(BaseModel):
    description: str
    hyper_schema: dict[str, Any] = Field(description="JSON schema of the model `hyper` is validated with")
    allowed: dict[str, str] = Field(description="each field's type, range and default, as a 422 words them")


class TaskMethods(BaseModel):
    methods: list[str] = Field(description="methods this task's lineage accepts")
    default_method: str = Field(description="used when a request names none")
    steps: int = Field(description="training steps when `hyper` sets none")
    lr: float = Field(description="learning rate when `hyper` sets none")
    heldout_fraction: float = Field(description="held-out share of an upload when the request sets none")


class Methods(BaseModel):
    methods: dict[str, MethodInfo]
    tasks: dict[str, TaskMethods]
    max_steps: int = Field(description="largest `hyper.steps` a request may set")


class Progress(BaseModel):
    step: int
    total: int
    loss: float | None


class Job(BaseModel):
    id: str
    task: str
    domain: str
    method: str
    hyper: dict[str, Any]
    status: Literal["queued", "training", "merging", "swapping", "succeeded", "failed", "rejected"]
    attempts: int = Field(description="times the job was started; >1 after a restart or a lost worker")
    history: list[dict[str, Any]] = Field(default_factory=list,
                                          description="attempts that did not finish: attempt, cause, at")
    n_train: int | None = Field(None, description="images (or questions) it trains on")
    n_heldout: int | None = Field(None, description="held out for the activation gate")
    progress: Progress
    timings: dict[str, float]
    gate: dict[str, Any] | None = Field(None, description="activation gate: accuracies compared and the verdict")
    error: str | None
    adapter_version: int | None
    created: float
    updated: float


class JobPage(BaseModel):
    jobs: list[Job] = Field(description="newest first")
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last page")


class DomainInfo(BaseModel):
    name: str
    samples: int
    heldout: int
    learned_version: int
    accuracy_when_learned: float | None
    accuracy_now: float | None
    feedback_accuracy: float | None
    buffer_size: int
    created: float


class Domains(BaseModel):
    domains: list[DomainInfo] = Field(description="in learning order")
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page; null on the last page")


class AdapterVersion(BaseModel):
    version: int
    name: str
    parent: int | None
    method: str
    domains: list[str]
    created: float
    metrics: dict[str, float]
    accuracy: dict[str, float]
    coefficients: dict[str, float] = Field(default_factory=dict, description="learned α per domain (adaptive)")
    sha256: str
    active: bool


class AdapterImport(Strict):
    """The form fields of ``POST /v1/adapters`` besides the ``archive`` file."""

    task: TaskName = Field(DEFAULT_TASK, description="whose lineage the adapter joins")
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$")] | None = Field(
        None, description="SHA-256 of the uploaded file; refused when it differs")


class PromoteWhen(Strict):
    """When a canary ends by itself, judged on live feedback per domain (``POST /v1/feedback``)."""

    min_feedback: int = Field(ge=1, le=1_000_000, description="answers with feedback per domain, of each version")
    max_drop: float = Field(ge=0, le=1, description="largest allowed fall of the candidate's live accuracy")


class ActivateRequest(Strict):
    """Optional body of ``POST /v1/adapters/{v}/activate``: without one (or ``traffic`` 1) the version becomes
    the active one for every request; below 1 it is a canary for that share of the requests."""

    traffic: float = Field(1.0, gt=0, le=1, description="share of requests the version answers (sticky per "
                           "X-Client-ID)")
    promote_when: PromoteWhen | None = Field(None, description="promote or roll back on live feedback")


class Canary(BaseModel):
    version: int
    name: str
    traffic: float
    promote_when: dict[str, Any] | None
    started: float
    against: int = Field(description="the active version when it started")
    outcome: str | None = Field(None, description="promoted, rolled-back, stopped, replaced or superseded "
                                "(history only)")
    superseded_by: int | None = Field(None, description="superseded: the version a learning job activated while "
                                      "it ran")
    ended: float | None = None
    numbers: dict[str, Any] = Field(default_factory=dict, description="the live accuracies that decided it")


class Adapters(BaseModel):
    active: int
    versions: list[AdapterVersion] = Field(description="oldest first")
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page; null on the last page")
    canary: Canary | None = Field(None, description="the version answering a share of the requests, if any")
    canary_history: list[Canary] = Field(default_factory=list)


class Activated(BaseModel):
    active: int
    swap_seconds: float
    canary: Canary | None = None


# --- feedback ------------------------------------------------------------------------------------
class FeedbackRequest(Strict):
    """Either ``request_id`` of a served prediction, or ``domain`` + ``prediction`` given explicitly."""

    label: Text
    request_id: Text | None = None
    domain: Text | None = None
    prediction: Text | None = None
    task: TaskName | None = Field(None, description="found from request_id when omitted; else classify")


class FeedbackResult(BaseModel):
    task: str
    domain: str
    correct: bool
    version: int | None = Field(description="the adapter version that made the prediction (explicit feedback: "
                                "the active one; null for a prediction recorded before versions were)")
    feedback_accuracy: float
    n: int
    replayed: bool = Field(description="this prediction had feedback already: answered as before, counted once")


class ProblemBody(BaseModel):
    """RFC 9457 problem details; ``type`` ends with the machine-readable code."""

    type: str
    title: str
    status: int
    detail: str
    request_id: str


#: `responses=` for routes: every error is problem+json.
ERRORS: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ProblemBody, "description": "client error (problem+json)"},
    "5XX": {"model": ProblemBody, "description": "server error (problem+json)"},
}
