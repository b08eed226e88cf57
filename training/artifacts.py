"""Files that must never be seen half-written: atomic writes, weights with provenance, weights built on demand.

Every writer of durable state goes through :func:`atomic_write` (or :func:`atomic_dir` for a directory): the
content goes to a temporary name in the same directory (``<name>.tmp-<pid>``, which
:meth:`training.store.AdapterStore.sweep` recognises), is fsynced, renamed over the real name and the directory
is fsynced, so after a crash the real name holds the old content or the new, never a mix, and the rename
itself survives a power cut.

Weights come with provenance (:func:`save_with_provenance`): the record goes into the safetensors metadata
(``{"provenance": json}``) and, with the weights' SHA-256, into a JSON sidecar; the sidecar is written before
the weights are renamed into place, so weights under their real name always have their sidecar.
:func:`ensure_weights` returns weights that exist and match their sidecar's checksum, else builds them.

Builders of default weights (the pretraining recipes, :mod:`training.recipes`) register themselves in
:data:`BUILDERS`; the loaders look a builder up by name and never import a recipe, so the recipes sit above
the loaders in the import graph. Stdlib only at import: the torch-free controller writes through it too.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .registry import Registry

if TYPE_CHECKING:
    import torch

RECIPES = "training.recipes"  # the package whose modules register the builders (imported on first lookup)


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _temp_name(path: str) -> str:
    return f"{path.rstrip(os.sep)}.tmp-{os.getpid()}"


def fsync_dir(path: str) -> None:
    """fsync a directory, so the renames and creations inside it survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write(path: str, write: Callable[[str], None], mode: int | None = None) -> None:
    """Write a file through ``write(temp_path)``, then fsync it, rename it to ``path`` and fsync the directory.

    Args:
        path: The file's real name; its directory is created when missing.
        write: Writes the whole content to the path it is given (never to ``path`` itself).
        mode: Permission bits for the file (e.g. ``0o644``: safetensors writes 0600), set before the rename.

    If ``write`` raises, ``path`` keeps its old content and the temporary file is removed.
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = _temp_name(path)
    try:
        write(tmp)
        _fsync_file(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_dir(parent)


def write_text(path: str, text: str, mode: int | None = None) -> None:
    """:func:`atomic_write` of a text file."""

    def write(p: str) -> None:
        with open(p, "w") as f:
            f.write(text)

    atomic_write(path, write, mode)


def write_json(path: str, obj: Any, indent: int | None = None) -> None:
    """:func:`atomic_write` of ``obj`` as JSON (with a final newline when indented, as an editor would)."""
    write_text(path, json.dumps(obj, indent=indent) + ("\n" if indent is not None else ""))


def atomic_dir(path: str, write: Callable[[str], None]) -> None:
    """Write a directory through ``write(temp_dir)`` and swap it in for ``path`` whole.

    Every file inside is fsynced before the swap. The old directory is renamed aside (not deleted) until the
    new one is in place, so a crash leaves the old or the new directory under ``path`` (or, between the two
    renames, none: a loader then rebuilds), never a partly written one. If ``write`` raises, ``path`` is
    untouched and the temporary directory is removed.
    """
    parent = os.path.dirname(os.path.abspath(path.rstrip(os.sep)))
    os.makedirs(parent, exist_ok=True)
    tmp, old = _temp_name(path), f"{path.rstrip(os.sep)}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        for root, _, files in os.walk(tmp):
            for f in files:
                _fsync_file(os.path.join(root, f))
            fsync_dir(root)
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(parent)


def save_with_provenance(
    path: str,
    tensors: dict[str, torch.Tensor],
    provenance: dict,
    sidecar: str,
    metadata: dict[str, str] | None = None,
) -> dict:
    """Save weights (safetensors, mode 0644) with ``provenance`` in their metadata and in a JSON sidecar.

    Args:
        path: The weights file.
        tensors: The state dict (made contiguous and moved to the CPU here).
        provenance: A JSON-serialisable record (recipe, config, versions, results).
        sidecar: The JSON file that receives the provenance plus ``sha256``, the weights' checksum (a file
            cannot hold its own checksum).
        metadata: More safetensors metadata (e.g. transformers' ``{"format": "pt"}``).

    Returns:
        The sidecar's record: ``provenance`` plus ``sha256``.
    """
    from safetensors.torch import save_file  # torch only where weights are written

    meta = {**(metadata or {}), "provenance": json.dumps(provenance)}
    record: dict = {}

    def write(tmp: str) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=meta)
        record.update(provenance, sha256=sha256_file(tmp))
        write_json(sidecar, record, indent=2)  # before the rename: weights under their name have their sidecar

    atomic_write(path, write, mode=0o644)  # 0644: a shared (and shipped) asset, not safetensors' 0600
    return record


def read_provenance(path: str) -> dict:
    """The provenance stored in a weights file's safetensors metadata."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return json.loads(f.metadata()["provenance"])


def verified(path: str, sidecar: str) -> bool:
    """``path`` exists and matches the checksum in ``sidecar`` (when there is one: weights placed by hand
    carry none and are taken as they are)."""
    if not os.path.exists(path):
        return False
    try:
        with open(sidecar) as f:
            want = json.load(f).get("sha256")
    except FileNotFoundError:
        return True
    except (json.JSONDecodeError, AttributeError):
        return False
    return not want or sha256_file(path) == want


def ensure_weights(path: str, sidecar: str, build: Callable[[str], object], target: str | None = None) -> str:
    """``path``, after building it with ``build(target or path)`` unless it exists and matches its checksum.

    ``build`` must write ``path`` and ``sidecar`` atomically (:func:`save_with_provenance` does): a corrupt or
    half-replaced file is rebuilt, never loaded. ``target``: what ``build`` writes when it is not the weights
    file itself (a ``save_pretrained`` directory holding it).

    Raises:
        RuntimeError: the built weights still do not match their checksum.
    """
    if not verified(path, sidecar):
        build(target or path)
        if not verified(path, sidecar):
            raise RuntimeError(f"{path}: built, but does not match the checksum in {sidecar}")
    return path


#: builders of default weights by model name: ``build(out_path)`` pretrains and saves them (minutes)
BUILDERS: Registry[Callable[[str], object]] = Registry("weights builder")
register_builder = BUILDERS.register  # decorator: ``@register_builder("vit_tiny_offline")``


def builder(name: str) -> Callable[[str], object] | None:
    """The registered builder of ``name``'s default weights, or None when there is none.

    The recipes register themselves when :data:`RECIPES` is imported, which happens here on the first
    lookup (by name, like the CLI's command table): a loader needs no import of a recipe.
    """
    if name not in BUILDERS:
        importlib.import_module(RECIPES)
    return BUILDERS.get(name) if name in BUILDERS else None


def ensure_default(name: str, path: str, sidecar: str, target: str | None = None) -> bool:
    """:func:`ensure_weights` of ``name``'s default weights with its registered builder (looked up only when
    the weights are missing or corrupt); False when they are and ``name`` has no builder."""
    if verified(path, sidecar):
        return True
    build = builder(name)
    if build is not None:
        ensure_weights(path, sidecar, build, target)
    return build is not None
