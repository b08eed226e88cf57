"""One error type for every client error, rendered as RFC 9457 problem+json.

:class:`Problem` is raised anywhere on the serving side (archive checks, the pipeline, the controller
actor); it pickles across Ray, and :func:`unwrap` re-raises it on the calling side so the HTTP layer
sees the original status and code.
"""

from __future__ import annotations

import uuid
from typing import Any

from .problems import title

PROBLEM_TYPE = "application/problem+json"
#: status -> code for errors raised by the framework itself (routing, body parsing).
FRAMEWORK_CODES = {
    400: "bad-request",
    404: "not-found",
    405: "method-not-allowed",
    413: "too-large",
    415: "unsupported-media-type",
    422: "invalid-request",
}


class Problem(Exception):
    """A client-facing error: HTTP ``status``, a machine-readable ``code`` and a human ``detail``.

    ``extra`` holds structured context (e.g. the activation gate's numbers) and is merged into the body;
    ``retry_after`` (seconds) becomes a ``Retry-After`` header: the error is temporary. ``header`` adds
    response headers (a 401's ``WWW-Authenticate``).
    """

    def __init__(self, status: int, code: str, detail: str, *, retry_after: int | None = None,
                 header: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(status, code, detail, extra)
        self.status, self.code, self.detail, self.extra = status, code, detail, extra
        self.retry_after, self.header = retry_after, dict(header or {})

    def __reduce__(self) -> tuple:  # keep `extra` as keywords through pickling (Ray)
        return (_rebuild, (self.status, self.code, self.detail, self.extra, self.retry_after, self.header))

    def headers(self) -> dict[str, str]:
        retry = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
        return {**self.header, **retry}

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        """The problem+json document; ``type`` is a relative reference to the page the server itself serves
        for the code (``GET /problems/<code>``, :mod:`serving.problems`), so it resolves wherever the
        answer came from (RFC 9457 §3.1.1)."""
        return {
            "type": f"/problems/{self.code}",
            "title": title(self.code),
            "status": self.status,
            "detail": self.detail,
            "request_id": request_id or uuid.uuid4().hex,
            **self.extra,
        }


def _rebuild(status: int, code: str, detail: str, extra: dict, retry_after: int | None = None,
             header: dict[str, str] | None = None) -> Problem:
    return Problem(status, code, detail, retry_after=retry_after, header=header, **extra)


#: how long a client should wait before retrying a dependency that is restarting (an actor comes back in ~1-2 s)
RETRY_AFTER_S = 2


def unwrap(e: BaseException, what: str = "a server component") -> BaseException:
    """What a failed remote call means for the client: the :class:`Problem` it raised; a 503 with
    ``Retry-After`` when the actor or replica that should answer is dead, restarting or not up yet
    (never the client's fault, and it passes); else ``e`` itself (a 500)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, Problem):
        return cause
    if unavailable(e):
        return Problem(503, "unavailable", f"{what} is restarting or not up yet ({type(e).__name__}); retry",
                       retry_after=RETRY_AFTER_S)
    return e


def unavailable(e: BaseException) -> bool:
    """Whether ``e`` says a Ray actor, worker, node or Serve replica is gone or not (yet) reachable."""
    from ray import exceptions as rx
    from ray.serve import exceptions as sx

    gone = (rx.RayActorError, rx.WorkerCrashedError, rx.NodeDiedError, rx.LocalRayletDiedError, rx.RaySystemError,
            rx.GetTimeoutError, sx.BackPressureError, sx.DeploymentUnavailableError, sx.ReplicaUnavailableError)
    return isinstance(e, gone)
