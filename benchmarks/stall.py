"""How long can one hostile request stall everyone else? Prints a table.

Starts the server in process (temp data dir, tiny ``vit_test`` backbone: the HTTP path, not the model, is
under test), keeps a probe client classifying one image in a closed loop, and sends each attack once.
For each attack: its status and code, how long it took, and the probe's worst latency while it ran
(against the probe's p99 with no attack).

    .venv/bin/python benchmarks/stall.py            # ~1-2 minutes on 2 cores
"""

from __future__ import annotations

import base64
import gzip
import io
import os
import struct
import sys
import tarfile
import tempfile
import threading
import time
import zlib

import httpx
import numpy as np
from PIL import Image

from serving.ports import free_port


def _png(w: int = 32, h: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (h, w, 3)).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _huge_png(w: int, h: int) -> bytes:
    """A real PNG of w×h, all zeros (compresses to a few hundred KB), built without w·h·3 bytes of RAM."""
    raw = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * w)
    idat = b"".join(raw.compress(row) for _ in range(h)) + raw.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _tar_bomb(size: int) -> bytes:
    """tar.gz with one member of ``size`` zero bytes, streamed (never ``size`` bytes in memory)."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9) as gz:
        info = tarfile.TarInfo("0/zeros.png")
        info.size = size
        gz.write(info.tobuf())
        block = b"\0" * 2**20
        for _ in range(size // len(block)):
            gz.write(block)
        gz.write(b"\0" * (1024 + (-size) % 512))
    return buf.getvalue()


def main() -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from serving.app import build_app

    data = tempfile.mkdtemp(prefix="mergeserve-stall-")
    root = os.path.join(data, "sources")
    os.makedirs(os.path.join(root, "fifo", "0"))
    os.mkfifo(os.path.join(root, "fifo", "0", "x.png"))
    with open(os.path.join(root, "big.tar"), "wb") as f:  # 600 MiB, sparse
        f.truncate(600 * 2**20)
    token = "stall-token"
    cfg = {"data_dir": data, "backbone": "vit_test", "bootstrap": [], "auth_token": token, "source_roots": [root]}
    ray.init(namespace="mergeserve", include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="mergeserve", route_prefix="/")
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
    body = {"image": base64.b64encode(_png()).decode()}
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=url, timeout=120) as h:
            while not stop.is_set():
                t0 = time.perf_counter()
                h.post("/v1/classify", json=body)
                samples.append((t0, time.perf_counter() - t0))

    th = threading.Thread(target=probe)
    th.start()
    time.sleep(5)
    base = sorted(s for _, s in samples[10:])
    p99 = base[int(0.99 * (len(base) - 1))]

    zeros = b"\0" * (63 * 2**20)
    huge = {"image": base64.b64encode(_huge_png(13000, 13000)).decode()}  # payloads are built before timing
    bomb = _tar_bomb(2**30)

    def chunked_over_limit():
        for _ in range(80):
            yield b"\0" * 2**20

    attacks = {
        "13000² PNG to /v1/classify": lambda h: h.post("/v1/classify", json=huge),
        "1 GiB tar.gz bomb upload": lambda h: h.post(
            "/v1/domains", data={"name": "bomb"}, files={"archive": ("b.tgz", bomb)}, headers=auth),
        "63 MiB of zeros upload": lambda h: h.post(
            "/v1/domains", data={"name": "zeros"}, files={"archive": ("z", zeros)}, headers=auth),
        "80 MiB chunked body": lambda h: h.post("/v1/classify", content=chunked_over_limit(),
                                                headers={"content-type": "application/json"}),
        "600 MiB file:// source": lambda h: h.post(
            "/v1/domains", json={"name": "big", "source": f"file://{root}/big.tar"}, headers=auth),
        "FIFO under a file:// dir": lambda h: h.post(
            "/v1/domains", json={"name": "fifo", "source": f"file://{root}/fifo"}, headers=auth),
        "file:///etc/passwd": lambda h: h.post(
            "/v1/domains", json={"name": "pw", "source": "file:///etc/passwd"}, headers=auth),
    }
    rows = []
    with httpx.Client(base_url=url, timeout=300) as h:
        for name, attack in attacks.items():
            t0 = time.perf_counter()
            r = attack(h)
            t1 = time.perf_counter()
            time.sleep(0.5)
            during = [s for ts, s in samples if t0 - 0.05 <= ts <= t1]
            worst = max([s for ts, s in samples if ts <= t1 and ts + s >= t0] or [0.0])
            code = r.json().get("type", "").rsplit("/", 1)[-1] if r.headers.get("content-type", "").startswith(
                "application/problem+json") else ""
            rows.append((name, r.status_code, code, t1 - t0, len(during), worst))
    stop.set()
    th.join()
    serve.shutdown()
    ray.shutdown()
    print(f"probe: 1-image /v1/classify in a closed loop; p99 without attack {1e3 * p99:.0f} ms "
          f"({len(base)} requests); vit_test backbone; {os.cpu_count()} cores")
    print(f"{'attack':<30}{'status':>7} {'code':<18}{'took s':>8}{'probe n':>8}{'probe worst ms':>16}")
    for name, st, code, took, n, worst in rows:
        print(f"{name:<30}{st:>7} {code:<18}{took:>8.2f}{n:>8}{1e3 * worst:>16.0f}")
    return 0 if all(400 <= st < 500 for _, st, *_ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
