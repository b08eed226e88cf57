"""One task seam: a third task named only in the server's config (``tasks: {vlm: ...}``, a tiny random LLaVA
saved as a local checkpoint directory) is served, learns a domain end to end and hot-swaps through the same
routes, store, worker and controller as ``classify`` and ``vqa``; ``POST /v1/{task}`` serves every task and
the old routes stay as aliases."""

import base64
import time

from _util import _png, png, tiny_llava_dir, vqa_archive

from training.data.scenes import make_family


def _question(i: int = 0) -> dict:
    s = make_family("color", 4, seed=21)
    return {"image": base64.b64encode(_png(s.images[i].numpy())).decode(), "question": s.questions[i]}


def test_every_configured_task_is_listed_and_routed(server):
    tasks = {t["name"]: t for t in server.http.get("/v1/tasks").json()["tasks"]}
    assert set(tasks) == {"classify", "vqa", "vlm"}
    assert tasks["vlm"]["model"] == tiny_llava_dir() and tasks["vlm"]["active_version"] == 0
    paths = server.http.get("/openapi.json").json()["paths"]
    assert {"/v1/{task}", "/v1/classify", "/v1/vqa"} <= set(paths)


def test_the_task_route_and_its_aliases_answer_alike(server):
    img = base64.b64encode(png(1, seed=3)).decode()
    a = server.http.post("/v1/classify", json={"image": img, "top_k": 3})
    b = server.http.post("/v1/{task}".format(task="classify"), json={"image": img, "top_k": 3})
    assert a.status_code == b.status_code == 200
    assert a.json()["predictions"] == b.json()["predictions"]
    r = server.http.post("/v1/detect", json=_question())
    assert r.status_code == 404 and r.json()["type"].endswith("unknown-task"), r.text
    assert "vlm" in r.json()["detail"]


def test_a_config_task_answers_learns_a_domain_and_swaps(server):
    r = server.http.post("/v1/vlm", json=_question(), timeout=120)  # the replica may start from zero
    assert r.status_code == 200, r.text
    body = r.json()
    vqa_before = server.http.get("/v1/adapters", params={"task": "vqa"}).json()["active"]
    assert body["adapter_version"] == 0 and isinstance(body["answers"][0]["answer"], str)
    r = server.ingest("vlmcolor", vqa_archive("color", n=24, seed=8), task="vlm")
    assert r.status_code == 202 and r.json()["task"] == "vlm", r.text
    job = server.wait(r.json()["job_id"], timeout=240)
    assert job["status"] == "succeeded", job
    assert job["task"] == "vlm" and job["adapter_version"] == 1
    domains = server.http.get("/v1/domains", params={"task": "vlm"}).json()["domains"]
    assert [d["name"] for d in domains] == ["vlmcolor"]
    acc = next(v for v in server.http.get("/v1/adapters", params={"task": "vlm"}).json()["versions"]
               if v["version"] == 1)["accuracy"]
    assert 0.0 <= acc["vlmcolor"] <= 1.0
    for _ in range(60):  # the job ends when every live replica acknowledged v1
        r = server.http.post("/v1/vlm", json=_question(1))
        if r.json()["adapter_version"] == 1:
            break
        time.sleep(0.5)
    assert r.status_code == 200 and r.json()["adapter_version"] == 1
    # its own lineage: the vqa one did not move
    assert server.http.get("/v1/adapters", params={"task": "vqa"}).json()["active"] == vqa_before
