"""Canary activation (issue 27): routing, the live split on the test server, pinning, stop and promote, and a
learning job's version superseding it."""

import base64
import collections
import time
import uuid

from _util import make_archive, png

from serving.canary import route, verdict

B64 = base64.b64encode(png(0, 1)).decode()


def test_routing_is_sticky_and_splits_by_the_share():
    keys = [uuid.uuid4().hex for _ in range(20_000)]
    share = sum(route(k, 0.1) for k in keys) / len(keys)
    assert abs(share - 0.1) < 0.01 and all(route(k, 0.1) == route(k, 0.1) for k in keys[:100])
    assert not any(route(k, 0.0) for k in keys[:1000]) and all(route(k, 1.0) for k in keys[:1000])
    assert {k for k in keys if route(k, 0.1)} <= {k for k in keys if route(k, 0.3)}  # growing it keeps clients


def test_the_verdict_waits_for_evidence_then_promotes_or_rolls_back():
    ok = {"d1": (90, 100), "d2": (45, 50)}
    assert verdict(ok, {"d1": (9, 10)}, min_feedback=20, max_drop=0.05)[0] is None  # too few answers yet
    assert verdict(ok, {"d1": (18, 20), "d2": (18, 20)}, 20, 0.05)[0] == "promoted"
    decision, numbers = verdict(ok, {"d1": (18, 20), "d2": (12, 20)}, 20, 0.05)  # d2: 0.90 → 0.60
    assert decision == "rolled-back" and abs(numbers["d2"]["drop"] - 0.3) < 1e-9
    assert verdict(ok, {"d3": (20, 20)}, 20, 0.05)[0] is None  # no active answers on d3 to compare with


def _two_versions(server) -> tuple[int, int]:
    """(active, another learned version), learning domains as needed."""
    a = server.http.get("/v1/adapters").json()
    while len([v for v in a["versions"] if v["domains"]]) < 2:
        server.wait(server.ingest(f"canary-{len(a['versions'])}", make_archive(shift=len(a["versions"]))).json()
                    ["job_id"])
        a = server.http.get("/v1/adapters").json()
    other = next(v["version"] for v in reversed(a["versions"]) if v["domains"] and v["version"] != a["active"])
    return a["active"], other


def _ask(server, client: str | None = None, **body) -> dict:
    headers = {"X-Client-ID": client} if client else {}
    return server.http.post("/v1/classify", json={"image": B64, **body}, headers=headers).json()


def test_a_canary_answers_its_share_sticky_per_client_and_can_be_stopped(server):
    active, candidate = _two_versions(server)
    r = server.http.post(f"/v1/adapters/{candidate}/activate", json={"traffic": 0.1}, headers=server.auth)
    assert r.status_code == 200 and r.json()["canary"]["version"] == candidate and r.json()["active"] == active
    seen = collections.Counter(_ask(server, uuid.uuid4().hex)["adapter_version"] for _ in range(1000))
    assert set(seen) == {active, candidate} and 60 <= seen[candidate] <= 140, seen  # 10 % of 1,000 ± 4 σ
    assert len({_ask(server, "client-7")["adapter_version"] for _ in range(20)}) == 1  # sticky
    assert _ask(server, "client-7", adapter_version=candidate)["adapter_version"] == candidate  # pinned
    r = server.http.post("/v1/classify", json={"image": B64, "adapter_version": 99999})
    assert r.status_code == 409 and r.json()["type"].endswith("/version-not-loaded")
    assert server.http.get("/v1/adapters").json()["canary"]["traffic"] == 0.1
    gauge = f'mergeserve_canary_traffic{{task="classify",version="{candidate}"}} 0.1'
    assert gauge in server.http.get("/metrics").text  # the dashboard's "Canary starts" annotation reads it
    assert server.http.delete("/v1/canary", headers=server.auth).status_code == 200
    assert "mergeserve_canary_traffic{" not in server.http.get("/metrics").text
    assert {_ask(server, uuid.uuid4().hex)["adapter_version"] for _ in range(50)} == {active}
    a = server.http.get("/v1/adapters").json()
    assert a["canary"] is None and a["canary_history"][-1]["outcome"] == "stopped"
    assert server.http.delete("/v1/canary", headers=server.auth).status_code == 404


def test_activating_the_canary_fully_promotes_it(server):
    active, candidate = _two_versions(server)
    server.http.post(f"/v1/adapters/{candidate}/activate", json={"traffic": 0.5}, headers=server.auth)
    r = server.http.post(f"/v1/adapters/{candidate}/activate", headers=server.auth)  # no body: 100 %
    assert r.status_code == 200 and r.json()["active"] == candidate and r.json()["canary"] is None
    assert {_ask(server, uuid.uuid4().hex)["adapter_version"] for _ in range(30)} == {candidate}
    assert server.http.get("/v1/adapters").json()["canary_history"][-1]["outcome"] == "promoted"
    r = server.http.post(f"/v1/adapters/{candidate}/activate", json={"traffic": 0.2}, headers=server.auth)
    assert r.status_code == 409 and r.json()["type"].endswith("/already-active")
    bad = server.http.post(f"/v1/adapters/{active}/activate", json={"traffic": 1.5}, headers=server.auth)
    assert bad.status_code == 422
    server.http.post(f"/v1/adapters/{active}/activate", headers=server.auth).raise_for_status()


