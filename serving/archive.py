"""Untrusted uploads → arrays: images, zip / tar(.gz|.bz2|.xz) archives and confined ``file://`` sources.

Every limit is checked before the expensive work it guards: image size from the header before decoding,
member count and sizes from the archive's headers and again while decompressing (a capped stream, so a
bomb stops at the cap), the compression ratio as bytes come out. Anything a client can get wrong ends in
:class:`~serving.errors.Problem` (4xx) with a machine-readable code, never another exception. These
functions block (decoding, decompression, file I/O): callers run them off the event loop.
"""

from __future__ import annotations

import base64
import binascii
import bz2
import gzip
import io
import lzma
import os
import posixpath
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image, ImageOps

from training.settings import IMAGE_EXTS

from .errors import Problem


@dataclass(frozen=True)
class Limits:
    """Upload limits (defaults suit the embedded CPU setup)."""

    max_files: int = 20_000  # members per archive or files per source directory
    max_total_bytes: int = 512 * 2**20  # uncompressed bytes per upload
    max_ratio: float = 100.0  # uncompressed / compressed, per archive
    max_image_pixels: int = 4096 * 4096  # per image, read from the header before decoding
    max_images: int = 256  # images per classify request


def bad(code: str, detail: str, status: int = 422) -> Problem:
    return Problem(status, code, detail)


def _over(limits: Limits, what: str) -> Problem:
    return bad("too-large", f"{what} exceeds {limits.max_files} files or {limits.max_total_bytes} bytes", 413)


# --- images --------------------------------------------------------------------------------------
def decode_b64(s: str, what: str) -> bytes:
    """One base64 image of a JSON body (a ``data:`` URL's prefix is dropped) → its encoded bytes.

    Raises:
        Problem: 422 ``bad-image`` when ``s`` is not valid base64.
    """
    try:
        return base64.b64decode(s.split(",", 1)[-1], validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad("bad-image", f"{what} is not valid base64") from e


def open_image(raw: bytes, what: str, max_pixels: int) -> Image.Image:
    """Read one image's header (no pixel is decoded yet) and check its size.

    Raises:
        Problem: 422 ``image-too-large`` (from the header) or ``bad-image``.
    """
    try:
        im = Image.open(io.BytesIO(raw))
    except Exception as e:  # noqa: BLE001 - any decoder failure is the upload's fault (fuzz-tested)
        raise bad("bad-image", f"{what}: not a decodable image ({type(e).__name__})") from e
    if im.width * im.height > max_pixels:
        im.close()
        raise bad("image-too-large", f"{what}: {im.width}×{im.height} exceeds {max_pixels} pixels")
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """Any image PIL opens → 8-bit RGB, upright, as a viewer would show it.

    - EXIF orientation is applied (a phone photo stored sideways is not learned sideways);
    - 16-bit images (``I;16*``, and ``I`` holding values above 255) are scaled from 16 bits to 8, not
      clipped at 255 (PIL's own ``convert`` clips: a 16-bit PNG would come out nearly all white);
    - float images (``F``) are read as [0, 1] when they fit in it, else as [0, 255];
    - transparency (RGBA, LA, PA, palette with a transparent index) is composited over black, which is
      what a fully transparent pixel stored as (0, 0, 0, 0) already decodes to.
    """
    if im.getexif().get(0x0112, 1) != 1:  # 0x0112: EXIF Orientation; 1 = upright
        im = ImageOps.exif_transpose(im)
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.float64)
        top = a.max(initial=0)
        if im.mode.startswith("I;16") or (im.mode == "I" and top > 255):
            a = a / 257  # 16-bit range → 8-bit (65535 → 255)
        elif im.mode == "F" and top <= 1:
            a = a * 255
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def to_array(im: Image.Image, size: int, what: str) -> np.ndarray:
    """Decode an opened image to uint8 (size, size, 3) through :func:`to_rgb`; closes it.

    An upright RGB image already at ``size`` is taken as it is: PIL's same-size resize is a copy, and
    clients that resize before sending (the cheap way to call a server) skip two copies.

    Raises:
        Problem: 422 ``bad-image`` when the pixel data does not decode (truncated, corrupt).
    """
    try:
        with im:
            if im.size != (size, size):
                im.draft("RGB", (size, size))  # JPEG: decode at reduced scale
            rgb = to_rgb(im)
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.BILINEAR)
            return np.asarray(rgb)
    except Exception as e:  # noqa: BLE001 - any decoder failure is the upload's fault (fuzz-tested)
        raise bad("bad-image", f"{what}: not a decodable image ({type(e).__name__})") from e


