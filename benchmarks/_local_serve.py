"""One mergeserve app on a private local Ray cluster, for the serving A/B scripts in this folder."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from benchmarks.serve.harness import DIRECT_PORTS, free_port, json_body, png_b64, private_ray_env, wait_http


def classify_body(tmp: str, images: int) -> str:
    """Write the A/B scripts' fixed ``/v1/classify`` request (``images`` PNGs, seed 2) under ``tmp``;
    returns its path, for the load generator's ``body_file``."""
    path = os.path.join(tmp, "body.json")
    with open(path, "wb") as f:
        f.write(json_body(png_b64(images, seed=2)))
    return path


@contextmanager
def local_mergeserve(backbone: str, direct: bool = True,
                     config: dict | None = None) -> Iterator[tuple[str, object, str]]:
    """Start ``build_app`` on 127.0.0.1 (``direct``: Serve's direct ingress and HAProxy, as ``mergeserve
    serve`` runs; else Serve's Python proxy only) and yield ``(base_url, ServerConfig, tmp_dir)``.
    ``config`` overrides ``ServerConfig`` fields (e.g. ``{"num_replicas": 2}``).

    The cluster uses a private ``RAY_TMPDIR`` (``private_ray_env``) and is shut down on exit.
    """
    import ray
    from ray import serve

    from serving.app import build_app
    from serving.config import ServerConfig

    tmp = tempfile.mkdtemp(prefix="msab-")
    private_ray_env(tmp, direct_port=free_port(span=DIRECT_PORTS) if direct else None)
    cfg = ServerConfig.model_validate({"data_dir": f"{tmp}/data", "bootstrap": [], "backbone": backbone,
                                       "vqa": {"enabled": False}, **(config or {})})
    ray.init(namespace="mergeserve", include_dashboard=False, log_to_driver=False, num_cpus=4)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(cfg.model_dump(mode="json")), name="mergeserve", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/readyz", 300)
        yield base, cfg, tmp
    finally:
        serve.shutdown()
        ray.shutdown()
