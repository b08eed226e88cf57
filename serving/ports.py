"""A free TCP port on the loopback interface, for servers started on a shared host (tests, benchmarks).

Stdlib only, so anything may import it (the Ray-free CLI paths, the benchmark scripts, the tests).
"""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free on ``host`` a moment ago: the kernel's pick for a bind to port 0.

    The socket is closed before returning, so another process may take the port first; callers that start a
    server on it retry or fail loudly (every caller here starts its server at once).
    """
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