def resize_images(x: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, 3, H, W) → (N, 3, size, size), resampled as uploads are (PIL bilinear); as is when already
    at ``size``. The one resize every stored domain goes through, whatever its source."""
    if x.shape[-2:] == (size, size):
        return x
    out = np.empty((len(x), size, size, 3), np.uint8)
    for i, img in enumerate(x.transpose(0, 2, 3, 1)):  # (N, 3, H, W) → (N, H, W, 3)
        out[i] = np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((size, size), Image.BILINEAR))
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def decode_image(raw: bytes, size: int, what: str, max_pixels: int) -> np.ndarray:
    """Decode one image to uint8 (size, size, 3), its size checked from the header first.

    Raises:
        Problem: 422 ``image-too-large`` (before decoding) or ``bad-image``.
    """
    return to_array(open_image(raw, what, max_pixels), size, what)


def open_images(raws: list[bytes], limits: Limits) -> list[Image.Image]:
    """A classify request's images, headers read and every limit checked; nothing decoded yet."""
    if not raws:
        raise bad("no-image", "no image in the request")
    if len(raws) > limits.max_images:
        raise bad("too-large", f"at most {limits.max_images} images per request", 413)
    ims: list[Image.Image] = []
    try:
        for i, r in enumerate(raws):
            ims.append(open_image(r, f"images[{i}]", limits.max_image_pixels))
    except Problem:
        for im in ims:
            im.close()
        raise
    return ims


def decode_opened(ims: list[Image.Image], size: int) -> np.ndarray:
    """:func:`open_images`' images → uint8 (N, 3, size, size); closes them."""
    out = np.empty((len(ims), size, size, 3), np.uint8)
    try:
        for i, im in enumerate(ims):
            out[i] = to_array(im, size, f"images[{i}]")
    finally:
        for im in ims:
            im.close()
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))  # (N, H, W, 3) → (N, 3, H, W)


def decode_images(raws: list[bytes], size: int, limits: Limits) -> np.ndarray:
    """Decode a classify request's images to uint8 (N, 3, size, size)."""
    return decode_opened(open_images(raws, limits), size)


#: a request whose images together are this small is decoded on the event loop: decoding one 32 px PNG
#: costs ~0.04-0.2 ms, less than the hop to a thread and back (~0.3 ms measured); the plain Ray Serve app
#: decodes everything inline. The budget is summed over the request's images, so the loop stalls for a
#: few ms at most; anything larger goes to a thread
INLINE_BYTES, INLINE_PIXELS = 64 * 2**10, 256 * 256


def small_request(raws: list[bytes]) -> bool:
    """True when the request's encoded images together are at most :data:`INLINE_BYTES`: reading their
    headers on the event loop then costs microseconds."""
    return bool(raws) and sum(len(r) for r in raws) <= INLINE_BYTES


def cheap_to_decode(ims: list[Image.Image]) -> bool:
    """True when opened images together hold at most :data:`INLINE_PIXELS` (by their headers: a tiny
    file can expand to a huge image)."""
    return sum(im.width * im.height for im in ims) <= INLINE_PIXELS


# --- archives ------------------------------------------------------------------------------------
def _safe_member(name: str) -> list[str]:
    norm = posixpath.normpath(name.replace("\\", "/"))
    if name.startswith(("/", "\\")) or norm.startswith("..") or "/../" in f"/{norm}/" or ":" in name.split("/")[0]:
        raise bad("path-traversal", f"archive member {name!r} escapes the archive root")
    return [p for p in norm.split("/") if p not in ("", ".")]


class _Capped(io.RawIOBase):
    """A decompressed stream that stops at ``cap`` bytes or at ``max_ratio`` × the compressed size."""

    def __init__(self, inner: io.BufferedIOBase, cap: int, compressed: int, max_ratio: float) -> None:
        # the ratio bites above 1 MiB only: tar's zero padding alone gives tiny archives ratios over 100
        self.inner, self.cap, self.n = inner, min(cap, max(int(compressed * max_ratio), 2**20)), 0
        self.by_ratio = self.cap < cap

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:
        data = self.inner.read(len(b))
        self.n += len(data)
        if self.n > self.cap:
            if self.by_ratio:
                raise bad("archive-bomb", f"archive expands more than {self.cap} bytes (compression ratio)")
            raise bad("too-large", f"archive expands beyond {self.cap} bytes", 413)
        b[: len(data)] = data
        return len(data)


