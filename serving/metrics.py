"""Metrics in one place: the controller's Prometheus registry, the per-replica request recorder, and the
ASGI middleware that gives every request an id, a body limit and a latency sample.

Request counters live in the controller's registry (each replica flushes its samples once a second), so
one scrape of ``/metrics`` is right whatever the replica count. Labels stay bounded: route templates,
status codes, at most ``max_domains`` domains.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .config import DEFAULT_TASK
from .errors import PROBLEM_TYPE, Problem

log = logging.getLogger("ray.serve")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class TaskState:
    """What one task's gauges show at a scrape (read from its database by the controller)."""

    active: int  # the active adapter version
    holdout: dict[str, float]  # held-out accuracy of the active version, per domain
    feedback: dict[str, float]  # cumulative feedback accuracy per domain
    coefficients: dict[str, float] = field(default_factory=dict)  # adaptive: learned α per domain
    parent: int | None = None  # the version the active one was merged from
    drop: dict[str, float] = field(default_factory=dict)  # parent's held-out accuracy minus the active one's
    queued: int = 0  # jobs waiting
    oldest_queued_s: float = 0.0  # how long the oldest of them has waited
    stalled_s: float = 0.0  # seconds since the running job last reported (0: none runs)
    canary: tuple[int, float] | None = None  # the running canary's (candidate version, traffic share)


