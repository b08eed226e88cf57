"""Untrusted domain uploads → tensors: zip / tar.gz archives or ``file://`` sources in ``class/image`` layout.

Every check happens before anything is stored: path traversal (absolute paths, ``..``, links), archive
bombs (member count, total uncompressed size, compression ratio), undecodable images, unknown labels
and empty domains each raise :class:`BadUpload` with a machine-readable ``code``.
"""

from __future__ import annotations

import io
import os
import posixpath
import tarfile
import zipfile
from dataclasses import dataclass
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from training.data.folder import IMAGE_EXTS


class BadUpload(ValueError):
    """A rejected upload; ``code`` is the problem type's last path segment."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


@dataclass(frozen=True)
class Limits:
    """Upload limits (defaults suit the embedded CPU setup)."""

    max_files: int = 20_000  # image members per archive
    max_total_bytes: int = 512 * 2**20  # uncompressed
    max_ratio: float = 100.0  # uncompressed / compressed, per archive
    max_image_pixels: int = 4096 * 4096


def _safe_member(name: str) -> list[str]:
    norm = posixpath.normpath(name.replace("\\", "/"))
    if name.startswith(("/", "\\")) or norm.startswith("..") or "/../" in f"/{norm}/" or ":" in name.split("/")[0]:
        raise BadUpload("path-traversal", f"archive member {name!r} escapes the archive root")
    return [p for p in norm.split("/") if p not in ("", ".")]


def _members(data: bytes, limits: Limits) -> list[tuple[list[str], bytes]]:
    out = []
    if zipfile.is_zipfile(io.BytesIO(data)):
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = [i for i in zf.infolist() if not i.is_dir()]
        size = sum(i.file_size for i in infos)
        _check_size(len(infos), size, len(data), limits)
        for i in infos:
            if (i.external_attr >> 16) & 0o170000 == 0o120000:
                raise BadUpload("path-traversal", f"archive member {i.filename!r} is a symbolic link")
            parts = _safe_member(i.filename)
            out.append((parts, zf.read(i)))
        return out
    try:
        tf = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
    except tarfile.TarError as e:
        raise BadUpload("bad-archive", "upload is neither a zip nor a tar(.gz) archive") from e
    with tf:
        infos = tf.getmembers()
        for m in infos:
            if m.issym() or m.islnk() or m.isdev():
                raise BadUpload("path-traversal", f"archive member {m.name!r} is a link or device")
            _safe_member(m.name)
        files = [m for m in infos if m.isfile()]
        _check_size(len(files), sum(m.size for m in files), len(data), limits)
        for m in files:
            f = tf.extractfile(m)
            out.append((_safe_member(m.name), f.read() if f else b""))
    return out


def _check_size(n: int, size: int, compressed: int, limits: Limits) -> None:
    if n > limits.max_files:
        raise BadUpload("too-large", f"archive has {n} files; the limit is {limits.max_files}")
    if size > limits.max_total_bytes:
        raise BadUpload("too-large", f"archive expands to {size} bytes; the limit is {limits.max_total_bytes}")
    if compressed and size / compressed > limits.max_ratio:
        raise BadUpload("archive-bomb", f"compression ratio {size / compressed:.0f} exceeds {limits.max_ratio:.0f}")


def _decode(name: str, raw: bytes, size: int, limits: Limits) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.width * im.height > limits.max_image_pixels:
                raise BadUpload("bad-image", f"{name}: {im.width}×{im.height} exceeds the pixel limit")
            return np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise BadUpload("bad-image", f"{name}: not a decodable image") from e


def read_domain(
    data: bytes, classes: list[str], size: int, limits: Limits = Limits()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode an archive in ``class_name/image`` layout (optionally under one top-level folder).

    Returns:
        uint8 images (N, 3, size, size) and int64 labels indexing ``classes``.

    Raises:
        BadUpload: on any of the checks in the module docstring.
    """
    members = [
        (p, b)
        for p, b in _members(data, limits)
        if p and p[-1].lower().endswith(IMAGE_EXTS) and not p[-1].startswith(".")
    ]
    if members and all(len(p) == 3 for p, _ in members) and len({p[0] for p, _ in members}) == 1:
        members = [(p[1:], b) for p, b in members]  # strip a single wrapping folder
    xs, ys = [], []
    for parts, raw in members:
        if len(parts) != 2:
            raise BadUpload("bad-layout", f"{'/'.join(parts)}: expected class_name/image")
        if parts[0] not in classes:
            raise BadUpload("unknown-label", f"class folder {parts[0]!r} is not one of the served labels {classes}")
        xs.append(_decode("/".join(parts), raw, size, limits))
        ys.append(classes.index(parts[0]))
    if not xs:
        raise BadUpload("empty-domain", "the upload contains no images in class_name/image layout")
    return torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous(), torch.tensor(ys, dtype=torch.int64)


def read_source(
    uri: str, classes: list[str], size: int, limits: Limits = Limits()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a ``file://`` source: a directory in ``class/image`` layout or an archive file.

    Raises:
        BadUpload: unsupported scheme, missing path, or any archive/image check.
    """
    u = urlparse(uri)
    if u.scheme != "file":
        raise BadUpload("bad-source", f"unsupported source scheme {u.scheme!r}; this server reads file://")
    path = u.path
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return read_domain(f.read(), classes, size, limits)
    if not os.path.isdir(path):
        raise BadUpload("bad-source", f"source {uri!r} does not exist on the cluster")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for c in sorted(os.listdir(path)):
            if os.path.isdir(os.path.join(path, c)):
                for f in sorted(os.listdir(os.path.join(path, c))):
                    with open(os.path.join(path, c, f), "rb") as fh:  # writestr: file mtimes may predate 1980
                        zf.writestr(f"{c}/{f}", fh.read())
    return read_domain(buf.getvalue(), classes, size, limits)
