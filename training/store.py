"""Adapter store: safetensors weights + a JSON manifest per adapter, written atomically, checksummed.

Layout under ``root``: ``<name>.safetensors`` and ``<name>.json``. The weights are written to a temporary
name, fsynced and renamed (:func:`training.artifacts.atomic_write`), then the manifest (which carries the
weights' SHA-256) the same way; an adapter exists only once its manifest does, so a crash never exposes a
half-written adapter. Loading verifies the checksum and the manifest schema. Never pickle.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from .artifacts import atomic_write, sha256_file, write_text
from .settings import LoraSettings

if TYPE_CHECKING:
    import torch

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")


class AdapterError(ValueError):
    """An adapter file is missing, corrupt, or does not match what the caller expects."""


class AdapterManifest(BaseModel):
    """What an adapter is, without opening its weights."""

    name: str
    backbone: str  # registry name of the backbone it was trained on
    format: Literal["lora", "delta"]  # see training.lora; an imported peft adapter is either (training.portable)
    lora: LoraSettings
    class_names: list[str]
    parent: str | None = None  # adapter this one was merged from / cloned from
    method: str = ""  # strategy that produced it (pam, average, adaptive, ...)
    domains: list[str] = Field(default_factory=list)  # domains folded into it, in order
    metrics: dict[str, float] = Field(default_factory=dict)
    created: float = Field(default_factory=time.time)
    sha256: str = ""  # of the .safetensors file; filled in by the store


class AdapterStore:
    """A folder of adapters (thin: all state is on disk)."""

    def __init__(self, root: str) -> None:
        self.root = root
        os.makedirs(root, exist_ok=True)

    def _paths(self, name: str) -> tuple[str, str]:
        if not _NAME.match(name):
            raise AdapterError(f"invalid adapter name {name!r}")
        base = os.path.join(self.root, name)
        return base + ".safetensors", base + ".json"

    def save(self, tensors: dict[str, torch.Tensor] | dict[str, np.ndarray],
             manifest: AdapterManifest) -> AdapterManifest:
        """Write weights (torch tensors, or numpy arrays where torch is not loaded) then manifest, atomically;
        returns the manifest with its checksum.

        Raises:
            AdapterError: for an invalid name or if the adapter already exists (adapters are immutable).
        """
        w, m = self._paths(manifest.name)
        if os.path.exists(m):
            raise AdapterError(f"adapter {manifest.name!r} already exists")
        if all(isinstance(v, np.ndarray) for v in tensors.values()):  # a caller without torch (the controller)
            from safetensors.numpy import save_file as save_numpy

            atomic_write(w, lambda p: save_numpy({k: np.ascontiguousarray(v) for k, v in tensors.items()}, p))
        else:
            from safetensors.torch import save_file  # torch only where tensors are written

            atomic_write(w, lambda p: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, p))
        manifest = manifest.model_copy(update={"sha256": sha256_file(w)})
        write_text(m, manifest.model_dump_json(indent=2))
        return manifest

    def manifest(self, name: str) -> AdapterManifest:
        """Read and validate a manifest.

        Raises:
            AdapterError: missing or malformed.
        """
        _, m = self._paths(name)
        try:
            with open(m) as f:
                return AdapterManifest.model_validate(json.load(f))
        except FileNotFoundError as e:
            raise AdapterError(f"no adapter named {name!r} in {self.root}") from e
        except (json.JSONDecodeError, ValidationError) as e:
            raise AdapterError(f"adapter {name!r}: malformed manifest ({e})") from e

    def verify(self, name: str, backbone: str | None = None) -> AdapterManifest:
        """The manifest, after checking the weights' checksum (and backbone, when given); no tensors read.

        Raises:
            AdapterError: missing, corrupt or for another backbone.
        """
        man = self.manifest(name)
        w, _ = self._paths(name)
        if not os.path.exists(w) or sha256_file(w) != man.sha256:
            raise AdapterError(f"adapter {name!r}: weights missing or checksum mismatch (corrupt file)")
        if backbone is not None and man.backbone != backbone:
            raise AdapterError(f"adapter {name!r} was trained on {man.backbone!r}, not {backbone!r}")
        return man

    def load(self, name: str, backbone: str | None = None) -> tuple[dict[str, torch.Tensor], AdapterManifest]:
        """Load weights after verifying checksum (and backbone, when given).

        Raises:
            AdapterError: missing, corrupt (checksum or safetensors error) or for another backbone.
        """
        man = self.verify(name, backbone)
        w, _ = self._paths(name)
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(w), man
        except SafetensorError as e:  # pragma: no cover - checksum catches corruption first
            raise AdapterError(f"adapter {name!r}: unreadable safetensors ({e})") from e

    def delete(self, name: str) -> None:
        """Remove an adapter: its manifest first (it stops being an adapter), then its weights. A crash in
        between leaves weights without a manifest, which :meth:`sweep` reports for quarantine."""
        w, m = self._paths(name)
        for path in (m, w):
            if os.path.exists(path):
                os.remove(path)

    def names(self) -> list[str]:
        """Adapters that are complete (have a manifest), oldest first."""
        ms = [f[:-5] for f in os.listdir(self.root) if f.endswith(".json")]
        return sorted(ms, key=lambda n: os.path.getmtime(os.path.join(self.root, n + ".json")))

    def sweep(self) -> list[str]:
        """Remove temporary files a crash left behind; returns names whose weights have no manifest.

        Such weights were never an adapter (the manifest is written last), so callers quarantine them.
        """
        orphans = []
        for f in os.listdir(self.root):
            full = os.path.join(self.root, f)
            if ".tmp-" in f and os.path.isfile(full):
                os.remove(full)
            elif f.endswith(".safetensors") and not os.path.exists(full[: -len(".safetensors")] + ".json"):
                orphans.append(f[: -len(".safetensors")])
        return orphans

    def quarantine(self, name: str) -> str:
        """Move an adapter's files (whichever exist) to ``<root>/quarantine/``; returns that folder.

        Used for files on disk that the server's database does not know: kept for inspection, never
        served, never in the way of a new adapter of the same name.
        """
        w, m = self._paths(name)
        dest = os.path.join(self.root, "quarantine")
        os.makedirs(dest, exist_ok=True)
        stamp = f"{time.time():.0f}"
        for src in (w, m):
            if os.path.exists(src):
                os.replace(src, os.path.join(dest, f"{os.path.basename(src)}.{stamp}"))
        return dest

    def quarantined(self) -> list[str]:
        """Names of the files in quarantine (with their suffixes)."""
        q = os.path.join(self.root, "quarantine")
        return sorted(os.listdir(q)) if os.path.isdir(q) else []
