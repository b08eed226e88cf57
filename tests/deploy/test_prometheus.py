"""deploy/ checked by Prometheus's own tools (no server needed): the config, the alerting rules and
their unit tests, every PromQL expression of the Grafana dashboard, and the Ray metrics port wiring.

The live check (a real Prometheus scraping a running server, every dashboard expression returning
data) is tests/serving/test_prometheus.py: it needs the session `server` fixture of tests/serving."""

import os
import re
import sys

import pytest
import yaml

sys.path.insert(0, os.path.dirname(__file__))

from _prom import ALERTS, ALERTS_TEST, DEPLOY, PROM_CONFIG, dashboard_queries, promtool, substitute  # noqa: E402


def _ok(res) -> None:
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_check_config_and_rules():
    res = promtool("check", "config", str(PROM_CONFIG))
    _ok(res)
    assert "1 rule files found" in res.stdout  # rule_files resolves to alerts.yml next to the config
    res = promtool("check", "rules", str(ALERTS))
    _ok(res)


def test_promtool_rule_unit_tests():
    res = promtool("test", "rules", str(ALERTS_TEST))
    _ok(res)
    assert "SUCCESS" in res.stdout


def _alerts() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"] if "alert" in r]


def test_every_alert_is_complete_and_unit_tested_both_ways():
    cases: dict[str, list[bool]] = {}
    for t in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for c in t.get("alert_rule_test", []):
            cases.setdefault(c["alertname"], []).append(bool(c.get("exp_alerts")))
    alerts = _alerts()
    assert len(alerts) >= 8
    for r in alerts:
        name = r["alert"]
        assert r.get("for"), f"{name}: no for:"
        assert r.get("labels", {}).get("severity") in ("info", "warning", "critical"), name
        assert {"summary", "description"} <= set(r.get("annotations", {})), name
        assert True in cases.get(name, []), f"{name}: no unit test where it fires"
        assert False in cases.get(name, []), f"{name}: no unit test where it stays quiet"


def test_every_alert_links_its_own_runbook_section():
    """Each rule's runbook_url names a section of docs/runbooks.md that is about that alert."""
    runbooks = (DEPLOY.parent / "docs" / "runbooks.md").read_text()
    headings = {h.strip(): h.strip().lower() for h in re.findall(r"^## (.+)$", runbooks, re.M)}
    alerts = _alerts()
    for r in alerts:
        url = r["annotations"].get("runbook_url", "")
        assert url == f"docs/runbooks.md#{r['alert'].lower()}", (r["alert"], url)
        assert headings.get(r["alert"]) == url.split("#")[1], f"docs/runbooks.md has no section ## {r['alert']}"
    assert set(headings) == {r["alert"] for r in alerts}  # and no section for an alert that is gone


def test_dashboard_marks_swaps_with_an_annotation():
    queries = dict(dashboard_queries())
    assert "mergeserve_adapter_version" in queries["annotation / Adapter swaps"]
    assert "mergeserve_canary_traffic" in queries["annotation / Canary starts"]


def test_dashboard_expressions_are_valid_promql(tmp_path):
    """promtool parses every dashboard expression (as a recording rule), variables substituted."""
    queries = dashboard_queries()
    assert len(queries) >= 10
    rules = [
        {"record": f"dashboard:q{i}", "expr": substitute(expr, {"domain": ".*", "task": ".*"})}
        for i, (_, expr) in enumerate(queries)
    ]
    f = tmp_path / "dashboard_rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = promtool("check", "rules", str(f))
    _ok(res)
    assert f"SUCCESS: {len(rules)} rules found" in res.stdout


def test_ray_metrics_port_is_set_where_prometheus_scrapes_it():
    """Ray reads no RAY_METRICS_EXPORT_PORT variable: the agent's port comes from
    `ray start --metrics-export-port` (or ray.init(_metrics_export_port=...)), random otherwise."""
    prom = yaml.safe_load(PROM_CONFIG.read_text())
    ray_job = next(j for j in prom["scrape_configs"] if j["job_name"] == "ray")
    port = ray_job["static_configs"][0]["targets"][0].rsplit(":", 1)[1]
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    app = compose["services"]["mergeserve"]
    command = " ".join(app["command"]) if isinstance(app["command"], list) else app["command"]
    assert f"--metrics-export-port={port}" in command
    assert "RAY_METRICS_EXPORT_PORT" not in str(app.get("environment", {}))
    assert re.search(r"mergeserve serve .*--address auto", command)
    assert f"{port}:{port}" in str(app.get("ports")) or port in str(app.get("expose", ""))
    assert "./alerts.yml:/etc/prometheus/alerts.yml:ro" in compose["services"]["prometheus"]["volumes"]
    docs = list(yaml.safe_load_all((DEPLOY / "rayservice.yaml").read_text()))
    cluster = docs[0]["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    assert all(g["rayStartParams"].get("metrics-export-port") == port for g in groups)


def test_direct_ingress_port_is_published_where_it_is_turned_on():
    """`--address` servers get direct ingress from the cluster's environment, not from `--direct-port`: the
    compose stack sets it for `ray start` and publishes the first port; the image publishes the CLI's."""
    app = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]["mergeserve"]
    env = app["environment"]
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"  # as ray_env
    first, last = int(env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"]), int(env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"])
    assert first < last and f"{first}:{first}" in app["ports"]
    docker = (DEPLOY.parent / "Dockerfile").read_text()
    port = re.search(r'"--direct-port", "(\d+)"', docker).group(1)
    assert re.search(rf"^EXPOSE .*\b{port}\b", docker, re.M)


@pytest.mark.parametrize("key", ["RAY_SERVE_USE_GRPC_BY_DEFAULT", "RAY_SERVE_ENABLE_HA_PROXY"])
def test_every_cluster_the_project_starts_gets_the_same_serve_settings(monkeypatch, key):
    """The Serve settings `mergeserve serve` gives an in-process Ray (serving/app.py ray_env) also reach the
    clusters it ships: the compose stack's `ray start` and every RayService pod (the ingress runs on each):
    handles over gRPC, and Serve's HAProxy on the HTTP port."""
    from serving.app import ray_env

    # a private copy of the environment: ray_env's direct-ingress settings must not reach later tests' Ray
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")})
    ray_env(8001)  # the CLI's default --direct-port
    want = os.environ[key]
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert compose["services"]["mergeserve"]["environment"][key] == want
    svc = next(d for d in yaml.safe_load_all((DEPLOY / "rayservice.yaml").read_text()) if d["kind"] == "RayService")
    cluster = svc["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for pod in pods:
        (c,) = pod["template"]["spec"]["containers"]
        assert {e["name"]: e.get("value") for e in c.get("env", [])}.get(key) == want
