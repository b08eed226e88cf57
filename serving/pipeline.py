"""The ingest pipeline as plain functions over the data directory: accept → train → merge → gate → persist →
activate, plus recovery after a crash. No Ray here: the controller actor is a thin shell around
:class:`Pipeline`, and tests drive it directly with a local :class:`~serving.worker.IngestWorker`.

Durability, in order: a domain's data (fsynced) before its job row, so a 202 is never an orphan job; the
adapter file (weights, then manifest with checksum) before its database record; the version, its accuracy,
its domain and the job's move to ``swapping`` in one transaction. After any crash, :meth:`Pipeline.recover`
quarantines adapter files the database does not know, re-queues interrupted jobs (bounded attempts, in
submission order) and finishes swaps that were recorded but not completed. Version numbers are allocated
above everything on disk, so they never collide.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from training.hyper import HYPER, AdaptiveFit, HyperError, allowed, parse_hyper
from training.store import AdapterStore

from . import versions
from .config import DEFAULT_TASK, ServerConfig
from .errors import Problem
from .state import StateDB

DOMAIN_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # fullmatch: no trailing newline sneaks through
VERSION_NAME = re.compile(r"global@v(\d+)")
INTERRUPTED = ("training", "merging")
#: methods whose versions are α-merges of per-domain adapters, stored as dense ΔW (torch-free: from HYPER)
ALPHA_METHODS = tuple(m for m, h in HYPER.items() if issubclass(h, AdaptiveFit))


class WorkerLost(RuntimeError):
    """The training worker's process ended during a job (killed, out of memory, its node lost): not the job's
    fault, so the job runs again (:meth:`Pipeline.run`), as after a restart."""


def crash_point(name: str) -> None:
    """Fault injection for tests: ``MERGESERVE_CRASH_AT=<name>`` kills the process here, as SIGKILL would."""
    if os.environ.get("MERGESERVE_CRASH_AT") == name:
        os._exit(137)


@dataclass
class Submission:
    """A validated-shape ingest request; content is checked by :meth:`Pipeline.accept`."""

    name: str
    method: str | None
    hyper: dict[str, Any]
    key: str | None  # Idempotency-Key
    x: np.ndarray | None  # uint8 (N, 3, H, W); None for a built-in source
    y: np.ndarray | None  # int64 (N,)
    heldout_fraction: float | None = None
    source: str | None = None  # "builtin:<benchmark>/<domain>": data made by the worker, reproducibly
    questions: list[str] | None = None  # vqa: one question per image (``y`` holds answer ids)
    task: str = DEFAULT_TASK  # whose lineage learns it


class WorkerAPI(Protocol):
    """What the pipeline needs from the training/merge worker (a Ray actor or a local object)."""

    async def run(self, job: dict, parent: dict, version: int, progress: Callable[[int, int, float], None],
                  phase: Callable[[str], None]) -> dict:
        """Train, merge, evaluate every seen domain and persist ``global@v{version}`` in one call; returns the
        manifest, accuracy, training info and timings (numbers only: no tensor crosses to the caller)."""

    async def initial(self) -> dict:
        """Persist ``global@v0`` and return its manifest."""


# --- pure decisions ------------------------------------------------------------------------------
def gate(
    before: dict[str, float], after: dict[str, float], domain: str, zero_shot: float, max_drop: float,
    require_gain: bool,
) -> dict[str, Any]:
    """The activation gate: may the merged version replace the active one?

    Args:
        before: Held-out accuracy of the active (parent) version per seen domain.
        after: Held-out accuracy of the merged version per domain, the new one included.
        domain: The new domain.
        zero_shot: The parent's accuracy on the new domain before training.
        max_drop: Largest allowed fall of any seen domain.
        require_gain: Whether the new domain must beat ``zero_shot``.

    Returns:
        ``{"passed": bool, "reasons": [...], "drops": {domain: fall}, "new": acc, "zero_shot": acc}``.
    """
    drops = {d: round(before[d] - after[d], 6) for d in before if d in after}
    reasons = [f"{d} fell {v:.3f} > {max_drop}" for d, v in drops.items() if v > max_drop]
    new = after[domain]
    if require_gain and not (new > zero_shot or new >= 1.0):
        reasons.append(f"{domain} reached {new:.3f}, not above its zero-shot {zero_shot:.3f}")
    return {"passed": not reasons, "reasons": reasons, "drops": drops, "new": new, "zero_shot": zero_shot,
            "max_drop": max_drop}


def check_hyper(method: str, hyper: dict, max_steps: int) -> dict:
    """A request's method and hyper-parameters, normalised (only the keys given).

    Raises:
        Problem: 422 ``unknown-method`` or ``bad-hyper-parameter`` naming the field and its range.
    """
    try:
        return parse_hyper(method, hyper, max_steps=max_steps).model_dump(exclude_unset=True)
    except HyperError as e:
        code = "unknown-method" if e.field is None and str(e).startswith("unknown method") else "bad-hyper-parameter"
        raise Problem(422, code, str(e)) from e


def method_catalog(cfg: ServerConfig) -> dict[str, Any]:
    """What ``POST /v1/domains`` accepts, from the models :func:`check_hyper` validates with (``GET /v1/methods``).

    A client (the console's ingest form) builds its fields from these schemas instead of a copy of them,
    so a form can never offer a field the server refuses, and a value out of range gets the server's 422.
    """
    online = list(HYPER)
    methods = {
        m: {"description": " ".join((HYPER[m].__doc__ or "").replace("``", "").split()),
            "hyper_schema": HYPER[m].model_json_schema(),
            "allowed": {k: allowed(f) for k, f in HYPER[m].model_fields.items()}}
        for m in online
    }
    tasks = {}
    for task in cfg.tasks_held():
        t = cfg.for_task(task)
        tasks[task] = {"methods": online,  # every task: adaptive's buffer keeps a VQA sample's question
                       "default_method": t.default_method, "steps": t.train.steps, "lr": t.train.lr,
                       "heldout_fraction": t.heldout_fraction}
    return {"methods": methods, "tasks": tasks, "max_steps": cfg.max_steps}


def split(n: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed shuffled split of ``n`` indices into (train, held-out)."""
    perm = np.random.RandomState(seed).permutation(n)
    return perm[n_test:], perm[:n_test]


def request_hash(s: Submission, method: str, hyper: dict) -> str:
    """What an Idempotency-Key stands for: the same key must come with the same request."""
    h = hashlib.sha256(
        json.dumps([s.name, method, hyper, s.heldout_fraction, s.source, s.task, s.questions], sort_keys=True).encode()
    )
    for a in (s.x, s.y):
        if a is not None:
            h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


# --- files ---------------------------------------------------------------------------------------
def domain_file(cfg: ServerConfig, name: str) -> str:
    """Where a domain's train and held-out arrays live."""
    return cfg.path("domains", f"{name}.safetensors")


def save_domain(
    cfg: ServerConfig, name: str, arrays: dict[str, np.ndarray], questions: dict[str, list[str]] | None = None
) -> None:
    """Persist a domain durably (fsynced, renamed into place) before its job is acknowledged.

    ``questions`` (a vqa domain's, ``{"q_train": [...], "q_test": [...]}``) go into the file's metadata,
    JSON-encoded per split.
    """
    meta = None if questions is None else {k: json.dumps(v) for k, v in questions.items()}
    from safetensors.numpy import save_file

    from training.artifacts import atomic_write

    atomic_write(domain_file(cfg, name),
                 lambda p: save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, p, metadata=meta))


