"""``mergeserve classify IMAGE...``: the served model's top labels for each image, and which adapter answered."""

from __future__ import annotations

import argparse
import json

from ..client import add_connection_arguments, connect
from . import command

BATCH = 64  # images per request (the server takes up to max_images, 256 by default)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    p.add_argument("--top-k", type=int, default=3, help="labels per image (default 3)")
    p.add_argument("--domain", help="where the images come from (monitoring only)")
    p.add_argument("--json", action="store_true", help="print the server's responses as JSON lines")
    add_connection_arguments(p)


@command("classify")
def run(args: argparse.Namespace) -> int:
    client = connect(args)
    for i in range(0, len(args.images), BATCH):
        paths = args.images[i : i + BATCH]
        blobs = []
        for path in paths:
            with open(path, "rb") as f:
                blobs.append(f.read())
        res = client.classify(blobs, args.top_k, args.domain)
        if args.json:
            print(json.dumps(res))
            continue
        for path, preds in zip(paths, res["results"]):
            top = "  ".join(f"{p['label']} {p['score']:.3f}" for p in preds)
            print(f"{path}\t{top}\t(adapter v{res['adapter_version']})")
    return 0
