"""deploy/ files that run (issue 27), checked by reading them: SQLite on the head's own volume, the API
token from a Secret (Kubernetes) and an env file (compose), an image with what KubeRay's probes call and
pinned versions, a PodMonitor that selects ports the pods have, and Alertmanager wired into the stack."""

import re
import subprocess
from pathlib import Path

import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _docs(name: str) -> list[dict]:
    return list(yaml.safe_load_all((DEPLOY / name).read_text()))


def _rayservice() -> tuple[dict, dict]:
    docs = _docs("rayservice.yaml")
    svc = next(d for d in docs if d["kind"] == "RayService")
    pvcs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    return svc, pvcs


def _groups(svc: dict) -> dict[str, dict]:
    cluster = svc["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}


def _mounts(group: dict) -> dict[str, str]:
    """mount path -> claim name, for the group's (only) container."""
    spec = group["template"]["spec"]
    (c,) = spec["containers"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec.get("volumes", [])}
    return {m["mountPath"]: claims[m["name"]] for m in c.get("volumeMounts", [])}


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_sqlite_lives_on_the_heads_own_volume_not_the_shared_one():
    svc, pvcs = _rayservice()
    args = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["args"]
    groups = _groups(svc)
    head = _mounts(groups["head"])
    state_mount = next(p for p in head if args["state_path"].startswith(p.rstrip("/") + "/"))
    data_mount = next(p for p in head if args["data_dir"].startswith(p.rstrip("/") + "/"))
    state_claim, data_claim = head[state_mount], head[data_mount]
    assert state_claim != data_claim
    assert pvcs[state_claim]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvcs[data_claim]["spec"]["accessModes"] == ["ReadWriteMany"]
    for name, group in groups.items():  # the data volume everywhere; SQLite's on the head only
        if name != "head":
            assert data_claim in _mounts(group).values() and state_claim not in _mounts(group).values()


def test_the_token_comes_from_a_secret_and_from_an_env_file():
    svc, _ = _rayservice()
    for name, group in _groups(svc).items():
        (c,) = group["template"]["spec"]["containers"]
        env = {e["name"]: e for e in c["env"]}
        ref = env["MERGESERVE_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "mergeserve-token", "key": "token"} and "value" not in env["MERGESERVE_TOKEN"], name
    app = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]["mergeserve"]
    assert app["env_file"] == ["./mergeserve.env"]  # required (compose's default): no file, no start
    assert "MERGESERVE_TOKEN" not in str(app.get("environment"))
    example = (DEPLOY / "mergeserve.env.example").read_text()
    assert re.search(r"^MERGESERVE_TOKEN=\S+$", example, re.M)
    ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/mergeserve.env"], cwd=ROOT)
    assert ignored.returncode == 0  # a real token file is never committed


def test_the_image_has_wget_and_installs_the_pinned_versions():
    docker = (ROOT / "Dockerfile").read_text()
    assert re.search(r"apt-get install .*\bwget\b", docker)  # KubeRay's probes: wget ... | grep success
    assert re.search(r"^RUN pip install -c deploy/constraints\.txt \.$", docker, re.M)
    assert "COPY deploy ./deploy" in docker.split("RUN pip install -c")[0]
    svc, _ = _rayservice()
    assert _constraints()["ray"] == svc["spec"]["rayClusterConfig"]["rayVersion"]
    make = (ROOT / "Makefile").read_text()
    assert make.count("pip install -c $(CONSTRAINTS)") == 2  # the venvs the tests run are the same versions


def test_every_runtime_dependency_is_pinned_within_its_range():
    pins = _constraints()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in map(Requirement, deps):
        name = canonicalize_name(dep.name)
        assert name in pins, f"{dep.name} is not pinned in deploy/constraints.txt (make constraints)"
        assert dep.specifier.contains(pins[name], prereleases=True), (str(dep), pins[name])
        for extra in dep.extras:  # ray[serve]'s own dependencies are pinned too
            assert extra != "serve" or {"fastapi", "uvicorn", "starlette"} <= set(pins)


def test_the_podmonitors_select_ports_and_labels_the_pods_have():
    svc, _ = _rayservice()
    groups = _groups(svc)
    monitors = {d["metadata"]["name"]: d for d in _docs("podmonitor.yaml")}
    prom_jobs = {j["job_name"] for j in yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]}
    jobs = {}
    for name, m in monitors.items():
        assert m["apiVersion"] == "monitoring.coreos.com/v1" and m["kind"] == "PodMonitor"
        want = m["spec"]["selector"]["matchLabels"]
        (ep,) = m["spec"]["podMetricsEndpoints"]
        (relabel,) = ep["relabelings"]
        jobs[relabel["replacement"]] = name
        kuberay = {"ray.io/is-ray-node": "yes"}  # labels KubeRay adds to every Ray pod, and node-type
        selected = []
        for gname, g in groups.items():
            labels = {**g["template"]["metadata"]["labels"], **kuberay,
                      "ray.io/node-type": "head" if gname == "head" else "worker"}
            if all(labels.get(k) == v for k, v in want.items()):
                selected.append(gname)
                (c,) = g["template"]["spec"]["containers"]
                assert ep["port"] in {p["name"] for p in c["ports"]}, (name, gname, ep["port"])
        assert selected, name
        if relabel["replacement"] == "mergeserve":
            assert selected == ["head"]  # the app's registry once, not once per pod
        else:
            assert sorted(selected) == sorted(groups)  # Ray's agent on every node
    assert set(jobs) == prom_jobs == {"mergeserve", "ray"}


def test_alertmanager_is_in_the_stack_and_pages_the_webhook_service():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (target,) = prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in compose and f"{port}:{port}" in compose[host]["ports"]
    assert "./alertmanager.yml:/etc/alertmanager/alertmanager.yml:ro" in compose[host]["volumes"]
    am = yaml.safe_load((DEPLOY / "alertmanager.yml").read_text())
    urls = [w["url"] for r in am["receivers"] for w in r.get("webhook_configs", [])]
    (url,) = urls
    hook_host, hook_port = re.match(r"http://([\w-]+):(\d+)/", url).groups()
    hook = compose[hook_host]
    assert hook_port in hook["expose"] and "alert_webhook.py" in " ".join(hook["command"])
    assert hook["command"][hook["command"].index("--port") + 1] == hook_port
