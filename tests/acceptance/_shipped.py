"""The shipped server as a user runs it: ``.venv/bin/mergeserve serve`` (``make serve``'s venv: ``pip install .``,
no extras), started in a temp dir so nothing from the source tree is imported, on free ports and a temp
data dir, with every other setting at its default."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageDraw

from serving.ports import DIRECT_PORTS, free_port

REPO = Path(__file__).parents[2]
PRODUCT = REPO / ".venv"  # built by `make install` / `make serve` / `make test`: the product alone
TIMINGS: list[tuple[str, float]] = []  # (step, seconds), printed at the end of the run (conftest.py)


def product_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: no test-runner paths, no token, nothing of the dev venv."""
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "MERGESERVE_TOKEN", "MERGESERVE_URL", "MERGESERVE_DATA", "PYTEST_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PATH"] = f"{PRODUCT / 'bin'}:{env.get('PATH', '')}"
    return {**env, **extra}


class Served:
    """One ``mergeserve serve`` process (a session leader, so its process group is the server's tree)."""

    def __init__(self, root: Path, *flags: str, name: str = "server") -> None:
        self.root, self.flags, self.name = root, flags, name
        self.data = root / f"{name}-data"
        self.port, self.direct = free_port(), free_port(span=DIRECT_PORTS)
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.answers: list[tuple[int, str | None]] = []  # (status, Retry-After) of every answer while starting

    def start(self, timeout: float = 240) -> float:
        """Start and wait for ``/readyz`` 200; returns the seconds it took."""
        self.starts += 1
        self.log = self.root / f"{self.name}-{self.starts}.log"
        cmd = [str(PRODUCT / "bin" / "mergeserve"), "serve", "--data-dir", str(self.data), "--port", str(self.port),
               "--direct-port", str(self.direct), *self.flags]
        t0 = time.monotonic()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.root, env=product_env(), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                r = httpx.get(f"{self.url}/v1/tasks", timeout=2)  # an API route, as a client's retry loop would
                self.answers.append((r.status_code, r.headers.get("retry-after")))
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{self.name} not ready after {timeout} s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        return self.log.read_bytes()[-n:].decode(errors="replace")

    def get(self, path: str, **kw: object) -> dict:
        r = httpx.get(self.url + path, timeout=30, **kw)
        r.raise_for_status()
        return r.json()

    def job(self, domain: str) -> dict | None:
        return next((j for j in self.get("/v1/jobs", params={"limit": 200})["jobs"] if j["domain"] == domain), None)

    def wait_job(self, domain: str, timeout: float = 300, until: tuple[str, ...] = ("succeeded", "failed",
                                                                                     "rejected")) -> dict:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            j = self.job(domain)
            if j and j["status"] in until:
                return j
            time.sleep(0.5)
        raise AssertionError(f"job of {domain} not in {until} after {timeout} s: {self.job(domain)}\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL the server's whole process group: what a hard stop does."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 60) -> float:
        """SIGTERM (a supervisor's clean stop); returns the seconds to exit."""
        t0 = time.monotonic()
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                raise
        return time.monotonic() - t0


