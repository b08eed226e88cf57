"""Upload checks without Ray: every rejection names its problem code."""

import io
import tarfile
import zipfile

import pytest
from _util import CLASSES, make_archive, png

from serving.archive import BadUpload, Limits, read_domain, read_source
from training.data.export import export_domain


def _tar_with(member: tarfile.TarInfo, data: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.addfile(member, io.BytesIO(data) if data else None)
    return buf.getvalue()


def test_reads_layout_with_or_without_wrapping_folder():
    x, y = read_domain(make_archive(n_per_class=2), CLASSES, 32)
    assert x.shape == (6, 3, 32, 32) and sorted(y.tolist()) == [0, 0, 1, 1, 2, 2]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("wrap/a/1.png", png(0, 1))
        zf.writestr("wrap/b/1.png", png(1, 1))
    assert read_domain(buf.getvalue(), CLASSES, 32)[1].tolist() == [0, 1]


def test_rejections():
    link = tarfile.TarInfo("a/link.png")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    absolute = tarfile.TarInfo("/abs/a.png")
    absolute.size = 3
    cases = {
        "path-traversal": _tar_with(link),
        "bad-archive": b"plain bytes",
        "empty-domain": make_archive(n_per_class=0),
    }
    for code, data in cases.items():
        with pytest.raises(BadUpload) as e:
            read_domain(data, CLASSES, 32)
        assert e.value.code == code
    with pytest.raises(BadUpload) as e:
        read_domain(_tar_with(absolute, b"abc"), CLASSES, 32)
    assert e.value.code == "path-traversal"
    with pytest.raises(BadUpload) as e:
        read_domain(make_archive(n_per_class=3), CLASSES, 32, Limits(max_files=4))
    assert e.value.code == "too-large"
    with pytest.raises(BadUpload) as e:
        read_source("http://example.invalid/x.zip", CLASSES, 32)
    assert e.value.code == "bad-source"


def test_exported_domain_reads_back(tmp_path):
    out = tmp_path / "sk.zip"
    n = export_domain("digits5", "sklearn", str(out), limit=30)
    x, y = read_source(f"file://{out}", [str(i) for i in range(10)], 32)
    assert n == 30 and x.shape == (30, 3, 32, 32)
