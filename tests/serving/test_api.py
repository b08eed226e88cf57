"""End to end through HTTP on a real Ray Serve app (one Ray instance per session, tiny backbone)."""

import base64
import io
import json
import os
import re
import tarfile
import threading
import time
import zipfile

import httpx
import pytest
from _util import CLASSES, make_archive, png

B64 = base64.b64encode(png(0, 1)).decode()


def _metric(text: str, name: str, **labels) -> float | None:
    lab = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # the exposition sorts label names
    m = re.search(rf"^{name}{{{lab}}} (\S+)$" if lab else rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_health_and_openapi(server):
    assert server.http.get("/healthz").json() == {"status": "ok"}
    r = server.http.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    assert "/v1/classify" in server.http.get("/openapi.json").json()["paths"]


def test_ingest_two_domains_then_accuracy_everywhere(server):
    r1 = server.ingest("dom1", make_archive(shift=0), method="pam")
    assert r1.status_code == 202 and r1.headers["location"] == f"/v1/jobs/{r1.json()['job_id']}"
    j1 = server.wait(r1.json()["job_id"])
    assert j1["status"] == "succeeded", j1
    assert j1["progress"]["step"] == j1["progress"]["total"] == 6 and j1["timings"]["total"] > 0
    src = tarfile.open(fileobj=io.BytesIO(make_archive(shift=1)))
    root = f"{server.data_dir}/src-dom2"
    src.extractall(root)
    r2 = server.http.post(
        "/v1/domains", json={"name": "dom2", "source": f"file://{root}", "method": "average"}, headers=server.auth
    )
    assert r2.status_code == 202
    j2 = server.wait(r2.json()["job_id"])
    assert j2["status"] == "succeeded", j2
    doms = {d["name"]: d for d in server.http.get("/v1/domains").json()["domains"]}
    assert {"dom1", "dom2"} <= set(doms)
    assert 0 <= doms["dom1"]["accuracy_now"] <= 1 and doms["dom2"]["accuracy_when_learned"] is not None
    assert 0 < doms["dom1"]["buffer_size"] <= 5 * len(CLASSES)
    m = server.http.get("/metrics").text
    for d in ("dom1", "dom2"):
        assert _metric(m, "mergeserve_domain_accuracy", task="classify", domain=d, source="holdout") is not None
    assert _metric(m, "mergeserve_adapter_version", task="classify") == j2["adapter_version"]
    assert _metric(m, "mergeserve_ingest_jobs_total", task="classify", status="succeeded") >= 2
    v = server.http.get("/v1/adapters").json()
    assert v["active"] == j2["adapter_version"] and v["versions"][-1]["parent"] == j1["adapter_version"]


def test_classify_forms_and_feedback(server):
    one = server.http.post(
        "/v1/classify", json={"image": B64, "domain": "dom1", "top_k": 2}, headers={"X-Request-ID": "req-fixed-1"}
    )
    assert one.status_code == 200 and one.headers["x-request-id"] == "req-fixed-1"
    body = one.json()
    assert body["request_id"] == "req-fixed-1" and len(body["predictions"]) == 2
    assert body["predictions"][0]["label"] in CLASSES and isinstance(body["adapter_version"], int)
    batch = server.http.post("/v1/classify", json={"images": [B64, B64, B64]}).json()
    assert len(batch["results"]) == 3
    multi = server.http.post("/v1/classify", files=[("file", ("x.png", png(1, 2), "image/png"))]).json()
    assert multi["predictions"][0]["label"] in CLASSES
    fb = server.http.post("/v1/feedback", json={"request_id": "req-fixed-1", "label": "a"}, headers=server.auth)
    assert fb.status_code == 200 and fb.json()["domain"] == "dom1"
    m = server.http.get("/metrics").text
    assert _metric(m, "mergeserve_domain_accuracy", task="classify", domain="dom1", source="feedback") is not None


def test_no_failed_request_during_ingest_and_swap(server):
    results, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            r = server.http.post("/v1/classify", json={"image": B64})
            results.append((r.status_code, r.json().get("adapter_version")))

    before = server.http.get("/v1/adapters").json()["active"]
    t = threading.Thread(target=client)
    t.start()
    job = server.wait(server.ingest("dom3", make_archive(shift=2)).json()["job_id"])
    for _ in range(20):  # keep classifying a little after the swap
        server.http.post("/v1/classify", json={"image": B64})
    stop.set()
    t.join()
    assert job["status"] == "succeeded"
    codes = [c for c, _ in results]
    versions = [v for _, v in results]
    assert len(results) > 5 and set(codes) == {200}
    assert versions == sorted(versions) and versions[0] >= before and versions[-1] == job["adapter_version"]


def test_rollback_and_forward(server):
    active = server.http.get("/v1/adapters").json()["active"]
    r = server.http.post("/v1/adapters/1/activate", headers=server.auth)
    assert r.status_code == 200 and r.json()["active"] == 1
    assert server.http.post("/v1/classify", json={"image": B64}).json()["adapter_version"] == 1
    assert server.http.post(f"/v1/adapters/{active}/activate", headers=server.auth).json()["active"] == active
    assert server.http.post("/v1/classify", json={"image": B64}).json()["adapter_version"] == active


def _zip(files: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for k, v in files.items():
            zf.writestr(k, v)
    return buf.getvalue()


BAD_INGESTS = {
    "unknown-label": lambda: make_archive(classes=["a", "zebra"]),
    "empty-domain": lambda: _zip({"README.txt": b"no images"}),
    "path-traversal": lambda: _zip({"../../etc/a/x.png": png(0, 1)}),
    "archive-bomb": lambda: _zip({"a/big.png": b"\0" * (5 * 2**20)}),
    "bad-image": lambda: make_archive(extra={"a/broken.png": b"not a png"}),
    "bad-archive": lambda: b"this is not an archive",
}


@pytest.mark.parametrize("code", sorted(BAD_INGESTS))
def test_bad_ingest_gets_4xx_and_changes_nothing(server, code):
    before = server.state()
    r = server.ingest(f"bad-{code}", BAD_INGESTS[code]())
    assert 400 <= r.status_code < 500 and r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["type"].endswith(code) and body["status"] == r.status_code and body["request_id"]
    assert server.state() == before


def test_other_bad_inputs(server):
    before = server.state()
    cases = [
        (server.http.post("/v1/classify", json={"image": base64.b64encode(b"nope").decode()}), 422, "bad-image"),
        (
            server.http.post("/v1/classify", content=b"{not json", headers={"content-type": "application/json"}),
            400,
            "bad-json",
        ),
        (server.http.post("/v1/classify", json={"image": B64, "top_k": 99}), 422, "bad-top-k"),
        (
            server.http.post("/v1/domains", data={"name": "noauth"}, files={"archive": ("a", make_archive())}),
            401,
            "unauthorized",
        ),
        (server.ingest("dom1", make_archive()), 409, "domain-exists"),
        (server.ingest("Bad Name!", make_archive()), 422, "invalid-domain-name"),
        (server.ingest("nl\n", make_archive()), 422, "invalid-domain-name"),
        (server.ingest("newdom", make_archive(), method="nope"), 422, "unknown-method"),
        (server.ingest("huge", b"\0" * (3 * 2**20)), 413, "too-large"),
        (server.http.get("/v1/jobs/doesnotexist"), 404, "unknown-job"),
        (server.http.post("/v1/adapters/999/activate", headers=server.auth), 404, "unknown-version"),
        (
            server.http.post("/v1/feedback", json={"request_id": "never", "label": "a"}, headers=server.auth),
            404,
            "unknown-request",
        ),
        (
            server.http.post(
                "/v1/feedback", json={"domain": "dom1", "label": "zzz", "prediction": "a"}, headers=server.auth
            ),
            422,
            "unknown-label",
        ),
        (
            server.http.post("/v1/domains", json={"name": "x", "source": "s3://bucket/x"}, headers=server.auth),
            422,
            "bad-source",
        ),
    ]
    for r, status, code in cases:
        assert r.status_code == status, (code, r.text)
        assert r.json()["type"].endswith(code), r.text
    assert server.state() == before


def test_duplicate_while_running_and_idempotency(server):
    first = server.ingest("dom4", make_archive(shift=1), method="ties")
    assert first.status_code == 202
    dup = server.ingest("dom4", make_archive(shift=1))
    assert dup.status_code == 409 and dup.json()["type"].endswith("domain-busy")
    key = {"Idempotency-Key": "k-123", **server.auth}
    files = {"archive": ("d.tar.gz", make_archive(shift=2), "application/gzip")}
    a = server.http.post("/v1/domains", data={"name": "dom5"}, files=files, headers=key)
    b = server.http.post("/v1/domains", data={"name": "dom5"}, files=files, headers=key)
    assert a.status_code == b.status_code == 202 and a.json()["job_id"] == b.json()["job_id"] and b.json()["replayed"]
    assert server.wait(first.json()["job_id"])["status"] == "succeeded"
    assert server.wait(a.json()["job_id"])["status"] == "succeeded"


def test_restart_keeps_adapter_version(server):
    import ray
    from _util import start_app
    from ray import serve

    from serving.controller import NAME, NAMESPACE

    before = server.http.get("/v1/adapters").json()
    serve.delete("mergeserve")
    ray.kill(ray.get_actor(NAME, namespace=NAMESPACE), no_restart=True)
    port = int(server.url.rsplit(":", 1)[1])
    start_app(server.data_dir, port)
    after = server.http.get("/v1/adapters").json()
    assert after["active"] == before["active"] and len(after["versions"]) == len(before["versions"])
    r = server.http.post("/v1/classify", json={"image": B64})
    assert r.status_code == 200 and r.json()["adapter_version"] == before["active"]
    assert json.loads(server.http.get("/v1/domains").text)["domains"]


def test_hyper_parameters_rejected_at_the_door(server):
    before = server.state()
    for hyper in ({"lr": 1e30, "steps": 10}, {"steps": 1000000}, {"steps": "abc"}, {"every": 0}, {"bogus": 1}):
        r = server.ingest("hyperdom", make_archive(), hyper=json.dumps(hyper))
        assert r.status_code == 422 and r.json()["type"].endswith("bad-hyper-parameter"), (hyper, r.text)
    r = server.ingest("hyperdom", make_archive(), method="ties", hyper=json.dumps({"density": 2}))
    assert r.status_code == 422 and "density" in r.json()["detail"]
    assert server.state() == before
    assert not os.path.exists(os.path.join(server.data_dir, "domains", "hyperdom.safetensors"))


def test_every_client_error_is_problem_json(server):
    before = server.state()
    raw = {"content-type": "application/json"}
    cases = [
        (server.http.get("/v1/classify"), 405),
        (server.http.post("/v1/classify", content=b"--x\r\n", headers={"content-type": "multipart/form-data"}), 400),
        (server.http.post("/v1/classify", content='{"image": "é"}'.encode("latin-1"), headers=raw), 400),
        (server.http.post("/v1/classify", json={"image": B64, "top_k": True}), 422),
        (server.http.post("/v1/classify", content=b'{"image": "%s", "domain": "\\ud800"}' % B64.encode(),
                          headers=raw), 400),  # a lone surrogate is not valid JSON for the strict parser
        (server.http.post("/v1/adapters/100000000000000000000000/activate", headers=server.auth), 422),
        (server.http.post("/v1/feedback", json={"label": ["a"], "request_id": "x"}, headers=server.auth), 422),
        (server.http.post("/v1/feedback", content=b'{"label": "a", "request_id": "\\ud800"}',
                          headers={**raw, **server.auth}), 400),
        (server.http.post("/v1/feedback", json={"domain": "dom1", "label": "a", "prediction": "zzz"},
                          headers=server.auth), 422),
        (server.http.post("/v1/domains", json={"name": "nl\n", "source": "file:///x"}, headers=server.auth), 422),
        (server.http.post("/v1/domains", json={"name": "x", "source": "file:///etc/passwd"}, headers=server.auth),
         422),
    ]
    for r, status in cases:
        assert r.status_code == status, r.text
        assert r.headers["content-type"].startswith("application/problem+json"), r.text
        assert r.json()["status"] == status
    assert server.state() == before


def test_idempotency_key_reused_with_another_body(server):
    key = {"Idempotency-Key": "k-reuse", **server.auth}
    a = server.http.post("/v1/domains", data={"name": "domk"}, files={"archive": ("d", make_archive(shift=1))},
                         headers=key)
    b = server.http.post("/v1/domains", data={"name": "domk"}, files={"archive": ("d", make_archive(shift=2))},
                         headers=key)
    assert a.status_code == 202 and b.status_code == 422 and b.json()["type"].endswith("idempotency-key-reused")
    assert server.wait(a.json()["job_id"])["status"] == "succeeded"


def test_fuzzed_images_never_answer_5xx(server):
    from _util import mutated_images

    statuses = {}
    for i, blob in enumerate(mutated_images(150)):
        r = server.http.post("/v1/classify", json={"image": base64.b64encode(blob).decode()})
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (i, r.text)
    assert statuses.get(200) and statuses.get(422), statuses  # both decodable and broken ones were sent


def test_worker_death_heals(server):
    import ray

    from serving.controller import NAMESPACE, WORKER

    ray.kill(ray.get_actor(WORKER, namespace=NAMESPACE), no_restart=True)
    ready = server.http.get("/readyz").json()
    assert ready["status"] == "ready" and "ingest" in ready  # serving stays ready; ingest reported apart
    job = server.wait(server.ingest("domheal", make_archive(shift=1)).json()["job_id"])
    assert job["status"] == "succeeded", job
    assert server.http.get("/readyz").json()["ingest"]["worker"] == "ok"


def test_readyz_answers_at_once_while_the_worker_trains(server):
    """The worker runs one call at a time: /readyz must not ping it behind a training run (it took 5 s)."""
    job_id = server.ingest("dombusy", make_archive(shift=4), hyper=json.dumps({"steps": 60})).json()["job_id"]
    seen = set()
    while (job := server.http.get(f"/v1/jobs/{job_id}").json())["status"] not in ("succeeded", "failed", "rejected"):
        if job["status"] == "training":
            r = server.http.get("/readyz", timeout=2.5)  # a probe's budget; the old ping waited 5 s
            assert r.status_code == 200
            seen.add(r.json()["ingest"]["worker"])
        time.sleep(0.05)
    assert "busy" in seen, seen
    assert _metric(server.http.get("/metrics").text, "mergeserve_ingest_healthy") == 1


def test_idle_worker_is_released_and_restarted_on_demand(server):
    import ray

    from serving.controller import NAME, NAMESPACE, WORKER

    ctrl = ray.get_actor(NAME, namespace=NAMESPACE)
    server.http.get("/readyz")  # the worker answers a ping first, so there is one to release
    assert ray.get(ctrl.release_idle_worker.remote(3600.0)) is False  # used within the hour: kept
    assert ray.get(ctrl.release_idle_worker.remote(0.0)) is True
    with pytest.raises(ValueError):
        ray.get_actor(WORKER, namespace=NAMESPACE)  # the process is gone, not just forgotten
    ready = server.http.get("/readyz").json()
    assert ready["status"] == "ready" and ready["ingest"]["worker"] == "idle"  # idle is healthy, not an alert
    assert _metric(server.http.get("/metrics").text, "mergeserve_ingest_healthy") == 1
    job = server.wait(server.ingest("domidle", make_archive(shift=3)).json()["job_id"])
    assert job["status"] == "succeeded", job
    assert server.http.get("/readyz").json()["ingest"]["worker"] == "ok"


def test_adaptive_over_http_with_alpha_visible(server):
    before = server.http.get("/v1/adapters").json()["active"]
    r = server.ingest("domada", make_archive(shift=2), method="adaptive", hyper=json.dumps({"fit_steps": 5}))
    job = server.wait(r.json()["job_id"])
    assert job["status"] == "succeeded", job
    v = next(x for x in server.http.get("/v1/adapters").json()["versions"] if x["version"] == job["adapter_version"])
    assert v["active"] and v["method"] == "adaptive" and "domada" in v["coefficients"]
    assert server.http.post("/v1/classify", json={"image": B64}).json()["adapter_version"] == v["version"]
    m = server.http.get("/metrics").text
    coef = _metric(m, "mergeserve_merge_coefficient", task="classify", domain="domada")
    assert coef == pytest.approx(v["coefficients"]["domada"])
    # back to the LoRA lineage, so later ingests may use any method again
    assert server.http.post(f"/v1/adapters/{before}/activate", headers=server.auth).status_code == 200



def test_the_direct_port_serves_the_same_api(server):
    """Direct ingress (on by default): the replica's own port answers what the proxy answers, errors too."""
    from serving.app import direct_ports

    ports = direct_ports()
    assert len(ports) == 1  # one Model replica; the VqaModel deployment is not an ingress and gets none
    with httpx.Client(base_url=f"http://127.0.0.1:{ports[0]}", timeout=60) as direct:
        body = {"images": [B64, base64.b64encode(png(2, 5)).decode()], "top_k": 3}
        via_proxy = server.http.post("/v1/classify", json=body).json()
        via_port = direct.post("/v1/classify", json=body, headers={"X-Request-ID": "direct-1"})
        assert via_port.status_code == 200 and via_port.json()["request_id"] == "direct-1"
        assert via_port.json()["results"] == via_proxy["results"]
        assert via_port.json()["adapter_version"] == via_proxy["adapter_version"]
        bad = direct.post("/v1/classify", json={"image": base64.b64encode(b"nope").decode()})
        assert bad.status_code == 422 and bad.json()["type"].endswith("bad-image")
        assert bad.headers["content-type"].startswith("application/problem+json")
        r1, r2 = direct.get("/readyz").json(), server.http.get("/readyz").json()
        assert r1["replica"]["replica"] == r2["replica"]["replica"] and r1["status"] == "ready"
        assert direct.get("/metrics").status_code == 200


def test_the_main_port_is_served_by_haproxy(server):
    """With direct ingress (``ray_env``), the main port is Serve's HAProxy, not the Python proxy: the
    process listening there is ``haproxy``, and it answers the API as the replica's own port does."""
    import psutil

    port = int(server.url.rsplit(":", 1)[1])
    listeners = {c.pid for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port}
    assert listeners and {psutil.Process(p).name() for p in listeners} == {"haproxy"}
    r = server.http.post("/v1/classify", json={"image": B64}, headers={"X-Request-ID": "via-haproxy"})
    assert r.status_code == 200 and r.json()["request_id"] == "via-haproxy"
    bad = server.http.post("/v1/classify", json={"image": 1})
    assert bad.status_code == 422 and bad.headers["content-type"].startswith("application/problem+json")


def test_the_model_replica_runs_the_api_on_serves_main_loop(server):
    """``replica_env`` reaches the Model replicas' processes only: their API shares Serve's main event
    loop (no second loop in a thread of its own); the proxy keeps Serve's default."""
    from benchmarks.serve.accounting import command_line as _cmd
    from benchmarks.serve.accounting import process_tree
    from benchmarks.serve.accounting import role_of as _role

    key = "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"
    roles: dict[str, list[str | None]] = {}
    for p in process_tree(os.getpid()):
        roles.setdefault(_role(_cmd(p)), []).append(p.environ().get(key))
    assert roles["replica:mergeserve"] == ["0"]
    assert roles["proxy"] and set(roles["proxy"]) == {None}  # HAProxy and Serve's fallback Python proxy


def test_a_worker_killed_mid_job_costs_an_attempt_not_the_job(server):
    """An OOM kill or a lost node takes the worker's process: the job runs again (issue 29), as after a restart."""
    import ray

    from serving.controller import NAMESPACE, WORKER

    job_id = server.ingest("domkill", make_archive(shift=5), hyper=json.dumps({"steps": 80})).json()["job_id"]
    while (job := server.http.get(f"/v1/jobs/{job_id}").json())["progress"]["step"] < 10:
        assert job["status"] in ("queued", "training"), job
        time.sleep(0.05)
    ray.kill(ray.get_actor(WORKER, namespace=NAMESPACE), no_restart=True)
    job = server.wait(job_id, timeout=180)
    assert job["status"] == "succeeded" and job["attempts"] == 2, job
    assert len(job["history"]) == 1 and "training worker died" in job["history"][0]["cause"]


def test_a_restarting_controller_is_a_503_with_retry_after_never_a_500(server):
    import ray

    from serving.controller import NAME, NAMESPACE

    seen = []
    ray.kill(ray.get_actor(NAME, namespace=NAMESPACE), no_restart=False)  # it restarts (max_restarts=-1)
    t0 = time.time()
    while time.time() - t0 < 8:
        r = server.http.get("/v1/adapters")
        seen.append(r.status_code)
        if r.status_code == 503:
            assert r.headers["retry-after"] == "2" and r.json()["type"].endswith("/unavailable"), r.text
        if r.status_code == 200 and 503 in seen:
            break
        time.sleep(0.02)
    assert set(seen) <= {200, 503} and 503 in seen and seen[-1] == 200, seen  # it was away, and said so


def test_methods_route_is_the_schemas_the_server_validates_with(server):
    from training.hyper import HYPER

    m = server.http.get("/v1/methods").json()
    assert m["methods"]["ties"]["hyper_schema"] == HYPER["ties"].model_json_schema()
    assert "pam_adaptive" in m["methods"]  # online too: its PAM lineage kept beside the α-merge
    assert m["tasks"]["classify"]["default_method"] == "pam" and "adaptive" in m["tasks"]["classify"]["methods"]
    assert m["tasks"]["vqa"]["methods"] == m["tasks"]["classify"]["methods"]  # adaptive for vqa too
    assert m["tasks"]["classify"]["steps"] == 6 and m["max_steps"] == 2000
    assert "(0, 1]" in m["methods"]["ties"]["allowed"]["density"]
