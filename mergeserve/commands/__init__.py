"""The client commands (``mergeserve ingest``, ``classify``, ``ask``, ``jobs``, ``activate``, ``status``): one
module each, with ``add_arguments(parser)`` and ``run(args) -> int``, over :mod:`mergeserve.client`.

Exit status: 0 done (for ``ingest``: the job ``succeeded``); 1 the job ended ``rejected`` or ``failed``, or
the server could not be reached or failed; 2 the request was refused (a 4xx: the server's problem is printed).
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

from ..client import ClientError


def command(prog: str) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Decorate a command's ``run``: a :class:`ClientError` (or a bad local input, ``ValueError``) becomes one
    line on stderr and its exit status instead of a traceback."""

    def deco(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(run)
        def wrapped(args: argparse.Namespace) -> int:
            try:
                return run(args)
            except ClientError as e:
                print(f"mergeserve {prog}: {e}", file=sys.stderr)
                return 2 if 400 <= e.status < 500 else 1
            except (ValueError, OSError) as e:  # a path that is not a folder or archive, an unreadable file
                print(f"mergeserve {prog}: {e}", file=sys.stderr)
                return 2

        return wrapped

    return deco
