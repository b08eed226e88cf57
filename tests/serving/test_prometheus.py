"""A real Prometheus (Debian's `prometheus`, installed by `make test`) scrapes the running test server
(the app's /metrics and Ray's metrics agent) every second with deploy/alerts.yml loaded; then every
PromQL expression of deploy/grafana/dashboards/mergeserve.json must return at least one series.

Lives in tests/serving for the session `server` fixture; the offline promtool checks are in
tests/deploy/test_prometheus.py, which also holds the helpers used here (tests/deploy/_prom.py)."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))

from _prom import Prometheus, dashboard_queries, substitute, template_queries  # noqa: E402
from _util import make_archive, png  # noqa: E402

DOMAIN = "promdom"


def _ray_metrics_target() -> str:
    """Ray's metrics agent of the node this driver runs on: a random port unless Ray was started with
    --metrics-export-port, read back from the node table."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    assert node.get("MetricsExportPort"), node
    return f"127.0.0.1:{node['MetricsExportPort']}"


def test_dashboard_queries_return_data_from_a_real_prometheus(server):
    import base64

    t0 = time.time()
    host = server.url.split("://", 1)[1]
    with Prometheus({"mergeserve": host, "ray": _ray_metrics_target()}) as prom:
        # data for every panel: two ingested domains (jobs, training, swaps and their annotation, accuracy,
        # the second version's fall against its parent on the first domain), classify and VQA traffic
        # (latency, request counts, Serve's request counter) and feedback (live accuracy, its counter)
        while not prom.query('up{job="mergeserve"} == 1') and time.time() - t0 < 30:
            time.sleep(0.2)  # a version scraped before the swaps, so that the swap annotation sees them
        for name, shift in ((DOMAIN, 2), (f"{DOMAIN}1", 1)):
            job = server.ingest(name, make_archive(shift=shift))
            assert job.status_code == 202, job.text
            done = server.wait(job.json()["job_id"])
            assert done["status"] == "succeeded", (done["status"], done.get("error"))
        img = base64.b64encode(png(1, 7)).decode()
        ask = server.http.post("/v1/vqa", json={"image": img, "question": "what color is the shape?"})
        assert ask.status_code == 200, ask.text
        for i in range(12):
            r = server.http.post(
                "/v1/classify", json={"image": img, "domain": DOMAIN}, headers={"X-Request-ID": f"prom-{i}"}
            )
            assert r.status_code == 200, r.text
        fb = server.http.post("/v1/feedback", json={"request_id": "prom-0", "label": "b"}, headers=server.auth)
        assert fb.status_code == 200, fb.text
        a = server.http.get("/v1/adapters").json()  # a canary of the previous version, for its annotation
        previous = max(v["version"] for v in a["versions"] if v["version"] != a["active"])
        r = server.http.post(f"/v1/adapters/{previous}/activate", json={"traffic": 0.1}, headers=server.auth)
        assert r.status_code == 200, r.text

        variables = {"task": "classify", "domain": DOMAIN}
        queries = [(name, substitute(expr, variables)) for name, expr in dashboard_queries()]
        assert len(queries) >= 10
        empty = dict(queries)
        deadline = time.time() + 45  # Ray's agent exports what the workers report every few seconds
        while empty and time.time() < deadline:
            empty = {name: q for name, q in empty.items() if not prom.query(q)}
            if empty:
                time.sleep(1)
        server.http.delete("/v1/canary", headers=server.auth).raise_for_status()
        assert not empty, f"dashboard queries with no series after {time.time() - t0:.0f} s: {empty}"

        for var, selector, label in template_queries():
            values = prom.get(f"/api/v1/label/{label}/values", **{"match[]": substitute(selector, variables)})
            assert variables[var] in values, (var, values)

        up = {s["metric"]["job"]: s["value"][1] for s in prom.query("up")}
        assert up == {"mergeserve": "1", "ray": "1"}, up
        groups = prom.get("/api/v1/rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) >= 8 and all(r["health"] == "ok" for r in rules), [
            (r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"
        ]
        firing = [a for a in prom.get("/api/v1/alerts")["alerts"] if a["state"] == "firing"]
        assert not firing, firing  # every alert has a for: longer than this test
    print(f"prometheus check: {len(queries)} dashboard queries answered in {time.time() - t0:.1f} s", file=sys.stderr)
