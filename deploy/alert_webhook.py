"""The compose stack's Alertmanager webhook receiver: prints one line per alert it is sent (and appends
each notification to ``--out`` as a JSON line), so ``docker compose logs alert-webhook`` shows what paged.

A stand-in for the pager: point ``deploy/alertmanager.yml``'s ``webhook_configs`` (or another receiver
type) at the real one. Standard library only; tests/deploy/test_alertmanager.py runs this file as the
receiver of a real Alertmanager fed by a real Prometheus.
"""

from __future__ import annotations

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def describe(notification: dict) -> list[str]:
    """One line per alert of an Alertmanager webhook notification (payload version 4)."""
    out = []
    for a in notification.get("alerts", []):
        labels, notes = a.get("labels", {}), a.get("annotations", {})
        what = " ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "alertname")
        out.append(f"{a.get('status', '?').upper()} {labels.get('alertname', '?')} {{{what}}}: "
                   f"{notes.get('summary', '')} (runbook: {notes.get('runbook_url', '-')})")
    return out


def handler(out: str | None) -> type[BaseHTTPRequestHandler]:
    class Receiver(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - a liveness probe
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok\n")

        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                notification = json.loads(body)
            except ValueError:
                self.send_response(400)
                self.end_headers()
                return
            for line in describe(notification):
                print(line, flush=True)
            if out:
                with open(out, "a") as f:
                    f.write(json.dumps(notification) + "\n")
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:  # the alert lines say enough
            pass

    return Receiver


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=9095)
    p.add_argument("--out", help="append every notification to this file as a JSON line")
    args = p.parse_args(argv)
    server = ThreadingHTTPServer((args.host, args.port), handler(args.out))
    print(f"alert webhook listening on {args.host}:{args.port}", file=sys.stderr, flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
