"""One error type for every client error, rendered as RFC 9457 problem+json.

:class:`Problem` is raised anywhere on the serving side (archive checks, the pipeline, the controller
actor); it pickles across Ray, and :func:`unwrap` re-raises it on the calling side so the HTTP layer
sees the original status and code.
"""

from __future__ import annotations

import uuid
from typing import Any

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

    ``extra`` holds structured context (e.g. the activation gate's numbers) and is merged into the body.
    """

    def __init__(self, status: int, code: str, detail: str, **extra: Any) -> None:
        super().__init__(status, code, detail, extra)
        self.status, self.code, self.detail, self.extra = status, code, detail, extra

    def __reduce__(self) -> tuple:  # keep `extra` as keywords through pickling (Ray)
        return (_rebuild, (self.status, self.code, self.detail, self.extra))

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        """The problem+json document."""
        return {
            "type": f"https://mergeserve.dev/problems/{self.code}",
            "title": self.code.replace("-", " ").capitalize(),
            "status": self.status,
            "detail": self.detail,
            "request_id": request_id or uuid.uuid4().hex,
            **self.extra,
        }


def _rebuild(status: int, code: str, detail: str, extra: dict) -> Problem:
    return Problem(status, code, detail, **extra)


def unwrap(e: BaseException) -> BaseException:
    """The :class:`Problem` a remote Ray call raised, or ``e`` itself."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, Problem) else e
