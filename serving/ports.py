"""A free TCP port, for servers started on a shared host (tests, benchmarks, Serve's side listeners).

Stdlib only, so anything may import it (the Ray-free CLI paths, the benchmark scripts, the tests).
"""

from __future__ import annotations

import random
import socket

#: ports reserved for direct ingress from ``--direct-port`` on: one per ``Model`` replica on a node
DIRECT_PORTS = 64
#: the lowest port handed out: Ray's worker processes take ports in [10002, 19999] by default
LOWEST = 20000


def ephemeral_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (Linux's default where unreadable)."""
    try:
        with open(path) as f:
            lo, hi = (int(v) for v in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def bindable(port: int, host: str = "") -> bool:
    """Whether a listening socket could bind ``host:port`` now (``""``: every interface, as HAProxy binds)."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", span: int = 1) -> int:
    """A port that was free a moment ago, on ``host`` and on every interface, with the ``span - 1`` after it.

    Picked at random below the kernel's ephemeral range, not by a bind to port 0: a port from that range can
    be taken, between this pick and the server's bind, as the local port of any outgoing connection (Ray
    opens many), which made a server's HAProxy fail to start now and then. Another process may still take
    the port first; callers start their server at once and fail loudly.

    Args:
        host: the interface the caller's server binds (checked as well as all interfaces).
        span: how many consecutive ports must be free (a range of direct-ingress ports).

    Returns:
        The first port of the free span.
    """
    lo, _ = ephemeral_range()
    top = max(lo, LOWEST + 1000) - span
    pick = random.SystemRandom()
    for _ in range(200):
        port = pick.randrange(LOWEST, top)
        if all(bindable(p) and bindable(p, host) for p in range(port, port + span)):
            return port
    with socket.socket() as s:  # a host with no free port below its ephemeral range: the kernel's pick
        s.bind((host, 0))
        return s.getsockname()[1]