class ServerMetrics:
    """The controller's series (see docs/serving.md for the contract)."""

    def __init__(self, tasks: tuple[str, ...] = (DEFAULT_TASK,)) -> None:
        self.registry = reg = CollectorRegistry()
        # task: one of ServerConfig.tasks_held() (bounded); domain: at most max_domains per task
        self.accuracy = Gauge(
            "mergeserve_domain_accuracy", "Accuracy per domain", ["task", "domain", "source"], registry=reg
        )
        self.drop = Gauge(
            "mergeserve_domain_accuracy_drop",
            "Held-out accuracy the active version lost per domain against the version it was merged from",
            ["task", "domain", "version", "parent"], registry=reg,
        )
        self.version = Gauge("mergeserve_adapter_version", "Active global adapter version", ["task"], registry=reg)
        # one series while a canary runs (its candidate), none otherwise: the dashboard marks its start and end
        self.canary = Gauge("mergeserve_canary_traffic", "Share of requests the canary candidate answers",
                            ["task", "version"], registry=reg)
        self.coefficient = Gauge(
            "mergeserve_merge_coefficient", "Learned merge coefficient per domain (adaptive)", ["task", "domain"],
            registry=reg,
        )
        # version: the adapter version that made the judged prediction (one series per version that got
        # feedback; a restart of the controller starts them again, which rate() and increase() allow for)
        self.feedback = Counter(
            "mergeserve_feedback", "Feedback on served predictions, counted once per request_id",
            ["task", "domain", "version", "correct"], registry=reg,
        )
        self.jobs = Counter("mergeserve_ingest_jobs_total", "Ingest jobs by status", ["task", "status"], registry=reg)
        self.queued = Gauge("mergeserve_ingest_queued", "Ingest jobs waiting to run", ["task"], registry=reg)
        self.oldest = Gauge("mergeserve_ingest_oldest_queued_seconds", "How long the oldest waiting job has waited",
                            ["task"], registry=reg)
        self.stalled = Gauge("mergeserve_ingest_stalled_seconds",
                             "Seconds since the running job last reported progress (0: none runs)", ["task"],
                             registry=reg)
        self.ingest_healthy = Gauge(
            "mergeserve_ingest_healthy", "1 when the training worker answers, else 0", registry=reg
        )
        self.train = Histogram(
            "mergeserve_training_seconds",
            "Training time per ingest job",
            ["task"],
            registry=reg,
            buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
        )
        self.swap = Histogram(
            "mergeserve_swap_seconds",
            "Activation to last replica swapped",
            ["task"],
            registry=reg,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.requests = Counter("mergeserve_requests", "HTTP requests", ["endpoint", "status"], registry=reg)
        self.latency = Histogram(
            "mergeserve_request_latency_seconds", "HTTP request latency", ["endpoint"], registry=reg,
            buckets=LATENCY_BUCKETS,
        )
        for task in tasks:  # every series an alert or rate() reads exists from the start
            for status in ("accepted", "succeeded", "failed", "rejected", "retried"):
                self.jobs.labels(task, status)
            self.train.labels(task)
            self.swap.labels(task)

    def observe_requests(self, samples: list[tuple[str, str, float]]) -> None:
        for endpoint, status, seconds in samples:
            self.requests.labels(endpoint, status).inc()
            self.latency.labels(endpoint).observe(seconds)

    def count_feedback(self, task: str, domain: str, version: int | None, correct: bool) -> None:
        """One new piece of feedback (never a replayed one: the caller checks)."""
        v = "unknown" if version is None else str(version)
        self.feedback.labels(task, domain, v, "true" if correct else "false").inc()

    def render(self, states: dict[str, TaskState], healthy: bool) -> bytes:
        """Refresh the state gauges and return the exposition text.

        Args:
            states: Per task, what its database says now.
            healthy: Whether the training worker answers.
        """
        self.ingest_healthy.set(int(healthy))
        self.coefficient.clear()
        self.drop.clear()  # only the active version's falls: a rollback ends the series (and its alert)
        self.canary.clear()
        for task, st in states.items():
            self.version.labels(task).set(st.active)
            if st.canary is not None:
                self.canary.labels(task, str(st.canary[0])).set(st.canary[1])
            for source, values in (("holdout", st.holdout), ("feedback", st.feedback)):
                for d, a in values.items():
                    self.accuracy.labels(task, d, source).set(a)
            for d, a in st.coefficients.items():
                self.coefficient.labels(task, d).set(a)
            for d, fall in st.drop.items():
                self.drop.labels(task, d, str(st.active), str(st.parent)).set(fall)
            self.queued.labels(task).set(st.queued)
            self.oldest.labels(task).set(st.oldest_queued_s)
            self.stalled.labels(task).set(st.stalled_s)
        return generate_latest(self.registry)


class Recorder:
    """A replica's request samples and predictions, flushed to the controller by a daemon thread.

    ``flush`` is the only call that talks to the controller; a failed flush keeps the samples for the
    next try (bounded), so a controller restart loses none and one bad row never drops the others'.
    """

    def __init__(self, send: Callable[[list, list], Any], interval: float = 1.0, max_pending: int = 100_000) -> None:
        self.send, self.lock, self.max_pending = send, threading.Lock(), max_pending
        self.requests: list[tuple[str, str, float]] = []
        self.predictions: list[tuple[str, str | None, str, str, int]] = []
        threading.Thread(target=self._loop, args=(interval,), daemon=True, name="metrics-flush").start()

    def add(self, endpoint: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests.append((endpoint, str(status), seconds))

    def predicted(self, rows: list[tuple[str, str | None, str, str, int]]) -> None:
        """``(request_id, domain, label, task, version)`` of served predictions, for delayed feedback."""
        with self.lock:
            self.predictions.extend(rows)

    def take(self) -> tuple[list, list]:
        with self.lock:
            req, pred, self.requests, self.predictions = self.requests, self.predictions, [], []
        return req, pred

    def give_back(self, req: list, pred: list) -> None:
        with self.lock:
            self.requests = (req + self.requests)[-self.max_pending :]
            self.predictions = (pred + self.predictions)[-self.max_pending :]

    def _loop(self, interval: float) -> None:
        while True:
            time.sleep(interval)
            req, pred = self.take()
            if not (req or pred):
                continue
            try:
                self.send(req, pred)
            except Exception:  # noqa: BLE001 - controller restarting: retry with the next flush
                log.warning("metrics flush failed; keeping %d samples for the next try", len(req) + len(pred))
                self.give_back(req, pred)


ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


class RequestMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware task per request): request id, body limit, metrics.

    The body is read here, bounded by ``max_body`` while it streams (chunked bodies included), and
    replayed to the app; an over-limit body gets a 413 problem+json before the app sees it.
    """

    def __init__(self, app: ASGIApp, max_body: int, record: Callable[[str, int, float], None] | None) -> None:
        self.app, self.max_body, self.record = app, max_body, record

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        status = [500]

        async def send_status(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            size += len(msg.get("body", b""))
            if size > self.max_body:
                await _too_large(send_status, rid, self.max_body)
                break
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        if size <= self.max_body:
            body, sent = b"".join(chunks), [False]

            async def replay() -> dict:
                if sent[0]:
                    return await receive()
                sent[0] = True
                return {"type": "http.request", "body": body, "more_body": False}

            await self.app(scope, replay, send_status)
        if self.record is not None:
            route = scope.get("route")
            self.record(getattr(route, "path", "unmatched"), status[0], time.perf_counter() - t0)


async def _too_large(send: Callable, rid: str, limit: int) -> None:
    body = json.dumps(Problem(413, "too-large", f"request body exceeds {limit} bytes").body(rid)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", PROBLEM_TYPE.encode()), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
