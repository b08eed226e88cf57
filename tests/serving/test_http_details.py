"""What HTTP clients and operators expect of the API (issue 27), against the test server: a Bearer
challenge on 401, the token scheme in OpenAPI, problem types that resolve on the server itself, cursor
pages of adapters and domains, job progress as Server-Sent Events, and feedback counted once."""

import base64
import json
import re
import time
from urllib.parse import urljoin

import httpx
from _util import TOKEN, make_archive, png

from mergeserve.cli import main
from mergeserve.client import Client, parse_events

B64 = base64.b64encode(png(2, 3)).decode()


def _events(server, job_id: str) -> list[tuple[str, dict]]:
    with server.http.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.read()
        return list(parse_events(r.iter_lines()))


def test_401_carries_a_bearer_challenge(server):
    files = {"archive": ("a.tgz", b"x")}
    none = server.http.post("/v1/domains", data={"name": "x"}, files=files)
    wrong = server.http.post("/v1/adapters/0/activate", headers={"Authorization": "Bearer nope"})
    assert none.status_code == wrong.status_code == 401
    assert none.headers["www-authenticate"] == 'Bearer realm="mergeserve"'
    assert wrong.headers["www-authenticate"] == 'Bearer realm="mergeserve", error="invalid_token"'
    assert wrong.json()["type"] == "/problems/unauthorized"


