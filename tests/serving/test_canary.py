"""Canary activation (issue 27): routing, the live split on the test server, pinning, stop and promote."""

import base64
import collections
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
    assert server.http.delete("/v1/canary", headers=server.auth).status_code == 200
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
