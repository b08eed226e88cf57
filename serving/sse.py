"""``GET /v1/jobs/{id}/events``: a job's progress as Server-Sent Events, until the job ends.

A client that follows a job otherwise polls ``GET /v1/jobs/{id}`` (a request, a controller call and a
SQLite read each time, most answering "nothing new"). Here the replica that holds the stream reads the
job every ``poll_s`` and sends only what changed: one ``status`` event per status (the first one at
once), ``progress`` events while step or loss move, a comment every ``keepalive_s`` so that proxies
and the client's read timeout see a live connection, and the stream ends after the terminal status.
Each event's ``data`` is the job exactly as ``GET /v1/jobs/{id}`` shows it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

TERMINAL = ("succeeded", "failed", "rejected")
MEDIA_TYPE = "text/event-stream"
#: headers of the stream: never cached, never buffered by a proxy (nginx reads X-Accel-Buffering)
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(kind: str, data: dict, event_id: int | None = None) -> bytes:
    """One event in the text/event-stream format (``data`` as one line of JSON)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _key(job: dict) -> tuple:
    p = job["progress"]
    return job["status"], p["step"], p["total"], p["loss"]


async def job_events(fetch: Callable[[], Awaitable[dict]], job: dict, poll_s: float = 0.25,
                     keepalive_s: float = 15.0) -> AsyncIterator[bytes]:
    """The stream of one job, from its current row ``job`` on.

    Args:
        fetch: Reads the job again (as the API shows it). A failure (the controller restarting) ends the
            stream with an ``error`` event holding the problem; the client goes on by polling.
        job: The job when the stream opened.
        poll_s: How often the job is read.
        keepalive_s: Longest silence before a comment line is sent.
    """
    last, quiet, n = None, 0.0, 0
    while True:
        key = _key(job)
        if key != last:
            n += 1
            yield event("status" if last is None or last[0] != key[0] else "progress", job, n)
            last, quiet = key, 0.0
        elif quiet >= keepalive_s:
            yield b": keep-alive\n\n"
            quiet = 0.0
        if job["status"] in TERMINAL:
            return
        await asyncio.sleep(poll_s)
        quiet += poll_s
        try:
            job = await fetch()
        except Exception as e:  # noqa: BLE001 - reported in the stream; the client falls back to polling
            yield event("error", _problem(e))
            return


def _problem(e: Exception) -> dict:
    from .errors import Problem, unwrap

    p = unwrap(e, "the controller")
    if not isinstance(p, Problem):
        p = Problem(500, "internal-error", f"{type(e).__name__}: {e}"[:500])
    return p.body()
