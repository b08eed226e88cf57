"""The vqa task over HTTP: /v1/vqa, /v1/tasks, task=vqa ingestion (and its upload checks), per-task
lineages, feedback and metrics, on the session server (tiny film_scenes from ``_util.tiny_film``)."""

import base64
import json
import re
import threading

import numpy as np
import pytest
from _util import _png, vqa_archive

from training.data.scenes import ANSWERS, make_family


def _b64(chw: np.ndarray) -> str:
    return base64.b64encode(_png(chw)).decode()


@pytest.fixture(scope="module")
def scenes():
    return make_family("color", 8, seed=11)


def _ask(server, scenes, i: int = 0, **kw):
    body = {"image": _b64(scenes.images[i].numpy()), "question": scenes.questions[i], **kw}
    return server.http.post("/v1/vqa", json=body)


def _vqa_state(server) -> tuple:
    a = server.http.get("/v1/adapters", params={"task": "vqa"}).json()
    d = server.http.get("/v1/domains", params={"task": "vqa"}).json()
    return a["active"], len(a["versions"]), [x["name"] for x in d["domains"]]


def test_tasks_lists_both_lineages(server):
    tasks = {t["name"]: t for t in server.http.get("/v1/tasks").json()["tasks"]}
    assert {"classify", "vqa"} <= set(tasks)  # and vlm: test_task_seam.py
    assert tasks["vqa"]["labels"] == ANSWERS and tasks["vqa"]["model"] == "film_scenes"
    assert tasks["classify"]["labels"] == ["a", "b", "c"]
    paths = server.http.get("/openapi.json").json()["paths"]
    assert {"/v1/vqa", "/v1/tasks"} <= set(paths)
    assert "VqaRequest" in json.dumps(paths["/v1/vqa"]) or "image" in json.dumps(paths["/v1/vqa"])


def test_answers_single_and_batch(server, scenes):
    r = _ask(server, scenes, top_k=3)
    assert r.status_code == 200, r.text
    body = r.json()
    (a,) = body["answers"]
    assert a["answer"] in ANSWERS and len(a["top_k"]) == 3 and a["top_k"][0]["answer"] == a["answer"]
    assert a["top_k"][0]["score"] >= a["top_k"][1]["score"] >= a["top_k"][2]["score"]
    items = [{"image": _b64(scenes.images[i].numpy()), "question": scenes.questions[i]} for i in range(5)]
    r = server.http.post("/v1/vqa", json={"items": items})
    assert r.status_code == 200 and len(r.json()["answers"]) == 5
    # a question answered alone and inside a batch gets the same answer (batching changes nothing)
    assert r.json()["answers"][0]["answer"] == a["answer"]


@pytest.mark.parametrize(
    "body, code",
    [
        ({"question": "what colour?"}, "no-question"),
        ({"image": "not base64!", "question": "q"}, "bad-image"),
        ({"image": base64.b64encode(b"junk").decode(), "question": "q"}, "bad-image"),
        ({"image": "", "question": ""}, "invalid-request"),
        ({"items": []}, "invalid-request"),
        ({"image": "x", "question": "q", "top_k": 99}, "bad-top-k"),
        ({"image": "x", "question": "q", "extra": 1}, "invalid-request"),
    ],
)
def test_bad_questions_get_problems(server, body, code):
    r = server.http.post("/v1/vqa", json=body)
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json"), r.text
    assert r.json()["type"].endswith(code), r.json()


@pytest.mark.parametrize(
    "archive, code",
    [
        (lambda: vqa_archive(rows=[{"image": "images/0.png", "question": "q", "answer": "purple-ish"}]),
         "unknown-answer"),
        (lambda: vqa_archive(rows=[{"image": "images/999.png", "question": "q", "answer": "red"}]), "missing-image"),
        (lambda: vqa_archive(rows=[{"image": "../../etc/passwd", "question": "q", "answer": "red"}]),
         "path-traversal"),
        (lambda: vqa_archive(rows=[{"image": "images/0.png", "question": "", "answer": "red"}]), "bad-questions"),
        (lambda: vqa_archive(extra={"vqa/questions.jsonl": b"{not json"}), "bad-questions"),
        (lambda: vqa_archive(extra={"vqa/images/0.png": b"not a png"}), "bad-image"),
        (lambda: b"\x1f\x8b not an archive", "bad-archive"),
    ],
)
def test_bad_vqa_uploads_change_nothing(server, archive, code):
    before = _vqa_state(server)
    r = server.ingest("badvqa", archive(), task="vqa")
    assert 400 <= r.status_code < 500 and r.json()["type"].endswith(code), r.text
    assert _vqa_state(server) == before


