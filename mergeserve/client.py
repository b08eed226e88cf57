"""A small HTTP client of the mergeserve API, for the command line (``mergeserve ingest``, ``classify``, ``ask``,
``jobs``, ``activate``, ``status``) and for scripts. Talks HTTP only: no torch, no Ray.

``MERGESERVE_URL`` (default ``http://127.0.0.1:8000``) and ``MERGESERVE_TOKEN`` (the bearer token mutating
routes need when the server has one) are read from the environment; the commands' ``--server`` and
``--token`` flags win over them.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import tarfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = ("succeeded", "failed", "rejected")
PROBLEM = "application/problem+json"
ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


class ClientError(Exception):
    """The server refused a request (``status`` and the problem ``code``), or could not be reached (status 0)."""

    def __init__(self, message: str, status: int = 0, code: str = "unreachable") -> None:
        super().__init__(message)
        self.status, self.code = status, code


class Client:
    """The API's routes as methods; every error is a :class:`ClientError` carrying the server's problem."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 120.0) -> None:
        self.url = (url or os.environ.get("MERGESERVE_URL") or DEFAULT_URL).rstrip("/")
        token = token if token is not None else os.environ.get("MERGESERVE_TOKEN")
        self.http = httpx.Client(base_url=self.url, timeout=timeout,
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
        self.followed: str | None = None  # how the last follow() saw its job end: "events" or "polling"

    def request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise ClientError(f"cannot reach the server at {self.url} ({type(e).__name__}: {e}); is "
                              "`mergeserve serve` running there? (--server / MERGESERVE_URL)") from None
        if r.status_code == 404 and not r.headers.get("content-type", "").startswith(PROBLEM):
            # every error of the API is problem+json: a plain 404 is Serve's, before the app's routes exist
            raise ClientError(f"404 from {self.url} before its routes exist (still starting?): {r.text[:200]}",
                              503, "not-ready")
        self._check(r)
        return r.json()

    def _check(self, r: httpx.Response) -> None:
        """Raise the :class:`ClientError` an error response stands for (its problem's status and code)."""
        if r.status_code >= 400:
            try:
                body = r.json()
            except ValueError:
                raise ClientError(f"{r.status_code}: {r.text[:500]}", r.status_code, "http-error") from None
            code = _code(body) if isinstance(body, dict) else "http-error"
            detail = body.get("detail", "") if isinstance(body, dict) else r.text[:500]
            raise ClientError(f"{r.status_code} {code}: {detail}", r.status_code, code)

    # --- routes --------------------------------------------------------------------------------
    def ingest(self, name: str, archive: bytes, method: str | None = None, hyper: dict | None = None,
               task: str = "classify", heldout_fraction: float | None = None, key: str | None = None) -> dict:
        """``POST /v1/domains``; retried once on a dropped connection under the same Idempotency-Key, so a
        retry never starts a second job."""
        form = {"name": name, "task": task, **({"method": method} if method else {})}
        if hyper:
            form["hyper"] = json.dumps(hyper)
        if heldout_fraction is not None:
            form["heldout_fraction"] = str(heldout_fraction)
        headers = {"Idempotency-Key": key or uuid.uuid4().hex}
        for attempt in (1, 2):
            try:
                return self.request("POST", "/v1/domains", data=form, headers=headers,
                                    files={"archive": (f"{name}.tar.gz", archive, "application/octet-stream")})
            except ClientError as e:
                if e.status or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def job(self, job_id: str) -> dict:
        return self.request("GET", f"/v1/jobs/{job_id}")

    def jobs(self, limit: int = 20, cursor: str | None = None, task: str | None = None) -> dict:
        params = {"limit": limit, **({"cursor": cursor} if cursor else {}), **({"task": task} if task else {})}
        return self.request("GET", "/v1/jobs", params=params)

    def events(self, job_id: str, read_timeout_s: float = 60.0) -> Iterator[tuple[str, dict]]:
        """``GET /v1/jobs/{id}/events``: ``(event, job)`` pairs as the server sends them, until the stream ends.

        The server sends a comment at least every 15 s, so ``read_timeout_s`` of silence means a lost stream.

        Raises:
            ClientError: the route refused (its problem), is missing (an older server), or the connection broke.
        """
        timeout = httpx.Timeout(self.http.timeout.connect, read=read_timeout_s)
        try:
            with self.http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=timeout,
                                  headers={"Accept": "text/event-stream"}) as r:
                if r.status_code >= 400 or not r.headers.get("content-type", "").startswith("text/event-stream"):
                    r.read()
                    self._check(r)
                    raise ClientError(f"{r.status_code}: not an event stream", r.status_code, "http-error")
                yield from parse_events(r.iter_lines())
        except httpx.HTTPError as e:
            raise ClientError(f"event stream from {self.url} lost ({type(e).__name__}: {e})") from None

    def follow(self, job_id: str, on_update: Callable[[dict], None], poll_s: float = 0.5, patience_s: float = 180.0,
               on_lost: Callable[[ClientError], None] | None = None, stream: bool = True) -> dict:
        """Follow a job until it ends; ``on_update(job)`` sees every state. Returns the final job.

        The job's event stream (:meth:`events`) first, when ``stream``; polling ``GET /v1/jobs/{id}`` from
        where it broke off when the stream is not there (an older server), breaks or reports an error.
        An accepted job survives a server restart (it runs again), so, polling, an unreachable server or a
        502/503/504 is waited out, up to ``patience_s`` seconds in a row (``on_lost`` hears of each miss).
        ``self.followed`` says how the job was followed to its end: ``"events"`` or ``"polling"``.

        Raises:
            ClientError: the job is unknown, or the server stayed away longer than ``patience_s``.
        """
        if stream:
            try:
                for kind, job in self.events(job_id):
                    if kind in ("status", "progress"):
                        on_update(job)
                        if job.get("status") in TERMINAL:
                            self.followed = "events"
                            return job
            except ClientError:
                pass  # no stream, or it broke: polling picks up from the job's current state
        self.followed = "polling"
        lost = None
        while True:
            try:
                j = self.job(job_id)
            except ClientError as e:
                if e.status not in (0, 502, 503, 504):
                    raise
                lost = lost or time.monotonic()
                if time.monotonic() - lost > patience_s:
                    raise
                if on_lost is not None:
                    on_lost(e)
                time.sleep(1.0)
                continue
            lost = None
            on_update(j)
            if j["status"] in TERMINAL:
                return j
            time.sleep(poll_s)

    def classify(self, images: list[bytes], top_k: int = 3, domain: str | None = None) -> dict:
        body = {"images": [base64.b64encode(b).decode() for b in images], "top_k": top_k}
        return self.request("POST", "/v1/classify", json={**body, **({"domain": domain} if domain else {})})

    def ask(self, image: bytes, question: str, top_k: int = 1, task: str = "vqa") -> dict:
        body = {"image": base64.b64encode(image).decode(), "question": question, "top_k": top_k}
        return self.request("POST", f"/v1/{task}", json=body)

    def activate(self, version: int, task: str = "classify") -> dict:
        return self.request("POST", f"/v1/adapters/{version}/activate", params={"task": task})

    def status(self) -> dict:
        """``/readyz`` (its problem when not ready) and ``/v1/tasks`` together."""
        try:
            ready = self.request("GET", "/readyz")
        except ClientError as e:
            if not e.status:
                raise
            ready = {"status": "not-ready", "detail": str(e)}
        return {"url": self.url, "ready": ready, "tasks": self.request("GET", "/v1/tasks")["tasks"]}


