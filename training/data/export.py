"""``mergeserve export``: write a benchmark domain as an upload archive (zip or tar.gz).

A classification domain becomes ``class_name/image.png``; a VQA domain (``scenes_vqa``) becomes
``images/i.png`` + ``questions.jsonl`` (one ``{"image", "question", "answer"}`` per line), the layouts
``POST /v1/domains`` reads. Useful to try ingestion with real data and no network, e.g.
``mergeserve export --domain sklearn --out sklearn.tar.gz`` or
``mergeserve export --benchmark scenes_vqa --domain count --out count.tar.gz``; an ``--out`` without an
archive suffix is a folder of the same layout (images to classify: ``--split test --out digits``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import zipfile

from PIL import Image

from . import load_benchmark


def export_domain(benchmark: str, domain: str, out: str, limit: int | None = None, split: str = "train") -> int:
    """Write one domain's images; returns how many were written.

    Raises:
        KeyError: unknown benchmark or domain. ValueError: ``out`` is an existing file or non-empty folder.
    """
    b = load_benchmark(benchmark, domains=[domain])
    d = b.domains[0]
    x, y = (d.x_train, d.y_train) if split == "train" else (d.x_test, d.y_test)
    n = len(y) if limit is None else min(limit, len(y))
    questions = getattr(d, "q_train" if split == "train" else "q_test", None)
    files, rows = [], []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(buf, format="PNG")
        answer = b.classes[int(y[i])]
        if questions is None:
            files.append((f"{answer}/{domain}_{i:05d}.png", buf.getvalue()))
        else:
            files.append((f"images/{i:05d}.png", buf.getvalue()))
            rows.append({"image": f"images/{i:05d}.png", "question": questions[i], "answer": answer})
    if rows:
        files.append(("questions.jsonl", "\n".join(json.dumps(r) for r in rows).encode()))
    if out.endswith(".zip"):
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in files:
                zf.writestr(name, data)
    elif out.endswith((".tar.gz", ".tgz")):
        with tarfile.open(out, "w:gz") as tf:
            for name, data in files:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    else:  # a folder: the same layout as files (what `mergeserve ingest` packs, `classify` reads)
        if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
            raise ValueError(f"{out!r} is neither a .zip / .tar.gz name nor a new or empty folder")
        for name, data in files:
            os.makedirs(os.path.dirname(os.path.join(out, name)), exist_ok=True)
            with open(os.path.join(out, name), "wb") as f:
                f.write(data)
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    """CLI flags of ``mergeserve export``."""
    p.add_argument("--benchmark", default="digits5", help="benchmark (default digits5)")
    p.add_argument("--domain", required=True, help="domain name, e.g. sklearn")
    p.add_argument("--out", required=True, help="output .zip or .tar.gz, or else a new (or empty) folder")
    p.add_argument("--limit", type=int, help="at most this many images")
    p.add_argument("--split", choices=["train", "test"], default="train", help="which split (default train)")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``mergeserve export``."""
    try:
        n = export_domain(args.benchmark, args.domain, args.out, args.limit, args.split)
    except (KeyError, ValueError) as e:
        print(f"mergeserve export: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    print(f"wrote {n} examples of {args.benchmark}/{args.domain} to {args.out}")
    return 0