def _judge(server, active: int, candidate: int, candidate_right: bool) -> dict:
    """Run a canary with ``promote_when`` and give feedback on its answers (the active version's all right, the
    candidate's right or wrong) until it decides; returns ``/v1/adapters`` once it has."""
    domain = next(v for v in server.http.get("/v1/adapters").json()["versions"] if v["version"] == candidate)[
        "domains"][0]
    rule = {"traffic": 0.5, "promote_when": {"min_feedback": 5, "max_drop": 0.2}}
    server.http.post(f"/v1/adapters/{candidate}/activate", json=rule, headers=server.auth).raise_for_status()
    labels = server.http.get("/v1/tasks").json()["tasks"][0]["labels"]
    given = collections.Counter()
    while min(given[active], given[candidate]) < 5:
        r = _ask(server, uuid.uuid4().hex, domain=domain)
        v, said = r["adapter_version"], r["predictions"][0]["label"]
        if given[v] >= 5:
            continue
        right = v == active or candidate_right
        label = said if right else next(x for x in labels if x != said)
        server.http.post("/v1/feedback", json={"request_id": r["request_id"], "label": label},
                         headers=server.auth).raise_for_status()
        given[v] += 1
    for _ in range(100):  # the swap runs in the background
        a = server.http.get("/v1/adapters").json()
        if a["canary"] is None and {_ask(server, uuid.uuid4().hex)["adapter_version"] for _ in range(10)} == {
                a["active"]}:
            return {**a, "domain": domain}
        time.sleep(0.1)
    raise AssertionError(f"the canary was not decided: {a['canary']}")


def test_a_canary_is_promoted_by_live_feedback(server):
    active, candidate = _two_versions(server)
    a = _judge(server, active, candidate, candidate_right=True)
    done = a["canary_history"][-1]
    assert a["active"] == candidate and done["outcome"] == "promoted" and done["version"] == candidate
    assert done["numbers"][a["domain"]] == {"candidate": 1.0, "active": 1.0, "n": 5, "n_active": 5, "drop": 0.0}
    server.http.post(f"/v1/adapters/{active}/activate", headers=server.auth).raise_for_status()


def test_a_canary_that_answers_worse_is_rolled_back(server):
    active, candidate = _two_versions(server)
    a = _judge(server, active, candidate, candidate_right=False)
    done = a["canary_history"][-1]
    assert a["active"] == active and done["outcome"] == "rolled-back" and done["version"] == candidate
    assert done["numbers"][a["domain"]]["drop"] == 1.0 and done["numbers"][a["domain"]]["n"] == 5


def test_a_refused_canary_leaves_the_running_one_as_it_was(server):
    active, candidate = _two_versions(server)
    rule = {"traffic": 0.2}
    server.http.post(f"/v1/adapters/{candidate}/activate", json=rule, headers=server.auth).raise_for_status()
    r = server.http.post(f"/v1/adapters/{active}/activate", json={"traffic": 0.3}, headers=server.auth)
    assert r.status_code == 409 and r.json()["type"].endswith("/already-active")
    a = server.http.get("/v1/adapters").json()
    assert a["canary"]["version"] == candidate and a["canary"]["traffic"] == 0.2
    assert not a["canary_history"] or a["canary_history"][-1]["outcome"] != "replaced"
    assert {_ask(server, uuid.uuid4().hex)["adapter_version"] for _ in range(60)} == {active, candidate}
    server.http.delete("/v1/canary", headers=server.auth).raise_for_status()


def test_a_learning_job_supersedes_the_running_canary(server):
    """The candidate was judged against the version a job replaces; left running, a later promotion would drop the
    domain the job just learned: the job's activation ends it (``superseded``) and every request goes to the new
    version."""
    active, candidate = _two_versions(server)
    rule = {"traffic": 0.5, "promote_when": {"min_feedback": 1000, "max_drop": 0.2}}
    server.http.post(f"/v1/adapters/{candidate}/activate", json=rule, headers=server.auth).raise_for_status()
    n = len(server.http.get("/v1/adapters").json()["versions"])
    job = server.wait(server.ingest(f"canary-new-{n}", make_archive(shift=n)).json()["job_id"])
    a = server.http.get("/v1/adapters").json()
    assert job["status"] == "succeeded" and a["active"] == job["adapter_version"] != active
    done = a["canary_history"][-1]
    assert a["canary"] is None and done["outcome"] == "superseded" and done["version"] == candidate
    assert done["superseded_by"] == a["active"] and done["against"] == active
    assert {_ask(server, uuid.uuid4().hex)["adapter_version"] for _ in range(30)} == {a["active"]}
    server.http.post(f"/v1/adapters/{active}/activate", headers=server.auth).raise_for_status()
