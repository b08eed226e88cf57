"""Bearer-token check of the mutating routes, and how OpenAPI documents it.

The token is compared in constant time: a plain ``!=`` returns at the first differing byte, so response
times would tell an attacker how much of a guess is right. Both sides are hashed first, so not even the
token's length shows. A refusal is a 401 problem with ``WWW-Authenticate: Bearer`` (RFC 6750 §3), which
tells a client which scheme to use and, for a token that was sent, that it was wrong.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi.security import HTTPBearer

from .errors import Problem

REALM = "mergeserve"
#: a route dependency that only documents the scheme (OpenAPI ``securitySchemes``, the Authorize button of
#: /docs); :func:`check` decides, because the token lives in the replica's config, not in a global
BEARER = HTTPBearer(auto_error=False, scheme_name="bearer",
                    description="the server's token (MERGESERVE_TOKEN); needed by the routes that change state")


def _digest(s: str) -> bytes:
    return hashlib.sha256(s.encode("utf-8", "surrogatepass")).digest()


def check(token: str | None, authorization: str | None) -> None:
    """Let a request through when the server has no token or the request carries it.

    Args:
        token: The server's token (``auth_token``); ``None`` or empty: every request passes.
        authorization: The request's ``Authorization`` header.

    Raises:
        Problem: 401 ``unauthorized`` with ``WWW-Authenticate: Bearer realm="mergeserve"`` (plus
            ``error="invalid_token"`` when a bearer token was sent but is not the server's).
    """
    if not token:
        return
    scheme, _, sent = (authorization or "").strip().partition(" ")
    bearer = scheme.lower() == "bearer"  # the scheme name is case-insensitive (RFC 7235 §2.1)
    if bearer and hmac.compare_digest(_digest(sent.strip()), _digest(token)):
        return
    challenge = f'Bearer realm="{REALM}"' + (', error="invalid_token"' if bearer and sent.strip() else "")
    raise Problem(401, "unauthorized", "this endpoint needs 'Authorization: Bearer <token>'",
                  header={"WWW-Authenticate": challenge})
