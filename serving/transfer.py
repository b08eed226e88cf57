"""Adapters in and out of the server as files: the zips of ``GET /v1/adapters/{v}/download`` and what
``POST /v1/adapters`` accepts. The format conversion itself is :mod:`training.portable`; this module only
packs, unpacks and checks uploads (with the upload limits of :mod:`serving.archive`). Blocking: callers run
it off the event loop.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile

import torch

from training.store import AdapterStore

from .archive import Limits, archive_members, bad

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def zip_files(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def peft_zip(config: dict, sd: dict[str, torch.Tensor], readme: str) -> bytes:
    """A folder ``PeftModel.from_pretrained`` reads, zipped: config, weights, and how to load it."""
    from safetensors.torch import save

    return zip_files({CONFIG: json.dumps(config, indent=2, sort_keys=True).encode(), WEIGHTS: save(sd),
                      "README.txt": readme.encode()})


def store_zip(store: AdapterStore, name: str) -> bytes:
    """The store's own files of adapter ``name`` (weights and manifest with its checksum), checked first."""
    store.verify(name)
    root = os.path.join(store.root, name)
    return zip_files({os.path.basename(root + ext): open(root + ext, "rb").read() for ext in (".safetensors", ".json")})


def read_peft_upload(data: bytes, limits: Limits, sha256: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(adapter_config, tensors)`` of an uploaded zip or tar holding a peft adapter folder (at the top or in
    one folder).

    Raises:
        Problem: 422 ``checksum-mismatch``, ``bad-adapter`` (no config or weights, a pickle ``.bin``, unreadable
            JSON or safetensors), or any archive check (``bad-archive``, ``too-large``, ...).
    """
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256.lower():
        raise bad("checksum-mismatch", "the upload's SHA-256 is not the one given in 'sha256'")
    files = {"/".join(p): b for p, b in archive_members(data, limits)}
    if any(k.endswith("adapter_model.bin") for k in files):
        raise bad("bad-adapter", "adapter_model.bin is a pickle, which this server never loads: save the adapter with "
                  "safe_serialization=True (adapter_model.safetensors)")
    configs = [k for k in files if k.rsplit("/", 1)[-1] == CONFIG and k.count("/") <= 1]
    if len(configs) != 1 or configs[0][: -len(CONFIG)] + WEIGHTS not in files:
        raise bad("bad-adapter", f"the upload must hold one peft adapter folder: {CONFIG} and {WEIGHTS} side by side")
    root = configs[0][: -len(CONFIG)]
    try:
        config = json.loads(files[root + CONFIG])
        from safetensors.torch import load

        tensors = load(files[root + WEIGHTS])
    except Exception as e:  # noqa: BLE001 - anything unreadable is the upload's fault
        raise bad("bad-adapter", f"unreadable {CONFIG} or {WEIGHTS} ({type(e).__name__})") from e
    if not isinstance(config, dict):
        raise bad("bad-adapter", f"{CONFIG} is not a JSON object")
    return config, tensors
