import os
import sys
import time

import httpx
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests import the helpers in _util.py

from _util import Server, start_app  # noqa: E402

from serving.ports import DIRECT_PORTS, free_port  # noqa: E402


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    from serving.app import ray_env

    # as `mergeserve serve` does: each replica also serves on its own port
    ray_env(direct_port=free_port(span=DIRECT_PORTS))
    import ray
    from ray import serve

    data_dir = str(tmp_path_factory.mktemp("serve-data"))
    port = free_port()
    ray.init(num_cpus=4, namespace="mergeserve", include_dashboard=False, log_to_driver=False)
    start_app(data_dir, port)
    s = Server(f"http://127.0.0.1:{port}", data_dir)
    for _ in range(120):
        try:
            if s.http.get("/readyz").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    yield s
    serve.shutdown()
    ray.shutdown()
