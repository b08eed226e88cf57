"""Adapter versions besides ingest: imported from elsewhere, deleted, and kept to a number (retention).

A version may be deleted unless a rollback could need it: the active version and its ancestors (its
``parent`` chain) are kept, and so are the per-domain adapters (``domain@<d>@v<N>``) an adaptive version
still lists as its components; a ``pam_adaptive`` version's shadow LoRA (``pam@v<N>``) goes with it.
Deleting removes the database rows first (one transaction), then the files, manifest before weights: a
crash in between leaves weights no database row knows, which the next start quarantines
(:meth:`~serving.pipeline.Pipeline.recover`). Plain functions over a pipeline; no Ray, no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from training.store import AdapterManifest

from .errors import Problem

#: metrics key prefixes that name a version's adapter files: an adaptive merge's components (``c/<adapter>``,
#: valued by its coefficient) and a pam_adaptive version's shadow global LoRA (``s/pam@v<N>``: its own file)
COMPONENT, SHADOW = "c/", "s/"


def named(metrics: dict, prefix: str) -> list[str]:
    """The adapter names behind the ``metrics`` keys that start with ``prefix``, in key order."""
    return [k[len(prefix):] for k in metrics if k.startswith(prefix)]


if TYPE_CHECKING:
    from .pipeline import Pipeline


def protected(pipe: Pipeline) -> set[int]:
    """Versions a rollback may need: version 0, the active one and its ancestors."""
    keep, v = {0}, pipe.active
    while v is not None and v not in keep:
        keep.add(v)
        row = pipe.db.version(v)
        v = row["parent"] if row else None
    return keep


def delete(pipe: Pipeline, version: int) -> dict:
    """Delete one version (its files, accuracy, and the domains it learned that no kept version holds).

    Raises:
        Problem: 404 for an unknown version; 409 ``version-protected`` for the active version or one the
            active version descends from.
    """
    row = pipe.db.version(version)
    if row is None:
        raise Problem(404, "unknown-version", f"no adapter version {version}")
    if version in (keep := protected(pipe)):
        why = "is active" if version == pipe.active else f"is an ancestor of the active v{pipe.active}"
        raise Problem(409, "version-protected", f"v{version} {why}: a rollback needs it (protected: {sorted(keep)})")
    others = [v for v in pipe.db.versions() if v["version"] != version]  # what stays
    held = {d for v in others for d in v["domains"]}
    pipe.db.delete_version(version, [d for d in row["domains"] if d not in held])
    still = {n for v in others for n in named(v["metrics"], COMPONENT)}
    # its own files: per-domain components no kept version lists, and a pam_adaptive version's shadow
    own = [n for n in named(row["metrics"], COMPONENT) if n.startswith("domain@") and n not in still]
    own += named(row["metrics"], SHADOW)
    for name in [row["name"], *own]:  # a component that is another version (global@vK) stays, of course
        pipe.store.delete(name)
    return {"deleted": version, "active": pipe.active}


def prune(pipe: Pipeline, keep: int | None) -> list[int]:
    """Retention: delete the oldest unprotected versions beyond the newest ``keep``; returns the deleted ones."""
    if keep is None:
        return []
    kept = protected(pipe)  # deleting an unprotected version changes neither the active one nor its chain
    spare = [v["version"] for v in pipe.db.versions() if v["version"] not in kept]
    gone = spare[: max(0, len(spare) - keep)]
    for v in gone:
        delete(pipe, v)
    return gone


def record_import(pipe: Pipeline, tensors: dict[str, np.ndarray], fmt: str, lora: dict, backbone: str) -> dict:
    """Store an adapter trained elsewhere (checked by :func:`training.portable.from_peft`) as a new inactive
    version with no parent and no domain; returns its row. Its accuracy comes later (the worker evaluates it
    on every learned domain)."""
    version = pipe.next_version()
    man = pipe.store.save(tensors, AdapterManifest(
        name=f"global@v{version}", backbone=backbone, format=fmt, lora=lora, class_names=pipe.labels,
        method="import", domains=[]))
    pipe.db.record_version(None, version, man.name, None, "import", [], {}, man.sha256, {})
    return pipe.db.version(version)