def check_labels(cfg: ServerConfig, db: StateDB | None = None) -> None:
    """The configured labels and model are the ones the data dir's adapters were made for (recorded with v0).

    Raises:
        ValueError: they differ (every adapter's head has one output per recorded label, and its factors
            fit one model only).
    """
    v0 = os.path.join(cfg.path("adapters"), "global@v0.json")
    if os.path.exists(v0):
        with open(v0) as f:
            made_for = json.load(f).get("backbone")
        if made_for and made_for != cfg.backbone:
            what = cfg.setting_name()
            raise ValueError(f"the data dir {cfg.data_dir} holds adapters of {made_for!r}, not {cfg.backbone!r}; "
                             f"set {what}: {made_for} to keep serving them, or use another data dir")
    path = cfg.state_path or cfg.path("state.sqlite")
    if not cfg.class_names or (db is None and not os.path.exists(path)):
        return
    if db is None:
        db = StateDB(path)
        try:
            stored = db.get("labels")
        finally:
            db.close()
    else:
        stored = db.get("labels")
    if stored and stored != cfg.class_names:
        raise ValueError(f"the data dir {cfg.data_dir} serves the labels {stored} (since its first start), not "
                         f"{cfg.class_names}; other labels need another data dir")


class Pipeline:
    """The controller's state and rules, without Ray (thin: SQLite + the adapter store hold everything)."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        os.makedirs(cfg.data_dir, exist_ok=True)
        self.db = StateDB(cfg.state_path or cfg.path("state.sqlite"))
        check_labels(cfg, self.db)
        self.store = AdapterStore(cfg.path("adapters"))

    @property
    def active(self) -> int:
        return self.db.get("active", self.db.max_version())

    @property
    def labels(self) -> list[str]:
        """Class names, or the answer vocabulary recorded from ``global@v0`` (the model defines it)."""
        return self.cfg.class_names or self.db.get("labels", [])

    async def ensure_initial(self, worker: WorkerAPI) -> None:
        """Record ``global@v0`` (made by the worker, which has the backbone) on a fresh data directory."""
        if self.db.versions():
            return
        man = await worker.initial()
        self.db.record_version(None, 0, man["name"], None, "init", [], {}, man["sha256"], {})
        self.db.put("labels", man["class_names"])
        self.db.put("active", 0)

    def set_active(self, version: int) -> None:
        """Make ``version`` the active one (durably); replicas learn of it through the long-poll."""
        self.db.put("active", version)
        crash_point("during-swap")

    # --- accept --------------------------------------------------------------------------------
    def validate(self, s: Submission) -> tuple[str, dict]:
        """Every check that needs no data written; returns ``(method, normalised hyper)``.

        Raises:
            Problem: 422 for a bad name, method or hyper-parameter; 409 for a busy or known domain.
        """
        if not DOMAIN_NAME.fullmatch(s.name or ""):
            raise Problem(422, "invalid-domain-name", "domain name must match [a-z0-9][a-z0-9_-]{0,62}")
        method = s.method or self.cfg.default_method
        hyper = check_hyper(method, s.hyper, self.cfg.max_steps)
        active = self.db.version(self.active)
        if active and active["method"] in ALPHA_METHODS and method not in ALPHA_METHODS:
            raise Problem(409, "incompatible-method",
                          f"the active version v{active['version']} is an adaptive merge (dense ΔW); continue with "
                          f"{list(ALPHA_METHODS)} or activate a LoRA-format version first")
        if self.db.active_job_for(s.name):
            raise Problem(409, "domain-busy", f"domain {s.name!r} already has an ingest job running")
        if s.name in self.db.domain_names():
            raise Problem(409, "domain-exists", f"domain {s.name!r} is already learned; use a new name")
        if len(self.db.domains()) + len(self.db.jobs()) >= self.cfg.max_domains:
            raise Problem(409, "too-many-domains", f"the server holds at most {self.cfg.max_domains} domains")
        return method, hyper

    def replay(self, s: Submission) -> dict | None:
        """The earlier job of the same Idempotency-Key, if any.

        Raises:
            Problem: 422 ``idempotency-key-reused`` when the key came with a different request.
        """
        if not s.key or (prior := self.db.job_by_key(s.key)) is None:
            return None
        if prior["request_hash"] != self.fingerprint(s):
            raise Problem(422, "idempotency-key-reused", "this Idempotency-Key was used for a different request")
        return prior

    def fingerprint(self, s: Submission) -> str:
        return request_hash(s, s.method or self.cfg.default_method, s.hyper)

    def accept(self, s: Submission) -> tuple[dict, bool]:
        """Validate, persist the data, then the job row; returns ``(job, replayed)``.

        Raises:
            Problem: on any validation failure; nothing is written then.
        """
        if (prior := self.replay(s)) is not None:
            return prior, True
        method, hyper = self.validate(s)
        frac = s.heldout_fraction or self.cfg.heldout_fraction
        n_train = n_test = 0
        if s.x is None and not (s.source or "").startswith("builtin:"):
            raise Problem(422, "empty-domain", "no data: send an archive or a file:// source")
        if s.x is not None:
            n_test = max(1, int(round(frac * len(s.y))))
            n_train = len(s.y) - n_test
            if n_train < 1:
                raise Problem(422, "empty-domain", f"{len(s.y)} images leave nothing to train on after the split")
            tr, te = split(len(s.y), n_test, self.cfg.seed)
            q = s.questions
            save_domain(
                self.cfg, s.name,
                {"x_train": s.x[tr], "y_train": s.y[tr], "x_test": s.x[te], "y_test": s.y[te]},
                None if q is None else {"q_train": [q[i] for i in tr], "q_test": [q[i] for i in te]},
            )
            crash_point("after-data-write")
        job_id = uuid.uuid4().hex[:16]
        self.db.add_job(job_id, s.name, method, hyper, s.key, self.fingerprint(s), n_train, n_test,
                        s.source)
        return self.db.job(job_id), False

    # --- recovery ------------------------------------------------------------------------------
    def recover(self) -> dict[str, list]:
        """Make the store and the database agree after a crash, and put interrupted jobs back in line.

        Returns:
            What was done: ``quarantined`` adapter names, ``requeued`` and ``gave_up`` job ids,
            ``resume_swap`` job ids whose version is recorded but whose swap may not have finished.
        """
        known = {v["name"] for v in self.db.versions()}
        stray = [n for n in self.store.sweep() + self.store.names() if VERSION_NAME.fullmatch(n) and n not in known]
        for n in stray:
            self.store.quarantine(n)
        done: dict[str, list] = {"quarantined": stray, "requeued": [], "gave_up": [], "resume_swap": []}
        for j in self.db.jobs(INTERRUPTED):
            again = self.retry_or_fail(j, f"interrupted during {j['status']} by a restart")
            done["requeued" if again else "gave_up"].append(j["id"])
        done["resume_swap"] = [j["id"] for j in self.db.jobs(("swapping",))]
        return done

    def retry_or_fail(self, job: dict, cause: str) -> bool:
        """An attempt of ``job`` ended for a reason that is not the job's (a restart, a lost worker): queue it
        again, or fail it once it has had ``max_attempts``, naming every attempt's cause. Returns whether it
        was queued again."""
        history = [*(job.get("history") or []), {"attempt": job["attempts"], "cause": cause, "at": time.time()}]
        if job["attempts"] < self.cfg.max_attempts:
            self.db.update_job(job["id"], status="queued", history=history,
                               error=f"attempt {job['attempts']} {cause}; retrying")
            return True
        causes = "; ".join(f"{h['attempt']}: {h['cause']}" for h in history)
        hint = (" (the training worker died on every attempt: the domain may need more memory than it has)"
                if all("worker" in h["cause"] for h in history) else "")
        self.db.update_job(job["id"], status="failed", history=history,
                           error=f"gave up after {job['attempts']} attempts{hint}: {causes}")
        return False

    def next_version(self) -> int:
        """One above every version recorded, stored or quarantined: numbers are never reused."""
        on_disk = [int(m.group(1)) for f in self.store.names() + self.store.sweep() + self.store.quarantined()
                   if (m := VERSION_NAME.match(f))]
        return max([self.db.max_version(), *on_disk]) + 1

    # --- one job -------------------------------------------------------------------------------
    async def run(
        self,
        job: dict,
        worker: WorkerAPI,
        activate: Callable[[int], Awaitable[float]],
        progress: Callable[[int, int, float], None],
        phase: Callable[[str], None] | None = None,
    ) -> dict:
        """Run one queued (or recorded-but-unswapped) job to a terminal status; returns the final job row.

        Failures end the job ``failed`` with the reason; a merged version the gate refuses ends it
        ``rejected`` with the numbers, stored but inactive (an operator may still activate it).

        ``progress`` and ``phase`` are handed to the worker, which may run in another process: the
        controller passes calls back to itself; by default ``phase`` writes the job's status here.
        """
        jid, t0 = job["id"], time.time()
        timings: dict[str, float] = dict(job["timings"] or {})
        if job["status"] == "swapping":  # recorded before a crash: only the swap is left
            timings["swap"] = await activate(job["version"])
            self.db.update_job(jid, status="succeeded", timings=timings)
            return self.db.job(jid)
        try:
            parent = self.db.version(self.active)
            self.db.update_job(jid, status="training", attempts=job["attempts"] + 1, step=0, loss=None)
            version = self.next_version()
            phase = phase or (lambda status: self.db.update_job(jid, status=status))  # "merging"
            res = await worker.run(job, parent, version, progress, phase)
            crash_point("after-adapter-write")
            timings.update(res["timings"])
            verdict = self._record(job, parent, version, res)
            if not verdict["passed"]:
                self.db.update_job(jid, status="rejected", version=version, gate=verdict, timings=timings,
                                   error="activation gate: " + "; ".join(verdict["reasons"]))
                versions.prune(self, self.cfg.keep_versions)
                return self.db.job(jid)
            self.db.update_job(jid, gate=verdict)
            timings["swap"] = await activate(version)
            timings["total"] = time.time() - t0
            self.db.update_job(jid, status="succeeded", timings=timings, error=None)
            versions.prune(self, self.cfg.keep_versions)
        except WorkerLost as e:  # the process died, not the job: the same rule as a restart
            self.retry_or_fail(self.db.job(jid), str(e))
        except Exception as e:  # noqa: BLE001 - any failure is reported on the job, never swallowed
            self.db.update_job(jid, status="failed", error=f"{type(e).__name__}: {e}"[:2000], timings=timings)
        return self.db.job(jid)

    def _record(self, job: dict, parent: dict, version: int, res: dict) -> dict:
        """Judge the worker's new version with the gate and record it (one transaction); returns the verdict."""
        info, acc, man = res["info"], res["accuracy"], res["manifest"]
        job = {**job, "n_train": info["n_train"], "n_heldout": info["n_heldout"]}
        self.db.update_job(job["id"], n_train=info["n_train"], n_heldout=info["n_heldout"])
        verdict = gate(self.db.accuracy(parent["version"]), acc, job["domain"], info["zero_shot"],
                       self.cfg.gate.max_drop, self.cfg.gate.require_gain)
        self.db.record_version(
            job, version, man["name"], parent["version"], job["method"], man["domains"],
            {**{k: v for k, v in info.items() if isinstance(v, (int, float))}, **res.get("metrics", {})},
            man["sha256"], acc, res.get("coefficients"), info.get("buffer_size", 0), learned=verdict["passed"],
        )
        crash_point("after-db-record")
        return verdict

    # --- views ---------------------------------------------------------------------------------
    def domains_view(self, limit: int | None = None, after: tuple[float, str] | None = None) -> list[dict]:
        """Learned domains in learning order: all of them, or a page of ``limit`` after ``after``."""
        now, fb = self.db.accuracy(self.active), self.db.feedback()
        rows = self.db.domains() if limit is None else self.db.domain_page(limit, after)
        return [
            {
                "name": d["name"], "samples": d["samples"], "heldout": d["heldout"],
                "learned_version": d["learned_version"], "accuracy_when_learned": d["acc_learned"],
                "accuracy_now": now.get(d["name"]), "feedback_accuracy": fb.get(d["name"]),
                "buffer_size": d["buffer_size"], "created": d["created"],
            }
            for d in rows
        ]

    def adapters_view(self, limit: int | None = None, after: int | None = None) -> dict:
        """The active version and the versions in ascending order: all, or a page of ``limit`` above ``after``."""
        active = self.active
        rows = self.db.versions() if limit is None else self.db.version_page(limit, after)
        return {
            "active": active,
            "versions": [{**v, "accuracy": self.db.accuracy(v["version"]), "active": v["version"] == active}
                         for v in rows],
            "canary": self.db.get("canary"),
            "canary_history": self.db.get("canary_history", []),
        }

    def feedback(self, request_id: str | None, domain: str | None, label: str, prediction: str | None) -> dict:
        """Record one piece of delayed feedback, once per ``request_id``; returns the domain's running
        feedback accuracy, the adapter version it judges and whether it was a replay.

        A prediction's feedback counts once: a retry (same ``request_id``, same label) is answered as the
        first one was, with ``replayed`` true, and counts nothing (the counter behind
        ``mergeserve_feedback_total`` grows only when ``replayed`` is false). Explicit feedback (no
        ``request_id``) judges the active version and cannot be recognised when sent again.

        Raises:
            Problem: unknown label or prediction (422), unknown request (404), unknown domain (422),
                another label for a prediction that has feedback (409).
        """
        labels = self.labels
        if label not in labels:
            raise Problem(422, "unknown-label", f"label {label!r} is not one of {labels}")
        version = self.active
        if request_id:
            p = self.db.prediction(request_id)
            if p is None:
                raise Problem(404, "unknown-request", f"no recorded prediction for request {request_id!r}")
            domain, prediction, version = domain or p["domain"], p["label"], p.get("version")
        if prediction is None or not domain:
            raise Problem(422, "incomplete-feedback", "give request_id, or domain + label + prediction")
        if prediction not in labels:
            raise Problem(422, "unknown-label", f"prediction {prediction!r} is not one of {labels}")
        if domain not in self.db.domain_names():
            raise Problem(422, "unknown-domain", f"domain {domain!r} is not learned (label values stay bounded)")
        got = self.db.add_feedback(domain, prediction == label, request_id or None, label, version)
        first = got["first"]
        if got["replayed"] and first["label"] != label:
            raise Problem(409, "feedback-conflict", f"request {request_id!r} already has feedback {first['label']!r}; "
                          "a prediction's feedback counts once")
        correct = first["correct"] if got["replayed"] else prediction == label
        return {"domain": first.get("domain", domain), "correct": correct, "version": first.get("version", version),
                "feedback_accuracy": got["correct"] / got["total"], "n": got["total"], "replayed": got["replayed"]}
