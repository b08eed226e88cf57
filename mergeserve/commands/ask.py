"""``mergeserve ask IMAGE QUESTION``: the VQA model's answer (and runners-up) about one image."""

from __future__ import annotations

import argparse
import json

from ..client import add_connection_arguments, connect
from . import command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="an image file")
    p.add_argument("question", help='e.g. "how many circles are there?"')
    p.add_argument("--top-k", type=int, default=3, help="answers shown (default 3)")
    p.add_argument("--task", default="vqa", help="which question task answers: vqa (default), or one from the "
                   "server's tasks config (vlm, ...)")
    p.add_argument("--json", action="store_true", help="print the server's response as JSON")
    add_connection_arguments(p)


@command("ask")
def run(args: argparse.Namespace) -> int:
    with open(args.image, "rb") as f:
        res = connect(args).ask(f.read(), args.question, args.top_k, args.task)
    if args.json:
        print(json.dumps(res))
        return 0
    a = res["answers"][0]
    others = ", ".join(f"{x['answer']} {x['score']:.3f}" for x in a["top_k"][1:])
    then = f"  then: {others}" if others else ""
    score = "" if a["score"] is None else f"{a['score']:.3f}; "  # a generated answer has no score
    print(f"{a['answer']} ({score}adapter v{res['adapter_version']}){then}")
    return 0
