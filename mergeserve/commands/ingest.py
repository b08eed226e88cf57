"""``mergeserve ingest PATH --name N``: upload a domain and follow its job to the end.

``PATH`` is a folder (``class_name/image`` for classification; images + ``questions.jsonl`` for
``--task vqa``), packed in memory, or an archive (.zip, .tar.gz, ...) sent as it is. A progress bar shows
the job's step, total and loss while it trains (plain lines when stderr is not a terminal), fed by the
job's event stream (``GET /v1/jobs/{id}/events``), or by polling where the server has no stream or it
breaks (a restart: polling waits it out); the exit
status is 0 only when the job ``succeeded`` (1 with the gate's numbers when it is ``rejected``).
"""

from __future__ import annotations

import argparse
import json
import sys

from ..client import add_connection_arguments, connect, pack
from . import command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a folder (class_name/image, or images + questions.jsonl) or an archive")
    p.add_argument("--name", required=True, help="domain name ([a-z0-9][a-z0-9_-]*)")
    p.add_argument("--method", help="pam (the server's default), average, ties, tall, magmax, finetune, adaptive")
    p.add_argument("--hyper", type=_json_object, default=None,
                   help='method hyper-parameters as JSON, e.g. \'{"steps": 40}\'')
    p.add_argument("--task", default="classify",
                   help="whose lineage learns it: classify (default), vqa or a configured task")
    p.add_argument("--heldout-fraction", type=float, help="held-out share for the activation gate (server default 0.2)")
    p.add_argument("--no-wait", action="store_true", help="print the job id once accepted, do not follow it")
    add_connection_arguments(p)


def _json_object(text: str) -> dict:
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r}")
    return obj


@command("ingest")
def run(args: argparse.Namespace) -> int:
    client = connect(args)
    data = pack(args.path)
    acc = client.ingest(args.name, data, args.method, args.hyper, args.task, args.heldout_fraction)
    print(f"accepted: job {acc['job_id']} ({acc['task']} domain {acc['domain']!r}, {len(data) / 2**20:.1f} MiB"
          f"{', replayed' if acc['replayed'] else ''}); GET {client.url}/v1/jobs/{acc['job_id']}", flush=True)
    if args.no_wait:
        return 0
    with Progress() as bar:
        job = client.follow(acc["job_id"], bar.update, on_lost=bar.lost)
    return report(job)


class Progress:
    """A tqdm bar of a job's steps (status, loss), or a line per status and every ~10 % off a terminal."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=0, unit="step", file=sys.stderr, dynamic_ncols=True, disable=None)
        self.tty = not self.bar.disable
        self.last: tuple[str, int] = ("", -1)

    def update(self, job: dict) -> None:
        p, status = job["progress"], job["status"]
        if self.tty:
            self.bar.total = max(p["total"], self.bar.total or 0)
            self.bar.n = p["step"]
            self.bar.set_description(status, refresh=False)
            self.bar.set_postfix(loss=f"{p['loss']:.3f}" if p["loss"] is not None else "-", refresh=False)
            self.bar.refresh()
            return
        tenth = 10 * p["step"] // p["total"] if p["total"] else -1
        if (status, tenth) != self.last and (p["total"] or status != "training"):
            loss = f", loss {p['loss']:.3f}" if p["loss"] is not None else ""
            print(f"{status}: step {p['step']}/{p['total']}{loss}", file=sys.stderr, flush=True)
            self.last = (status, tenth)

    def lost(self, e: Exception) -> None:
        """The server went away (a restart?): said once per outage; the job runs again when it is back."""
        if self.last[0] != "lost":
            self.bar.write(f"server unreachable ({e}); waiting for it: an accepted job survives a restart",
                           file=sys.stderr)
            self.last = ("lost", -1)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def report(job: dict) -> int:
    """Print how a job ended; 0 only for ``succeeded``."""
    gate, t = job.get("gate") or {}, job.get("timings") or {}
    times = ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in t.items())
    if job["status"] == "succeeded":
        new = f"; held-out accuracy {gate['new']:.3f} (zero-shot {gate['zero_shot']:.3f})" if "new" in gate else ""
        print(f"succeeded: {job['domain']!r} is in adapter v{job['adapter_version']}, now active{new}; {times}")
        return 0
    if job["status"] == "rejected":
        drops = ", ".join(f"{d} {v:+.3f}" for d, v in gate.get("drops", {}).items()) or "none"
        print(f"rejected by the activation gate: {job['error']}\n  new domain {gate.get('new', float('nan')):.3f} "
              f"vs zero-shot {gate.get('zero_shot', float('nan')):.3f}; falls of seen domains: {drops}\n"
              f"  stored as v{job['adapter_version']}, inactive: `mergeserve activate {job['adapter_version']}` "
              "serves it anyway", file=sys.stderr)
        return 1
    print(f"failed after {job['attempts']} attempt(s): {job['error']}", file=sys.stderr)
    return 1
