"""Upload checks without Ray: every rejection is a 4xx Problem naming its code, found before heavy work."""

import gzip
import io
import os
import struct
import tarfile
import zipfile
import zlib

import numpy as np
import pytest
from _util import CLASSES, make_archive, png

from serving.archive import Limits, decode_b64, decode_image, read_domain, read_source, read_vqa_domain
from serving.errors import Problem
from training.data.export import export_domain


def _tar_with(member: tarfile.TarInfo, data: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.addfile(member, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _zip(files: dict, method=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for k, v in files.items():
            zf.writestr(k, v)
    return buf.getvalue()


def huge_png_header(w: int = 13000, h: int = 13000) -> bytes:
    """A valid PNG signature + IHDR claiming w×h, then garbage: only the header is ever read."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def _code(fn, *args, **kw) -> str:
    with pytest.raises(Problem) as e:
        fn(*args, **kw)
    assert 400 <= e.value.status < 500
    return e.value.code


def test_reads_layout_with_or_without_wrapping_folder():
    x, y = read_domain(make_archive(n_per_class=2), CLASSES, 32)
    assert x.shape == (6, 3, 32, 32) and x.dtype == np.uint8 and sorted(y.tolist()) == [0, 0, 1, 1, 2, 2]
    wrapped = _zip({"wrap/a/1.png": png(0, 1), "wrap/b/1.png": png(1, 1)})
    assert read_domain(wrapped, CLASSES, 32)[1].tolist() == [0, 1]


def test_rejections():
    link = tarfile.TarInfo("a/link.png")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    absolute = tarfile.TarInfo("/abs/a.png")
    absolute.size = 3
    fifo = tarfile.TarInfo("a/p.png")
    fifo.type = tarfile.FIFOTYPE
    good = make_archive(n_per_class=3)
    zipped = _zip({"a/1.png": png(0, 1), "b/1.png": png(1, 1)})
    bad_crc = bytearray(_zip({"a/1.png": png(0, 1)}, zipfile.ZIP_STORED))
    bad_crc[60] ^= 0xFF  # flip a byte of the stored member: CRC mismatch
    cases = {
        "path-traversal": [_tar_with(link), _tar_with(absolute, b"abc"), _zip({"../../etc/a/x.png": png(0, 1)})],
        "bad-archive": [
            b"plain bytes",
            good[: len(good) // 2],  # truncated tar.gz
            gzip.decompress(good)[:-1500],  # truncated tar: a member is cut short
            bytes(bad_crc),
            zipped[:30] + b"\x00" * 20 + zipped[50:],  # corrupt deflate stream
            _tar_with(fifo),
        ],
        "empty-domain": [make_archive(n_per_class=0), _zip({"README.txt": b"no images"})],
        "unknown-label": [make_archive(classes=["a", "zebra"])],
        "bad-image": [make_archive(extra={"a/broken.png": b"not a png"})],
        "image-too-large": [_zip({"a/huge.png": huge_png_header()})],
        "bad-layout": [_zip({"a/deeper/x.png": png(0, 1), "b/y.png": png(1, 1)})],
    }
    for code, datas in cases.items():
        for data in datas:
            assert _code(read_domain, bytes(data), CLASSES, 32) == code


def test_bombs_stop_at_the_cap():
    big = tarfile.TarInfo("a/big.png")
    big.size = 8 * 2**20
    zeros = _tar_with(big, b"\0" * big.size)  # an 8 MiB member of zeros: ratio ~1000
    assert _code(read_domain, zeros, CLASSES, 32) == "archive-bomb"
    assert _code(read_domain, _zip({"a/big.png": b"\0" * (5 * 2**20)}), CLASSES, 32) == "archive-bomb"
    limits = Limits(max_total_bytes=2**20, max_ratio=10**6)
    assert _code(read_domain, zeros, CLASSES, 32, limits) == "too-large"
    assert _code(read_domain, make_archive(n_per_class=3), CLASSES, 32, Limits(max_files=4)) == "too-large"


def test_decode_checks_pixels_from_the_header():
    assert _code(decode_image, huge_png_header(), 32, "x", 4096**2) == "image-too-large"
    assert decode_image(png(0, 1), 16, "x", 4096**2).shape == (16, 16, 3)


def test_base64_images_of_a_json_body():
    assert decode_b64("data:image/png;base64,aGk=", "image") == decode_b64("aGk=", "image") == b"hi"
    assert _code(decode_b64, "not base64!", "images[1]") == "bad-image"


def test_file_sources_are_confined(tmp_path):
    root = tmp_path / "root"
    src = root / "dom"
    for c in CLASSES:
        (src / c).mkdir(parents=True)
        (src / c / "1.png").write_bytes(png(CLASSES.index(c), 1))
    x, y = read_source(f"file://{src}", CLASSES, 32, [str(root)])
    assert x.shape[0] == 3
    (tmp_path / "secret.txt").write_text("x")
    missing = _code(read_source, f"file://{root}/nope", CLASSES, 32, [str(root)])
    outside = _code(read_source, f"file://{tmp_path}/secret.txt", CLASSES, 32, [str(root)])
    (root / "escape").symlink_to(tmp_path)
    via_link = _code(read_source, f"file://{root}/escape/secret.txt", CLASSES, 32, [str(root)])
    assert missing == outside == via_link == "bad-source"  # one answer: the file system can't be probed
    assert _code(read_source, "http://example.invalid/x.zip", CLASSES, 32, [str(root)]) == "bad-source"
    assert _code(read_source, "file:///etc/passwd", CLASSES, 32, [str(root)]) == "bad-source"
    (src / "a" / "2.png").symlink_to(src / "b" / "1.png")
    assert _code(read_source, f"file://{src}", CLASSES, 32, [str(root)]) == "bad-source"
    os.remove(src / "a" / "2.png")
    os.mkfifo(src / "a" / "3.png")  # reading a FIFO would block the server forever
    assert _code(read_source, f"file://{src}", CLASSES, 32, [str(root)]) == "bad-source"
    os.remove(src / "a" / "3.png")
    (src / "a" / "sub").mkdir()
    assert _code(read_source, f"file://{src}", CLASSES, 32, [str(root)]) == "bad-layout"


def test_exported_domain_reads_back(tmp_path):
    out = tmp_path / "sk.zip"
    n = export_domain("digits5", "sklearn", str(out), limit=30)
    x, y = read_source(f"file://{out}", [str(i) for i in range(10)], 32, [str(tmp_path)])
    assert n == 30 and x.shape == (30, 3, 32, 32)


def test_exported_vqa_domain_reads_back(tmp_path):
    from training.data import load_benchmark
    from training.data.scenes import ANSWERS

    out = tmp_path / "count.tar.gz"
    n = export_domain("scenes_vqa", "count", str(out), limit=12)
    x, questions, y = read_vqa_domain(out.read_bytes(), ANSWERS, 64)
    d = load_benchmark("scenes_vqa", domains=["count"]).domains[0]
    assert n == 12 and x.shape == (12, 3, 64, 64) and questions == d.q_train[:12]
    assert np.array_equal(x, d.x_train[:12].numpy()) and np.array_equal(y, d.y_train[:12].numpy())  # lossless PNG


def test_unknown_answers_are_named_with_the_vocabulary_and_how_to_extend_it(tmp_path):
    import json

    out = tmp_path / "count.tar.gz"
    export_domain("scenes_vqa", "count", str(out), limit=12)
    x, questions, y = read_vqa_domain(out.read_bytes(), ["0", "1", "2", "3", "4", "5", "6"], 64)
    with pytest.raises(Problem) as e:  # a model whose vocabulary lacks some count answers
        read_vqa_domain(out.read_bytes(), ["0", "yes", "no"], 64)
    assert e.value.status == 422 and e.value.code == "unknown-answer"
    d = e.value.detail
    assert json.dumps(["0", "yes", "no"]).replace('"', "'") in d and "--extra-answers" in d and "vqa.weights" in d


def test_fuzzed_images_only_ever_raise_problem():
    from _util import _encodings, mutated_images

    assert len(_encodings()) >= 10  # PNG, JPEG, GIF, BMP, TIFF, WEBP, ... each mutated below
    decoded = rejected = 0
    for blob in mutated_images(300, seed=1):
        try:
            decode_image(blob, 32, "x", 4096**2)
            decoded += 1
        except Problem as e:
            assert e.status == 422
            rejected += 1
    assert decoded and rejected


def _png(side: int, mode: str = "RGB", seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.RandomState(seed)
    shape = (side, side) if mode in ("L", "P") else (side, side, len(mode))
    buf = io.BytesIO()
    Image.fromarray(rng.randint(0, 255, shape).astype(np.uint8), mode=None if mode != "P" else "L") \
        .convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def test_only_small_images_are_decoded_on_the_event_loop():
    from serving.archive import INLINE_BYTES, cheap_to_decode, open_images, small_request

    small, flat_huge = _png(32), _flat_png(2048)  # a flat 2048² PNG compresses to a few KiB: pixels decide
    assert len(flat_huge) < INLINE_BYTES
    assert small_request([flat_huge]) and not small_request([_png(256)] * 2)  # ~196 KiB each: off the loop
    assert not small_request([])

    def cheap(raws: list[bytes]) -> bool:
        return cheap_to_decode(open_images(raws, Limits()))

    assert cheap([small])
    assert not cheap([flat_huge])
    assert cheap([small] * 16)  # 16 × 32² = 16 Ki pixels: a batch of thumbnails stays inline
    assert not cheap([_flat_png(128)] * 5)  # 5 × 128² > 256²: the budget is summed over the request
    assert _code(open_images, [small, b"junk"], Limits()) == "bad-image"  # a header error is a 422 at once


def _flat_png(side: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
@pytest.mark.parametrize("side", [16, 32, 40])
def test_decode_matches_pil_convert_and_resize(mode: str, side: int):
    """The same-size shortcut and the one-pass header read give what PIL's convert + resize give (RGBA:
    composited over black first, so a half-transparent pixel is half as bright, not at full colour)."""
    from PIL import Image

    from serving.archive import decode_images

    raws = [_png(side, mode, seed=i) for i in range(3)]
    want = []
    for raw in raws:
        with Image.open(io.BytesIO(raw)) as im:
            if im.mode == "RGBA":
                im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im)
            want.append(np.asarray(im.convert("RGB").resize((32, 32), Image.BILINEAR)))
    got = decode_images(raws, 32, Limits())
    assert got.shape == (3, 3, 32, 32) and got.dtype == np.uint8 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, np.stack(want).transpose(0, 3, 1, 2))


def test_truncated_pixel_data_is_bad_image_and_names_the_image():
    from serving.archive import decode_images

    good = _png(32)
    cut = good[: len(good) // 2]  # the header reads, the pixels do not
    with pytest.raises(Problem) as e:
        decode_images([good, cut], 32, Limits())
    assert e.value.code == "bad-image" and "images[1]" in e.value.detail


def _enc(im, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_images_decode_upright_and_at_8_bits_whatever_their_mode():
    """What phones and scanners send: EXIF rotation, 16-bit grey, transparency, palettes, floats."""
    from PIL import Image

    from serving.archive import decode_image

    def dec(raw: bytes, size: int = 8) -> np.ndarray:
        return decode_image(raw, size, "x", 4096**2)

    grey16 = np.full((16, 16), 65535, np.uint16)
    grey16[8:] = 32896  # 128 × 257
    got = dec(_enc(Image.fromarray(grey16)))
    assert got[0, 0].tolist() == [255] * 3 and got[-1, 0].tolist() == [128] * 3  # scaled, not clipped to 255
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    assert dec(_enc(Image.fromarray(rgba, "RGBA")))[0, 0].tolist() == [100, 0, 0]  # over black: half as bright
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(0, (0, 0, 16, 8))  # the top half: index 0, declared transparent
    got = dec(_enc(pal, "GIF", transparency=0), 16)
    assert got[0, 0].tolist() == [0, 0, 0] and got[-1, 0].tolist() == [0, 255, 0]
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, :40] = 255  # left half white; stored so, EXIF says: rotate 90° clockwise to view
    exif = Image.Exif()
    exif[0x0112] = 6
    got = dec(_enc(Image.fromarray(img), "JPEG", exif=exif.tobytes()), 16)
    assert got[0, :, 0].mean() > 200 and got[-1, :, 0].mean() < 50  # upright: white on top
    unit = Image.fromarray(np.full((8, 8), 0.5, np.float32), "F")
    assert dec(_enc(unit, "TIFF"))[0, 0].tolist() == [128] * 3


@pytest.mark.parametrize("side", [20, 33, 64, 500, 4000])
def test_any_size_decodes_to_the_size_asked(side: int):
    from PIL import Image

    from serving.archive import decode_image

    raw = _enc(Image.new("RGB", (side, max(1, side // 2)), (10, 20, 30)), "JPEG")
    assert decode_image(raw, 64, "x", 4096**2).shape == (64, 64, 3)


def test_resize_images_is_the_upload_resize():
    from serving.archive import resize_images

    x = np.random.RandomState(0).randint(0, 255, (3, 3, 32, 32)).astype(np.uint8)
    assert resize_images(x, 32) is x and resize_images(x, 64).shape == (3, 3, 64, 64)