def test_openapi_declares_the_bearer_scheme_on_the_mutating_routes(server):
    spec = server.http.get("/openapi.json").json()
    scheme = spec["components"]["securitySchemes"]["bearer"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer" and "MERGESERVE_TOKEN" in scheme["description"]
    secured = {(m.upper(), p) for p, ops in spec["paths"].items() for m, op in ops.items() if op.get("security")}
    assert {("POST", "/v1/domains"), ("POST", "/v1/adapters/{version}/activate"), ("POST", "/v1/feedback")} <= secured
    assert not {(m, p) for m, p in secured if m == "GET"}  # reads stay open


def test_a_problem_type_resolves_to_its_documentation_on_the_server(server):
    r = server.http.get("/v1/jobs/nope")
    body = r.json()
    assert body["type"] == "/problems/unknown-job" and body["title"] == "Unknown job"
    doc = server.http.get(urljoin(str(r.url), body["type"]))  # a relative reference, resolved as RFC 3986 says
    assert doc.status_code == 200 and doc.headers["content-type"].startswith("text/html")
    assert "<code>unknown-job</code>" in doc.text
    as_json = server.http.get(body["type"], headers={"Accept": "application/json"}).json()
    assert as_json["title"] == "Unknown job" and as_json["description"]
    index = server.http.get("/problems").text
    assert index.count('<a href="/problems/') > 40
    missing = server.http.get("/problems/no-such-code")
    assert missing.status_code == 404 and missing.json()["type"] == "/problems/not-found"


def test_job_events_stream_progress_until_the_job_ends_and_the_cli_follows_them(server, tmp_path, monkeypatch):
    # enough steps that training outlasts several of the stream's 0.25 s polls on a fast, idle machine (60
    # steps could finish between two polls: the steps then arrive only inside status events)
    acc = server.ingest("sse-a", make_archive(shift=1), hyper=json.dumps({"steps": 400}))
    assert acc.status_code == 202, acc.text
    events = _events(server, acc.json()["job_id"])
    statuses = [d["status"] for k, d in events if k == "status"]
    steps = [d["progress"]["step"] for k, d in events if k == "progress"]
    assert statuses[-1] == "succeeded" and "training" in statuses and events[-1][0] == "status", events
    assert steps and steps == sorted(steps) and events[-1][1]["progress"]["step"] == 400, events
    assert [k for k, _ in events if k not in ("status", "progress")] == []
    done = _events(server, acc.json()["job_id"])  # an ended job: one event, then the stream closes
    assert [(k, d["status"]) for k, d in done] == [("status", "succeeded")]
    gone = server.http.get("/v1/jobs/nope/events")
    assert gone.status_code == 404 and gone.json()["type"] == "/problems/unknown-job"

    polls = []
    real = Client.job
    monkeypatch.setattr(Client, "job", lambda self, job_id: polls.append(job_id) or real(self, job_id))
    folder = tmp_path / "sse-b"
    for c in ("a", "b", "c"):
        (folder / c).mkdir(parents=True)
        for i in range(6):
            (folder / c / f"{i}.png").write_bytes(png("abc".index(c), 10 * i + 1))
    assert main(["ingest", str(folder), "--name", "sse-b", "--server", server.url, "--token", TOKEN]) == 0
    assert polls == []  # followed through the event stream only


def test_adapters_and_domains_come_in_cursor_pages(server):
    everything = server.http.get("/v1/adapters").json()
    domains = server.http.get("/v1/domains").json()
    assert everything["next_cursor"] is None and domains["next_cursor"] is None
    first = server.http.get("/v1/adapters", params={"limit": 1}).json()
    assert {k: first[k] for k in ("active", "canary", "canary_history")} == {  # a page keeps the rest of the view
        k: everything[k] for k in ("active", "canary", "canary_history")}
    assert len(everything["versions"]) >= 3 and len(domains["domains"]) >= 2
    for path, key, ident in (("/v1/adapters", "versions", "version"), ("/v1/domains", "domains", "name")):
        seen, cursor, pages = [], None, 0
        while True:
            page = server.http.get(path, params={"limit": 1, **({"cursor": cursor} if cursor else {})}).json()
            seen += [x[ident] for x in page[key]]
            pages += 1
            if not (cursor := page["next_cursor"]):
                break
        full = everything["versions"] if key == "versions" else domains["domains"]
        assert seen == [x[ident] for x in full] and pages == len(full), (path, seen)
    assert [v["version"] for v in everything["versions"]] == sorted(v["version"] for v in everything["versions"])
    jobs_cursor = server.http.get("/v1/jobs", params={"limit": 1}).json()["next_cursor"]
    for path, cursor in (("/v1/adapters", "bogus"), ("/v1/adapters", jobs_cursor), ("/v1/domains", "bogus")):
        r = server.http.get(path, params={"cursor": cursor})
        assert r.status_code == 422 and r.json()["type"] == "/problems/bad-cursor", (path, r.text)


def _feedback_count(server, **labels) -> float:
    text = server.http.get("/metrics").text
    lab = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    m = re.search(rf"^mergeserve_feedback_total{{{lab}}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_feedback_is_counted_once_per_request_with_the_version_that_answered(server):
    r = server.http.post("/v1/classify", json={"image": B64, "domain": "sse-a"}, headers={"X-Request-ID": "fb-once"})
    assert r.status_code == 200
    body = r.json()
    version, label = body["adapter_version"], body["predictions"][0]["label"]
    labels = {"task": "classify", "domain": "sse-a", "version": version, "correct": "true"}
    before = _feedback_count(server, **labels)
    answers = []
    for _ in range(3):  # a client retrying after a lost answer
        fb = server.http.post("/v1/feedback", json={"request_id": "fb-once", "label": label}, headers=server.auth)
        assert fb.status_code == 200, fb.text
        answers.append(fb.json())
    assert [a["replayed"] for a in answers] == [False, True, True] and {a["version"] for a in answers} == {version}
    assert answers[0]["n"] == answers[2]["n"]
    deadline = time.time() + 5
    while _feedback_count(server, **labels) != before + 1 and time.time() < deadline:
        time.sleep(0.2)
    assert _feedback_count(server, **labels) == before + 1
    other = next(c for c in ("a", "b", "c") if c != label)
    clash = server.http.post("/v1/feedback", json={"request_id": "fb-once", "label": other}, headers=server.auth)
    assert clash.status_code == 409 and clash.json()["type"] == "/problems/feedback-conflict"


def test_job_events_pass_through_the_replicas_own_port(server):
    """Direct ingress: the stream also flows from the replica's port, not only through the main port."""
    from serving.app import direct_ports

    (port,) = direct_ports()
    job_id = server.http.get("/v1/jobs", params={"limit": 1}).json()["jobs"][0]["id"]
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as direct:
        with direct.stream("GET", f"/v1/jobs/{job_id}/events") as r:
            assert r.status_code == 200
            assert [k for k, _ in parse_events(r.iter_lines())] == ["status"]
