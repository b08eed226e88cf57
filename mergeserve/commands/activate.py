"""``mergeserve activate V``: serve adapter version ``V`` (roll back or forward), through the hot-swap path."""

from __future__ import annotations

import argparse

from ..client import add_connection_arguments, connect
from . import command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("version", type=int, help="an adapter version (GET /v1/adapters lists them)")
    p.add_argument("--task", default="classify", help="whose lineage: classify (default), vqa or a configured task")
    add_connection_arguments(p)


@command("activate")
def run(args: argparse.Namespace) -> int:
    res = connect(args).activate(args.version, args.task)
    print(f"{args.task}: adapter v{res['active']} active; every replica swapped in {res['swap_seconds']:.2f} s")
    return 0
