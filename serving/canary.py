"""Canary activation: a candidate version answers a fraction of the requests beside the active one, and is promoted
or rolled back on live accuracy.

The routing is a pure function of a key (a client's ``X-Client-ID``, else the request id): the same client always
sees the same version, and over many clients the candidate's share is ``traffic``. The state lives in the
task's SQLite key-value table (``canary``), so a restart keeps serving the same split; every ended canary is
appended to ``canary_history`` with how it ended and the numbers that decided it. Plain functions; no Ray.
"""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING

from .errors import Problem

if TYPE_CHECKING:
    from .pipeline import Pipeline


def route(key: str, traffic: float) -> bool:
    """Whether the request keyed ``key`` goes to the candidate: a stable uniform draw in [0, 1) below ``traffic``."""
    draw = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return draw < traffic


def current(pipe: Pipeline) -> dict | None:
    """The running canary: ``{"version", "name", "traffic", "promote_when", "started"}``, or None."""
    return pipe.db.get("canary")


def start(pipe: Pipeline, version: int, traffic: float, promote_when: dict | None) -> dict:
    """Make ``version`` the candidate for ``traffic`` of the requests (replacing a running canary, which is
    recorded as ``replaced``).

    Raises:
        Problem: 404 for an unknown version; 409 when it is the active one.
    """
    row = pipe.db.version(version)
    if row is None:
        raise Problem(404, "unknown-version", f"no adapter version {version}")
    if version == pipe.active:
        raise Problem(409, "already-active", f"v{version} is the active version; a canary is another version")
    end(pipe, "replaced")  # only once the new one is valid: a refused request leaves the running canary be
    state = {"version": version, "name": row["name"], "traffic": traffic, "promote_when": promote_when,
             "started": time.time(), "against": pipe.active}
    pipe.db.put("canary", state)
    return state


def end(pipe: Pipeline, outcome: str, numbers: dict | None = None, **extra: int) -> dict | None:
    """End the running canary (``promoted``, ``rolled-back``, ``stopped``, ``replaced`` or ``superseded``) and
    record how (``extra``: e.g. ``superseded_by``, the version a job activated meanwhile)."""
    state = current(pipe)
    if state is None:
        return None
    done = {**state, "outcome": outcome, "ended": time.time(), "numbers": numbers or {}, **extra}
    pipe.db.put("canary_history", [*pipe.db.get("canary_history", []), done])
    pipe.db.put("canary", None)
    return done


def judge(pipe: Pipeline) -> tuple[str | None, dict] | None:
    """The running canary's verdict on the feedback given since it started (``verdict``), or None when no
    canary with ``promote_when`` runs."""
    state = current(pipe)
    if state is None or not state.get("promote_when"):
        return None
    since, rule = state["started"], state["promote_when"]
    return verdict(pipe.db.feedback_by_version(since, state["against"]),
                   pipe.db.feedback_by_version(since, state["version"]), rule["min_feedback"], rule["max_drop"])


def verdict(active: dict[str, tuple[int, int]], candidate: dict[str, tuple[int, int]], min_feedback: int,
            max_drop: float) -> tuple[str | None, dict]:
    """Promote or roll back on live per-domain accuracy: ``(decision, numbers)``.

    ``active`` and ``candidate`` map a domain to ``(correct, total)`` feedback for answers each version gave
    while the canary ran. A candidate more than ``max_drop`` below the active version on any domain with at
    least ``min_feedback`` answers of each is rolled back at once; it is promoted when every domain it has
    answered has ``min_feedback`` of each and none fell that far; until then, no decision (None).
    """
    numbers, ready = {}, bool(candidate)
    for d, (ok, n) in candidate.items():
        a_ok, a_n = active.get(d, (0, 0))
        enough = n >= min_feedback and a_n >= min_feedback
        drop = (a_ok / a_n - ok / n) if enough else None
        numbers[d] = {"candidate": ok / n if n else None, "active": a_ok / a_n if a_n else None, "n": n,
                      "n_active": a_n, "drop": drop}
        if enough and drop > max_drop:
            return "rolled-back", numbers
        ready = ready and enough
    return ("promoted" if ready else None), numbers
