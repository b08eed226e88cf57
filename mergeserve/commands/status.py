"""``mergeserve status``: whether the server is ready, and per task its model, labels, version and domains."""

from __future__ import annotations

import argparse
import json

from ..client import add_connection_arguments, connect
from . import command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print readiness and tasks as JSON")
    add_connection_arguments(p)


@command("status")
def run(args: argparse.Namespace) -> int:
    st = connect(args).status()
    if args.json:
        print(json.dumps(st))
        return 0 if st["ready"]["status"] == "ready" else 1
    r = st["ready"]
    ingest = r.get("ingest", {})
    print(f"{st['url']}: {r['status']}" + (f" (worker {ingest.get('worker')}, {ingest.get('queued', 0)} queued)"
                                           if ingest else f": {r.get('detail', '')}"))
    for t in st["tasks"]:
        labels = ", ".join(t["labels"][:12]) + (f", … ({len(t['labels'])})" if len(t["labels"]) > 12 else "")
        print(f"  {t['name']}: {t['model']}, adapter v{t['active_version']}, domains {t['domains'] or '-'}; "
              f"labels: {labels}")
    return 0 if r["status"] == "ready" else 1