def readme_session() -> list[str]:
    """The commands of the README's session block (continuation lines joined, comments dropped)."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- session[^>]*-->\s*```bash\n(.*?)```\s*<!-- /session -->", text, re.S)
    assert block, "README.md has no session block between <!-- session --> and <!-- /session -->"
    cmds, cur = [], ""
    for line in block.group(1).splitlines():
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        cur += line.rstrip("\\") + (" " if line.endswith("\\") else "")
        if not line.endswith("\\"):
            cmds.append(cur.strip())
            cur = ""
    return cmds


def run_session(cmds: list[str], cwd: Path, url: str, timeout: float = 900) -> tuple[str, list[tuple[str, float]]]:
    """Run the commands in one bash, as written but for the server's address; returns (output, step times)."""
    port = url.rsplit(":", 1)[1]
    stamps = cwd / "stamps"
    lines = ["set -euo pipefail"]
    for i, c in enumerate(cmds):
        lines += [f'echo "{i} $(date +%s.%N)" >> {stamps}', c.replace("localhost:8000", f"127.0.0.1:{port}")]
    lines.append(f'echo "{len(cmds)} $(date +%s.%N)" >> {stamps}')
    os.symlink(PRODUCT, cwd / ".venv")  # `. .venv/bin/activate`, as from the repository's root
    out = subprocess.run(["bash", "-c", "\n".join(lines)], cwd=cwd, env=product_env(MERGESERVE_URL=url),
                         capture_output=True, text=True, timeout=timeout)
    marks = [float(x.split()[1]) for x in stamps.read_text().splitlines()]
    steps = [(cmds[i], b - a) for i, (a, b) in enumerate(zip(marks, marks[1:]))]
    assert out.returncode == 0, (f"README session failed at `{cmds[len(marks) - 1]}` (exit {out.returncode})\n"
                                 f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout, steps


# --- a user's own domain: shapes, in every size and mode an upload may bring ----------------------
LABELS = ["circle", "square", "triangle"]


def _shape(label: str, rng: np.random.RandomState, side: int) -> Image.Image:
    im = Image.new("RGB", (side, side), tuple(int(v) for v in rng.randint(0, 80, 3)))
    d, r = ImageDraw.Draw(im), side * rng.uniform(0.2, 0.35)
    cx, cy = side * rng.uniform(0.35, 0.65, size=2)
    fill = tuple(int(v) for v in rng.randint(150, 256, 3))
    if label == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif label == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return im


def _encode(im: Image.Image, kind: str) -> tuple[str, bytes]:
    """One image as an upload may bring it: ``kind`` picks the format, mode and quirks."""
    buf = io.BytesIO()
    if kind == "rgba":
        rgba = im.convert("RGBA")
        rgba.putalpha(200)
        rgba.save(buf, "PNG")
    elif kind == "gray16":  # a 16-bit PNG: PIL's plain convert would clip it to white
        a = (np.asarray(im.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        Image.fromarray(a).save(buf, "PNG")
    elif kind == "gif":
        im.convert("P", palette=Image.ADAPTIVE, colors=16).save(buf, "GIF", transparency=0)
    elif kind == "exif":  # stored sideways, EXIF says rotate: the upright image is what must be learned
        ex = Image.Exif()
        ex[0x0112] = 6
        im.transpose(Image.ROTATE_90).save(buf, "JPEG", exif=ex.tobytes())
    elif kind == "gray":
        im.convert("L").save(buf, "JPEG")
    else:
        im.save(buf, "PNG")
    return ("png" if kind in ("rgba", "gray16", "rgb") else "gif" if kind == "gif" else "jpg"), buf.getvalue()


KINDS = [("rgb", 64), ("rgba", 100), ("gray", 20), ("gray16", 48), ("gif", 80), ("exif", 300), ("rgb", 33)]


def shapes_folder(root: Path, n_per_class: int = 24, seed: int = 0) -> Path:
    """``root/<label>/<i>.<ext>``: mixed sizes (20 px to one 4000 px image per class) and modes."""
    rng = np.random.RandomState(seed)
    for label in LABELS:
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            kind, side = KINDS[i % len(KINDS)] if i else ("rgb", 4000)
            ext, data = _encode(_shape(label, rng, side), kind if side < 4000 else "exif")
            (root / label / f"{i:03d}.{ext}").write_bytes(data)
    return root


def maps_torch(pid: int) -> bool:
    """Whether process ``pid`` has libtorch mapped (imported torch)."""
    with open(f"/proc/{pid}/maps") as f:
        return "libtorch" in f.read()


def record(step: str, seconds: float) -> None:
    TIMINGS.append((step, seconds))


def dump(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=1))
