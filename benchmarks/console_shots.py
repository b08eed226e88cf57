"""Screenshots of the console for docs/console.md, from a real server and a real browser.

A local server (the offline ``vit_tiny_offline`` backbone, digit labels, no token) learns digits5 domains:
two through the API, a third (adaptive, so learned α shows) through the console's ingest form with the
folder picked in its drop zone; a fourth is queued so the jobs view has a queue. Served answers get delayed
feedback, so the matrix's live-feedback column has numbers. Then chromium (``tests/serving/_browser.py``, the
browser test's launch) photographs each view into ``docs/console-<view>.png``.

    .venv-dev/bin/python benchmarks/console_shots.py      # ~3 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests", "serving")]

from _browser import browser  # noqa: E402
from _local_serve import local_mergeserve  # noqa: E402

from mergeserve.client import Client, pack  # noqa: E402
from training.data.export import export_domain  # noqa: E402

VIEWS = ("accuracy", "lineage", "jobs", "ingest", "try")


def export(tmp: str, domain: str, limit: int, split: str = "train") -> str:
    out = os.path.join(tmp, f"{domain}-{split}")
    export_domain("digits5", domain, out, limit=limit, split=split)
    return out


def learn(client: Client, folder: str, name: str, method: str = "pam") -> dict:
    job = client.ingest(name, pack(folder), method=method)
    return client.follow(job["job_id"], lambda j: None)


def feedback(client: Client, folder: str, domain: str) -> None:
    """Classify the domain's test images as served traffic, then send their true labels as feedback."""
    files = sorted((label, os.path.join(folder, label, f)) for label in os.listdir(folder)
                   for f in os.listdir(os.path.join(folder, label)))
    images = [open(p, "rb").read() for _, p in files]
    out = client.classify(images, domain=domain)
    for j, (label, _) in enumerate(files):
        client.request("POST", "/v1/feedback", json={"request_id": f"{out['request_id']}:{j}", "label": label})


def shoot(page: object, view: str, out_dir: str) -> None:
    page.click(f"#tab-{view}")
    page.wait_for_selector(f"section#{view}:not([hidden])")
    page.wait_for_timeout(300)
    page.screenshot(path=os.path.join(out_dir, f"console-{view}.png"), full_page=True)


def ingest_in_console(page: object, folder: str, out_dir: str, meanwhile: Callable[[], object]) -> None:
    """The third domain through the page: pick the folder, adaptive with spc 1, submit; once it trains,
    ``meanwhile()`` queues another job and the jobs view is photographed; then wait for the end."""
    page.click("#tab-ingest")
    page.set_input_files("#ingest-folder", folder)
    page.wait_for_function("() => document.getElementById('ingest-picked').textContent.startsWith('Ready')")
    page.fill("#ingest-name", "printed")
    page.select_option("#ingest-method", "adaptive")
    page.fill("#hyper-spc", "1")
    page.screenshot(path=os.path.join(out_dir, "console-ingest.png"), full_page=True)
    page.click("#ingest-submit")
    page.wait_for_function("() => / step [1-9]/.test(document.getElementById('ingest-status').textContent)",
                           timeout=120_000)
    meanwhile()
    page.wait_for_selector("#jobs-queue li", state="attached")
    shoot(page, "jobs", out_dir)
    page.click("#tab-ingest")
    page.wait_for_function("() => /succeeded|failed|rejected/.test(document.getElementById('ingest-status')"
                           ".textContent)", timeout=300_000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs"), help="folder for console-<view>.png")
    ap.add_argument("--steps", type=int, default=60, help="training steps per domain")
    args = ap.parse_args()
    t0 = time.time()
    config = {"train": {"steps": args.steps}, "auth_token": None, "worker_idle_s": 0}
    with local_mergeserve("vit_tiny_offline", config=config) as (base, _, tmp):
        client = Client(base, token="")
        for d in ("mnist", "sklearn"):
            print(d, learn(client, export(tmp, d, 400), d)["status"], flush=True)
        printed, sketch = export(tmp, "printed", 400), export(tmp, "sketch", 400)
        for d in ("mnist", "sklearn"):
            feedback(client, export(tmp, d, 40, split="test"), d)
        with browser() as b:
            page = b.new_page(viewport={"width": 1200, "height": 820})
            page.goto(f"{base}/ui")
            page.wait_for_selector("body[data-ready]", timeout=60_000)
            queued = []
            ingest_in_console(page, printed, args.out,
                              lambda: queued.append(client.ingest("sketch", pack(sketch), method="adaptive")))
            client.follow(queued[0]["job_id"], lambda j: None)
            page.reload()
            page.wait_for_selector("body[data-ready]")
            page.click("#tab-try")
            sample = export(tmp, "printed", 1, split="test")
            label = os.listdir(sample)[0]
            page.set_input_files("#try-image", os.path.join(sample, label, os.listdir(os.path.join(sample, label))[0]))
            page.click("#try-submit")
            page.wait_for_selector("#try-results")
            shoot(page, "try", args.out)
            for view in ("accuracy", "lineage"):
                shoot(page, view, args.out)
    print(f"wrote {', '.join(f'console-{v}.png' for v in VIEWS)} to {args.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