def test_vqa_method_and_task_checks(server):
    r = server.ingest("vqaada", vqa_archive(), task="vqa", method="pam_nope")
    assert r.status_code == 422 and r.json()["type"].endswith("unknown-method"), r.text
    r = server.ingest("x", vqa_archive(), task="detect")
    assert r.status_code == 422, r.text
    r = server.http.get("/v1/domains", params={"task": "detect"})
    assert r.status_code == 422


def test_ingest_vqa_domain_while_answering(server, scenes):
    """The issue's end-to-end check: every answer 200 during ingest, versions non-decreasing, the new
    domain in the vqa lineage only, its accuracy in /metrics with task="vqa"."""
    before_cls = server.state()
    v0 = _vqa_state(server)[0]
    seen, errors, stop = [], [], threading.Event()

    def client() -> None:
        while not stop.is_set():
            r = _ask(server, scenes, len(seen) % len(scenes.questions))
            if r.status_code != 200:
                errors.append(r.text)
            else:
                seen.append(r.json()["adapter_version"])

    t = threading.Thread(target=client)
    t.start()
    try:
        r = server.ingest("vqacount", vqa_archive("count"), task="vqa")
        assert r.status_code == 202 and r.json()["task"] == "vqa", r.text
        job = server.wait(r.json()["job_id"], timeout=300)
    finally:
        stop.set()
        t.join()
    assert job["status"] == "succeeded" and job["task"] == "vqa", job["error"]
    assert not errors, errors[:3]
    assert seen and seen == sorted(seen) and seen[-1] == job["adapter_version"] > v0
    active, _, names = _vqa_state(server)
    assert active == job["adapter_version"] and "vqacount" in names
    assert server.state() == before_cls  # the classify lineage did not move
    m = server.http.get("/metrics").text
    assert re.search(r'^mergeserve_domain_accuracy\{domain="vqacount",source="holdout",task="vqa"\} ', m, re.M)
    assert re.search(rf'^mergeserve_adapter_version\{{task="vqa"\}} {active}(\.0)?$', m, re.M)

    # feedback on a served answer, found by request id in the vqa lineage
    r = _ask(server, scenes, 0, domain="vqacount")
    rid, answer = r.json()["request_id"], r.json()["answers"][0]["answer"]
    fb = server.http.post("/v1/feedback", json={"request_id": rid, "label": answer}, headers=server.auth)
    assert fb.status_code == 200 and fb.json()["task"] == "vqa" and fb.json()["correct"], fb.text
    bad = server.http.post("/v1/feedback", json={"request_id": rid, "label": "banana"}, headers=server.auth)
    assert bad.status_code == 422 and bad.json()["type"].endswith("unknown-label")

    # rollback in the vqa lineage only
    r = server.http.post(f"/v1/adapters/{v0}/activate", params={"task": "vqa"}, headers=server.auth)
    assert r.status_code == 200 and _vqa_state(server)[0] == v0 and server.state() == before_cls
    assert _ask(server, scenes).json()["adapter_version"] == v0


def test_zip_upload_and_idempotency(server):
    data = vqa_archive("shape", zipped=True)
    first = server.ingest("vqashape", data, task="vqa", method="average")
    again = server.http.post("/v1/domains", data={"name": "vqashape", "task": "vqa", "method": "average"},
                             files={"archive": ("d.zip", data, "application/zip")},
                             headers={**server.auth, "Idempotency-Key": "vqa-k"})
    assert first.status_code == 202, first.text
    # the same name while (or after) the first job runs: refused, whatever the key says
    assert again.status_code == 409 and again.json()["type"].rsplit("/", 1)[-1] in ("domain-busy", "domain-exists")
    assert server.wait(first.json()["job_id"], timeout=300)["status"] == "succeeded"
