"""The ``mergeserve`` command line: one registry of subcommands, each imported only when it runs."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__

#: subcommand -> (module, help). The module defines ``add_arguments(parser)`` and ``run(args) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("mergeserve.demo", "merge random LoRA task vectors with every method and print a table"),
    "pretrain": ("training.recipes.backbone", "pretrain the offline default backbone on procedural letters+shapes"),
    "pretrain-vqa": ("training.recipes.vqa", "pretrain an offline VQA model (--model film_scenes, the "
                     "default, or vilt_scenes) on scenes questions"),
    "bench": ("training.bench", "run a continual-learning benchmark protocol and print the paper-style table"),
    "serve": ("serving.app", "start the Ray Serve application (in-process Ray unless --address)"),
    "bench-serve": ("benchmarks.serve.run", "measure serving throughput, latency during a hot swap, and ingest time"),
    "export": ("training.data.export", "write a benchmark domain as a class_name/image archive for POST /v1/domains"),
    # clients of a running server (HTTP only: MERGESERVE_URL, MERGESERVE_TOKEN)
    "ingest": ("mergeserve.commands.ingest", "upload a domain (folder or archive) and follow its job to the end"),
    "classify": ("mergeserve.commands.classify", "classify image files with the served model"),
    "ask": ("mergeserve.commands.ask", "ask the VQA model a question about an image"),
    "jobs": ("mergeserve.commands.jobs", "list ingest jobs, newest first"),
    "activate": ("mergeserve.commands.activate", "serve another adapter version (roll back or forward)"),
    "status": ("mergeserve.commands.status", "is the server ready; each task's model, labels, version, domains"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser. Only ``command``'s module is imported (torch and ray are slow to import),
    so ``mergeserve --help`` stays instant and each subcommand adds its own arguments."""
    parser = argparse.ArgumentParser(
        prog="mergeserve",
        description="An inference server that keeps learning: LoRA continual learning by aligned merging.",
    )
    parser.add_argument("--version", action="version", version=f"mergeserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mergeserve`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