_DECOMPRESSORS = {b"\x1f\x8b": gzip.GzipFile, b"BZh": bz2.BZ2File, b"\xfd7zXZ\x00": lzma.LZMAFile}


def _tar_members(data: bytes, limits: Limits) -> list[tuple[list[str], bytes]]:
    opener = next((f for magic, f in _DECOMPRESSORS.items() if data.startswith(magic)), None)
    cap = limits.max_total_bytes + 1024 * (limits.max_files + 2)  # content + one header and padding per member
    raw = io.BytesIO(data) if opener is None else opener(fileobj=io.BytesIO(data))
    stream = io.BufferedReader(_Capped(raw, cap, len(data), limits.max_ratio if opener else float("inf")))
    out, total = [], 0
    with tarfile.open(fileobj=stream, mode="r|") as tf:
        for m in tf:
            if m.issym() or m.islnk():
                raise bad("path-traversal", f"archive member {m.name!r} is a link")
            if not (m.isfile() or m.isdir()):
                raise bad("bad-archive", f"archive member {m.name!r} is a special file")
            parts = _safe_member(m.name)
            if m.isdir():
                continue
            total += m.size
            if len(out) >= limits.max_files or total > limits.max_total_bytes:
                raise _over(limits, "archive")
            blob = tf.extractfile(m).read()
            if len(blob) != m.size:
                raise bad("bad-archive", f"archive member {m.name!r} is truncated")
            out.append((parts, blob))
    return out


def _zip_members(data: bytes, limits: Limits) -> list[tuple[list[str], bytes]]:
    zf = zipfile.ZipFile(io.BytesIO(data))
    infos = [i for i in zf.infolist() if not i.is_dir()]
    size = sum(i.file_size for i in infos)
    if len(infos) > limits.max_files or size > limits.max_total_bytes:
        raise bad("too-large", f"archive has {len(infos)} files / {size} bytes; the limits are "
                  f"{limits.max_files} / {limits.max_total_bytes}", 413)
    if size > max(limits.max_ratio * len(data), 2**20):
        raise bad("archive-bomb", f"compression ratio {size / len(data):.0f} exceeds {limits.max_ratio:.0f}")
    out = []
    for i in infos:
        if (i.external_attr >> 16) & 0o170000 == 0o120000:
            raise bad("path-traversal", f"archive member {i.filename!r} is a symbolic link")
        parts = _safe_member(i.filename)
        with zf.open(i) as f:
            blob = f.read(i.file_size + 1)  # a member that inflates past its declared size is lying
        if len(blob) != i.file_size:
            raise bad("bad-archive", f"archive member {i.filename!r} does not match its declared size")
        out.append((parts, blob))
    return out


def archive_members(data: bytes, limits: Limits) -> list[tuple[list[str], bytes]]:
    """``(path parts, bytes)`` of every regular file in a zip or tar archive, all checks applied.

    Raises:
        Problem: ``bad-archive``, ``path-traversal``, ``archive-bomb`` or ``too-large``.
    """
    try:
        if zipfile.is_zipfile(io.BytesIO(data)):
            return _zip_members(data, limits)
        return _tar_members(data, limits)
    except Problem:
        raise
    except Exception as e:  # noqa: BLE001 - corrupt deflate, bad CRC, truncation...: the upload's fault
        raise bad("bad-archive", f"upload is not a readable zip or tar(.gz) archive ({type(e).__name__})") from e


def read_domain(
    data: bytes, classes: list[str], size: int, limits: Limits = Limits()
) -> tuple[np.ndarray, np.ndarray]:
    """Decode an archive in ``class_name/image`` layout (optionally under one top-level folder).

    Returns:
        uint8 images (N, 3, size, size) and int64 labels indexing ``classes``.

    Raises:
        Problem: on any check in the module docstring.
    """
    return _classes_layout(archive_members(data, limits), classes, size, limits)


