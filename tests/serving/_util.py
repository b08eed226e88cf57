import io
import json
import os
import sys
import tarfile
import time
import zipfile

import httpx
import numpy as np
from PIL import Image

from training.data.scenes import ANSWERS, make_family

TOKEN = "test-token"
CLASSES = ["a", "b", "c"]


def png(cls: int, seed: int, shift: int = 0) -> bytes:
    rng = np.random.RandomState(seed)
    img = rng.randint(0, 60, (32, 32, 3)).astype(np.uint8)
    img[8 * cls : 8 * cls + 8, :, (cls + shift) % 3] = 250
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def make_archive(n_per_class: int = 8, shift: int = 0, classes=CLASSES, extra: dict | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        files = {f"{c}/{i}.png": png(j, 100 * j + i, shift) for j, c in enumerate(classes) for i in range(n_per_class)}
        files.update(extra or {})
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def tiny_vilt() -> str:
    """A tiny pretrained ViLT for the vqa task (3 steps, seconds), shared by every test in this machine's
    temp directory (deterministic bytes, written atomically)."""
    import tempfile

    from training.recipes.vilt_scenes import VqaPretrainConfig, pretrain_vqa
    from training.tasks.vilt import VqaModelConfig

    path = os.path.join(tempfile.gettempdir(), "mergeserve-tests", "tiny_vilt_v1.safetensors")
    if not os.path.exists(path):
        model = VqaModelConfig(hidden=32, layers=2, heads=2, mlp=64, image_size=32, patch=8)
        pretrain_vqa(path, VqaPretrainConfig(model=model, steps=3, batch_size=8, n_per_family=6, n_test=4, threads=1),
                     progress=False)
    return path


def tiny_film() -> str:
    """A tiny pretrained ``film_scenes`` (the default vqa model: real ImageNet trunk, tiny head, 3 steps),
    shared like :func:`tiny_vilt`."""
    import tempfile

    from training.recipes.film_scenes import FilmPretrainConfig, pretrain_film

    path = os.path.join(tempfile.gettempdir(), "mergeserve-tests", "tiny_film_v1")
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        model = {"embed_dim": 8, "question_dim": 16, "channels": 8, "blocks": 2, "classifier_channels": 16,
                 "hidden": 16, "norm_groups": 2, "image_size": 32}
        pretrain_film(path, FilmPretrainConfig(model=model, steps=3, batch_size=8, n_per_family=6, n_test=4),
                      progress=False)
    return path


def tiny_llava_dir() -> str:
    """``tests/_tiny_vlm.py``'s tiny LLaVA as a local checkpoint directory."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
    from _tiny_vlm import tiny_llava_dir as build

    return build()


def server_config(data_dir: str) -> dict:
    return {
        "data_dir": data_dir,
        "backbone": "vit_test",
        "class_names": CLASSES,
        "bootstrap": [],
        "lora": {"rank": 2, "alpha": 4.0},
        "train": {"steps": 6, "batch_size": 8, "lr": 0.05},
        "auth_token": TOKEN,
        "max_upload_bytes": 2 * 2**20,
        "num_replicas": 1,
        "swap_timeout_s": 20,
        "source_roots": [data_dir],
        # 5 held-out images per domain make accuracy too coarse to gate on; test_pipeline.py tests the gate
        "gate": {"max_drop": 1.0, "require_gain": False},
        # one VQA replica always up: the default scales to zero after 5 idle minutes, and a cold start in the
        # middle of a test would make its timing depend on test order (`bench-serve --rss` runs the default)
        "vqa": {"weights": tiny_film(), "bootstrap": [], "train": {"steps": 6, "batch_size": 8, "lr": 1e-3},
                "num_replicas": 1},
        # a third task from config alone: a hub-format image-text-to-text model (tiny random LLaVA, saved
        # locally); scales from zero like the default, so it costs nothing until test_task_seam.py asks it
        "tasks": {"vlm": {"args": {"model_id": tiny_llava_dir()}, "image_size": 32,
                          "lora": {"rank": 4, "alpha": 8.0}, "train": {"steps": 30, "batch_size": 8, "lr": 3e-3}}},
    }


class Server:
    def __init__(self, url: str, data_dir: str) -> None:
        self.url, self.data_dir = url, data_dir
        self.http = httpx.Client(base_url=url, timeout=60)
        self.auth = {"Authorization": f"Bearer {TOKEN}"}

    def ingest(self, name: str, archive: bytes, **form) -> httpx.Response:
        files = {"archive": ("d.tar.gz", archive, "application/gzip")}
        return self.http.post("/v1/domains", data={"name": name, **form}, files=files, headers=self.auth)

    def wait(self, job_id: str, timeout: float = 120) -> dict:
        t0 = time.time()
        while time.time() - t0 < timeout:
            j = self.http.get(f"/v1/jobs/{job_id}").json()
            if j["status"] in ("succeeded", "failed"):
                return j
            time.sleep(0.2)
        raise TimeoutError(job_id)

    def state(self) -> tuple:
        a = self.http.get("/v1/adapters").json()
        d = self.http.get("/v1/domains").json()
        return a["active"], len(a["versions"]), [x["name"] for x in d["domains"]]


def start_app(data_dir: str, port: int) -> None:
    from ray import serve

    from serving.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(server_config(data_dir)), name="mergeserve", route_prefix="/")


def _encodings() -> dict[str, bytes]:
    """One small image in every format this PIL can write (the formats it can read include these)."""
    Image.init()  # registers every plugin, so Image.SAVE lists them all
    img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (24, 24, 3)).astype(np.uint8))
    out = {}
    for fmt in sorted(set(Image.SAVE) - {"PDF", "EPS", "PALM", "XBM", "MPO", "BUFR", "GRIB", "HDF5", "WMF"}):
        try:
            buf = io.BytesIO()
            (img.convert("1") if fmt in ("XBM",) else img).save(buf, format=fmt)
            out[fmt] = buf.getvalue()
        except Exception:  # noqa: BLE001 - a writer this build lacks (e.g. JPEG 2000 without openjpeg)
            continue
    return out


def mutated_images(n: int, seed: int = 0) -> list[bytes]:
    """``n`` images cycling through every writable format: intact, bit-flipped, truncated, length-lying."""
    rng = np.random.RandomState(seed)
    encs = list(_encodings().values())
    out = []
    for i in range(n):
        b = bytearray(encs[i % len(encs)])
        kind = (i // len(encs)) % 4
        if kind == 1:
            for _ in range(1 + rng.randint(8)):
                b[rng.randint(len(b))] = rng.randint(256)
        elif kind == 2:
            b = b[: rng.randint(1, len(b))]
        elif kind == 3:
            pos = rng.randint(min(32, len(b)))
            b[pos : pos + 4] = b"\xff\xff\xff\x7f"  # header fields (sizes, lengths) made huge
        out.append(bytes(b))
    return out


def _png(chw: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(chw.transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


def vqa_archive(family: str = "count", n: int = 24, seed: int = 5, rows: list | None = None,
                extra: dict | None = None, zipped: bool = False) -> bytes:
    """A VQA domain upload: ``images/i.png`` + ``questions.jsonl`` (scenes of one question family)."""
    s = make_family(family, n, seed=seed)
    files = {f"vqa/images/{i}.png": _png(s.images[i].numpy()) for i in range(n)}
    if rows is None:
        rows = [{"image": f"images/{i}.png", "question": s.questions[i], "answer": ANSWERS[int(s.answers[i])]}
                for i in range(n)]
    files["vqa/questions.jsonl"] = "\n".join(json.dumps(r) for r in rows).encode()
    files.update(extra or {})
    buf = io.BytesIO()
    if zipped:
        with zipfile.ZipFile(buf, "w") as zf:
            for k, v in files.items():
                zf.writestr(k, v)
    else:
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            for k, v in files.items():
                info = tarfile.TarInfo(k)
                info.size = len(v)
                tf.addfile(info, io.BytesIO(v))
    return buf.getvalue()