def parse_events(lines: Iterable[str]) -> Iterator[tuple[str, dict]]:
    """``(event, data)`` from text/event-stream lines: ``data`` is JSON; comments and ids are skipped."""
    kind, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield kind, json.loads("\n".join(data))
            kind, data = "message", []
        elif line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


def _code(body: dict) -> str:
    return str(body.get("type", "")).rsplit("/", 1)[-1] or "http-error"


def pack(path: str) -> bytes:
    """An upload archive from ``path``: an archive file as it is, or a folder packed as tar.gz in memory
    (every regular, non-hidden file under it, paths relative to it; links are not followed).

    Raises:
        ValueError: ``path`` is neither a folder nor an archive file.
    """
    if os.path.isfile(path):
        if not path.lower().endswith(ARCHIVES):
            raise ValueError(f"{path}: not a folder or a .zip / .tar(.gz|.bz2|.xz) archive")
        with open(path, "rb") as f:
            return f.read()
    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such folder or archive")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                full = os.path.join(root, name)
                if not name.startswith(".") and os.path.isfile(full) and not os.path.islink(full):
                    tf.add(full, arcname=os.path.relpath(full, path), recursive=False)
    return buf.getvalue()


def add_connection_arguments(p: argparse.ArgumentParser) -> None:
    """``--server`` and ``--token``, shared by every client command."""
    p.add_argument("--server", help=f"server URL (default $MERGESERVE_URL, else {DEFAULT_URL})")
    p.add_argument("--token", help="bearer token for mutating routes (default $MERGESERVE_TOKEN)")


def connect(args: argparse.Namespace) -> Client:
    return Client(args.server, args.token)
