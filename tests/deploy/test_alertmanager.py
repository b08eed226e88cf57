"""Alerts page someone: a real Prometheus (Debian's `prometheus`) evaluates deploy/alerts.yml against a
mergeserve target that is down, sends the firing alert to a real Alertmanager (Debian's
`prometheus-alertmanager`, both installed by `make test`) routed by deploy/alertmanager.yml, and the
webhook receiver of the compose stack (deploy/alert_webhook.py) is called with it. All on loopback,
free ports, temporary storage; about 5 s."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, os.path.dirname(__file__))

from _prom import ALERTS, DEPLOY, Prometheus, tool  # noqa: E402

from serving.ports import free_port  # noqa: E402

ALERTMANAGER = DEPLOY / "alertmanager.yml"
WEBHOOK = DEPLOY / "alert_webhook.py"


def _wait_ready(url: str, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"{what} exited with {proc.returncode}"
        try:
            if httpx.get(url, timeout=1, trust_env=False).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{what} not ready in {timeout} s")


def _stop(*procs: subprocess.Popen | None) -> None:
    for p in procs:
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _alertmanager_config(hook: str) -> dict:
    """deploy/alertmanager.yml with the webhook on loopback and groups sent at once (not after 30 s)."""
    cfg = yaml.safe_load(ALERTMANAGER.read_text())
    for r in cfg["receivers"]:
        for w in r.get("webhook_configs", []):
            w["url"] = hook
    cfg["route"].update(group_wait="0s", group_interval="1s")
    return cfg


def _rules_firing_at_once(name: str) -> dict:
    """deploy/alerts.yml with ``for: 0s`` on rule ``name`` (its expression, labels and annotations as shipped)."""
    rules = yaml.safe_load(ALERTS.read_text())
    rule = next(r for g in rules["groups"] for r in g["rules"] if r.get("alert") == name)
    rule["for"] = "0s"
    return rules


def test_amtool_accepts_the_shipped_config():
    res = subprocess.run([tool("amtool"), "check-config", str(ALERTMANAGER)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and "SUCCESS" in res.stdout, res.stdout + res.stderr


def test_a_firing_rule_reaches_the_webhook_through_a_real_alertmanager():
    tmp = Path(tempfile.mkdtemp(prefix="mergeserve-am-"))
    hook_port, am_port, dead_port = free_port(), free_port(), free_port()
    out = tmp / "notifications.jsonl"
    hook = am = None
    try:
        hook = subprocess.Popen([sys.executable, str(WEBHOOK), "--host", "127.0.0.1", "--port", str(hook_port),
                                 "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        (tmp / "alertmanager.yml").write_text(yaml.safe_dump(_alertmanager_config(f"http://127.0.0.1:{hook_port}/")))
        am = subprocess.Popen(
            [tool("prometheus-alertmanager", "alertmanager"), f"--config.file={tmp / 'alertmanager.yml'}",
             f"--storage.path={tmp / 'am'}", f"--web.listen-address=127.0.0.1:{am_port}",
             "--cluster.listen-address=", "--log.level=warn"],  # no gossip port on every interface
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        _wait_ready(f"http://127.0.0.1:{am_port}/-/ready", am, "alertmanager")
        _wait_ready(f"http://127.0.0.1:{hook_port}/", hook, "the webhook receiver")
        (tmp / "alerts.yml").write_text(yaml.safe_dump(_rules_firing_at_once("MergeserveDown")))
        t0 = time.time()
        # the mergeserve target is a port nothing listens on: up == 0
        with Prometheus({"mergeserve": f"127.0.0.1:{dead_port}"}, [tmp / "alerts.yml"], f"127.0.0.1:{am_port}"):
            while time.time() - t0 < 60 and not (out.exists() and out.read_text().strip()):
                time.sleep(0.2)
            took = time.time() - t0
        assert out.exists() and out.read_text().strip(), "the webhook was never called"
        notification = json.loads(out.read_text().splitlines()[0])
    finally:
        _stop(hook, am)
        printed = hook.stdout.read() if hook is not None else ""
        shutil.rmtree(tmp, ignore_errors=True)
    assert notification["receiver"] == "webhook" and notification["status"] == "firing"
    # the first group may also hold the `absent(up)` branch, true until Prometheus's first scrape
    alerts = [a for a in notification["alerts"] if a["labels"]["alertname"] == "MergeserveDown"]
    assert alerts and all(a["labels"]["severity"] == "critical" and a["labels"]["job"] == "mergeserve" for a in alerts)
    alert = alerts[0]
    assert alert["annotations"]["runbook_url"] == "docs/runbooks.md#mergeservedown"
    assert "FIRING MergeserveDown {job=mergeserve" in printed or f"instance=127.0.0.1:{dead_port}" in printed, printed
    print(f"alert delivered to the webhook {took:.1f} s after Prometheus started", file=sys.stderr)
