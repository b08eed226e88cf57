"""``mergeserve jobs``: ingest jobs, newest first (``GET /v1/jobs``, one page or ``--all``)."""

from __future__ import annotations

import argparse
import json
import time

from ..client import add_connection_arguments, connect
from . import command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=20, help="jobs per page (default 20, at most 200)")
    p.add_argument("--all", action="store_true", help="every page")
    p.add_argument("--task", help="one task's jobs only (classify, vqa)")
    p.add_argument("--json", action="store_true", help="one JSON object per job")
    add_connection_arguments(p)


@command("jobs")
def run(args: argparse.Namespace) -> int:
    client, cursor, first = connect(args), None, True
    while first or (args.all and cursor):
        page = client.jobs(args.limit, cursor, args.task)
        for j in page["jobs"]:
            print(json.dumps(j) if args.json else line(j))
        cursor, first = page["next_cursor"], False
    if cursor and not args.json:
        print(f"(more: --all, or GET /v1/jobs?cursor={cursor})")
    return 0


def line(j: dict) -> str:
    """One job as a table row: id, task, domain, method, status, progress, version, age."""
    p = j["progress"]
    prog = f"{p['step']}/{p['total']}" if p["total"] else "-"
    version = f"v{j['adapter_version']}" if j["adapter_version"] is not None else "-"
    age = _age(time.time() - j["created"])
    what = f"{j['task']:<8} {j['domain']:<16} {j['method']:<9} {j['status']:<9}"
    return f"{j['id']}  {what} {prog:>9}  {version:>4}  {age}"


def _age(s: float) -> str:
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.0f}h ago"