def _classes_layout(
    members: list[tuple[list[str], bytes]], classes: list[str], size: int, limits: Limits
) -> tuple[np.ndarray, np.ndarray]:
    members = [
        (p, b) for p, b in members if p and p[-1].lower().endswith(IMAGE_EXTS) and not p[-1].startswith(".")
    ]
    if members and all(len(p) == 3 for p, _ in members) and len({p[0] for p, _ in members}) == 1:
        members = [(p[1:], b) for p, b in members]  # strip a single wrapping folder
    for parts, _ in members:
        if len(parts) != 2:
            raise bad("bad-layout", f"{'/'.join(parts)}: expected class_name/image")
        if parts[0] not in classes:
            raise bad("unknown-label", f"class folder {parts[0]!r} is not one of the served labels {classes}")
    if not members:
        raise bad("empty-domain", "the upload contains no images in class_name/image layout")
    xs = [decode_image(raw, size, "/".join(p), limits.max_image_pixels) for p, raw in members]
    y = np.array([classes.index(p[0]) for p, _ in members], dtype=np.int64)
    return np.ascontiguousarray(np.stack(xs).transpose(0, 3, 1, 2)), y


# --- file:// sources -----------------------------------------------------------------------------
def _inside(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def _read_regular(path: str, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO swapped in can't block us
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            raise bad("bad-source", f"{path}: not a regular file within {limit} bytes")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit + 1)
    finally:
        os.close(fd)


def source_members(uri: str, roots: list[str], limits: Limits, max_archive_bytes: int) -> list | bytes:
    """Resolve a ``file://`` source confined to ``roots``: archive bytes, or the members of a directory.

    Missing and forbidden paths get the same answer, so the server's file system can't be probed.

    Raises:
        Problem: ``bad-source`` (scheme, outside the roots, missing, link, special file, too large) or
            ``bad-layout`` (a directory where an image belongs).
    """
    u = urlparse(uri)
    if u.scheme != "file" or u.netloc not in ("", "localhost"):
        raise bad("bad-source", f"unsupported source {uri!r}; this server reads file:// under its source roots")
    path = os.path.normpath(unquote(u.path))
    real_roots = [os.path.realpath(r) for r in roots]
    nowhere = bad("bad-source", f"source {uri!r} does not exist under the configured source roots")
    if not os.path.isabs(path) or not _inside(path, real_roots) or os.path.realpath(path) != path:
        raise nowhere  # outside, or reached through a symbolic link
    try:
        st = os.lstat(path)
    except OSError:
        raise nowhere from None
    if stat.S_ISREG(st.st_mode):
        return _read_regular(path, max_archive_bytes)
    if not stat.S_ISDIR(st.st_mode):
        raise nowhere
    out, total = [], 0
    for top in sorted(os.scandir(path), key=lambda e: e.name):
        if top.is_symlink():
            raise bad("bad-source", f"{top.path}: symbolic links are not followed")
        if not top.is_dir(follow_symlinks=False):
            continue  # README and the like beside the class folders
        for e in sorted(os.scandir(top.path), key=lambda e: e.name):
            st = e.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise bad("bad-layout", f"{top.name}/{e.name}: expected class_name/image, found a directory")
            if not stat.S_ISREG(st.st_mode):
                raise bad("bad-source", f"{top.name}/{e.name}: not a regular file (link, FIFO or device)")
            total += st.st_size
            if len(out) >= limits.max_files or total > limits.max_total_bytes:
                raise _over(limits, "source")
            out.append(([top.name, e.name], e.path))
    return [(parts, _read_regular(p, limits.max_total_bytes)) for parts, p in out]


def read_source(
    uri: str, classes: list[str], size: int, roots: list[str], limits: Limits = Limits(), max_archive_bytes: int = 2**26
) -> tuple[np.ndarray, np.ndarray]:
    """Read a confined ``file://`` source (a ``class/image`` directory or an archive file)."""
    got = source_members(uri, roots, limits, max_archive_bytes)
    if isinstance(got, bytes):
        return read_domain(got, classes, size, limits)
    return _classes_layout(got, classes, size, limits)


# --- vqa archives --------------------------------------------------------------------------------
QUESTIONS_FILE = "questions.jsonl"
MAX_QUESTION_CHARS = 512


def unknown_answers(unknown: list[str], answers: list[str]) -> str:
    """The ``unknown-answer`` detail: the answers refused, the whole vocabulary, and how to extend it.

    The answer layer is part of the served model and every version's adapters fit its rows, so a lineage
    keeps one vocabulary (docs/vqa.md, "New answers"); a larger one is a new pretrained model and data dir.
    """
    return (f"{len(unknown)} answers are not in the model's {len(answers)}-answer vocabulary: {unknown[:10]}. "
            f"The vocabulary: {answers}. To learn new answer words, pretrain a model with them "
            f"(mergeserve pretrain-vqa --extra-answers {','.join(unknown[:10])} --out DIR) and serve it with "
            f"vqa.weights: DIR on a new data dir (adapters of one lineage share one answer layer)")


def read_vqa_domain(
    data: bytes, answers: list[str], size: int, limits: Limits = Limits()
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Decode a VQA archive: images plus ``questions.jsonl`` (optionally under one top-level folder), one
    ``{"image": "relative/path.png", "question": "...", "answer": "..."}`` per line.

    An image may serve several questions (it is decoded once per line, like the model sees it).

    Returns:
        uint8 images (N, 3, size, size), N questions and int64 answer ids indexing ``answers``.

    Raises:
        Problem: every archive check, plus ``bad-questions`` (a malformed line, naming it), ``unknown-answer``
            (naming answers outside the vocabulary), ``missing-image`` (naming referenced images not in the
            archive) and ``empty-domain``.
    """
    members = archive_members(data, limits)
    files = {"/".join(p): b for p, b in members}
    qfiles = [k for k in files if k == QUESTIONS_FILE or k.endswith("/" + QUESTIONS_FILE)]
    if len(qfiles) != 1 or qfiles[0].count("/") > 1:
        raise bad("bad-layout", f"a vqa archive holds exactly one {QUESTIONS_FILE} (at the top or in one folder)")
    root = qfiles[0][: -len(QUESTIONS_FILE)]
    rows = _question_rows(files[qfiles[0]])
    unknown = sorted({r["answer"] for r in rows} - set(answers))
    if unknown:
        raise bad("unknown-answer", unknown_answers(unknown, answers))
    missing = sorted({r["image"] for r in rows if root + posixpath.normpath(r["image"]) not in files})
    if missing:
        raise bad("missing-image", f"{len(missing)} images named in {QUESTIONS_FILE} are not in the archive: "
                  f"{missing[:10]}")
    decoded: dict[str, np.ndarray] = {}
    for r in rows:
        key = root + posixpath.normpath(r["image"])
        if key not in decoded:
            decoded[key] = decode_image(files[key], size, r["image"], limits.max_image_pixels)
    x = np.stack([decoded[root + posixpath.normpath(r["image"])] for r in rows]).transpose(0, 3, 1, 2)
    y = np.array([answers.index(r["answer"]) for r in rows], dtype=np.int64)
    return np.ascontiguousarray(x), [r["question"] for r in rows], y


def _question_rows(raw: bytes) -> list[dict[str, str]]:
    import json

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad("bad-questions", f"{QUESTIONS_FILE} is not UTF-8") from e
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError:
            raise bad("bad-questions", f"{QUESTIONS_FILE} line {n}: not a JSON object") from None
        ok = isinstance(r, dict) and all(isinstance(r.get(k), str) and r[k] for k in ("image", "question", "answer"))
        if not ok:
            raise bad("bad-questions", f"{QUESTIONS_FILE} line {n}: needs non-empty strings image, question, answer")
        if len(r["question"]) > MAX_QUESTION_CHARS:
            raise bad("bad-questions", f"{QUESTIONS_FILE} line {n}: question longer than {MAX_QUESTION_CHARS}")
        img = posixpath.normpath(r["image"])
        if img.startswith(("/", "../")) or img == "..":
            raise bad("path-traversal", f"{QUESTIONS_FILE} line {n}: image path {r['image']!r} leaves the archive")
        try:
            r["question"].encode("utf-8")
        except UnicodeEncodeError:
            raise bad("bad-questions", f"{QUESTIONS_FILE} line {n}: question is not valid UTF-8") from None
        rows.append(r)
    if not rows:
        raise bad("empty-domain", f"{QUESTIONS_FILE} has no questions")
    return rows
