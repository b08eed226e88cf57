"""Helpers shared by tests/deploy/test_prometheus.py (promtool, offline) and
tests/serving/test_prometheus.py (a real Prometheus scraping the test server): locate promtool and
prometheus, read the Grafana dashboard's PromQL, substitute Grafana's variables, run Prometheus."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from serving.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "mergeserve.json"
PROM_CONFIG = DEPLOY / "prometheus.yml"
ALERTS = DEPLOY / "alerts.yml"
ALERTS_TEST = DEPLOY / "alerts_test.yml"

#: Grafana's built-in interval variables, as a dashboard at the default 10 s scrape interval sees them.
BUILTINS = {"__rate_interval": "1m", "__interval": "10s", "__range": "1h", "__range_s": "3600"}


def tool(name: str, *aliases: str) -> str:
    """Absolute path of a Prometheus binary (``name``, else the first of ``aliases`` found). Missing is a
    failure, never a skip: `make test` installs Debian's `prometheus` and `prometheus-alertmanager`
    packages (promtool and amtool come with them) when they are absent."""
    path = next((p for n in (name, *aliases) if (p := shutil.which(n))), None)
    if path is None:
        raise AssertionError(f"{name} not found on PATH; run `make test` (it installs Debian's prometheus and "
                             "prometheus-alertmanager packages)")
    return path


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, timeout=60, cwd=DEPLOY)


def _panels(panels: list) -> list:
    out = []
    for p in panels:
        out.append(p)
        out.extend(_panels(p.get("panels", [])))  # collapsed rows keep their panels inside
    return out


def dashboard_queries(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(``panel title / refId``, PromQL) for every Prometheus target of every panel, and
    (``annotation / name``, PromQL) for every Prometheus annotation query."""
    dash = json.loads(path.read_text())
    out = []
    for p in _panels(dash.get("panels", [])):
        for t in p.get("targets", []):
            if t.get("expr") and not t.get("hide"):
                out.append((f"{p.get('title')} / {t.get('refId')}", t["expr"]))
    for a in dash.get("annotations", {}).get("list", []):
        expr = (a.get("target") or {}).get("expr") or a.get("expr")
        if expr and a.get("enable", True):
            out.append((f"annotation / {a['name']}", expr))
    return out


def template_queries(path: Path = DASHBOARD) -> list[tuple[str, str, str]]:
    """(variable name, metric selector, label) for every ``label_values(selector, label)`` variable."""
    dash = json.loads(path.read_text())
    out = []
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        m = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\s*\)\s*", q)
        if v.get("type") == "query":
            assert m, f"variable {v['name']}: only label_values(selector, label) queries are checked, got {q!r}"
            out.append((v["name"], m.group(1), m.group(2)))
    return out


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana variables (``$x``, ``${x}``, ``${x:fmt}``, ``[[x]]``) by concrete values; any
    variable left unknown is an error, so a new dashboard variable cannot slip through untested."""
    values = {**BUILTINS, **values}

    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            raise KeyError(f"no test value for Grafana variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", repl, expr)


class Prometheus:
    """A real Prometheus on loopback (temporary storage, free port) scraping the given targets every
    second and evaluating deploy/alerts.yml every second. Use as a context manager."""

    def __init__(self, targets: dict[str, str], rule_files: list[Path] = (ALERTS,),
                 alertmanager: str | None = None) -> None:
        self.targets, self.rule_files, self.alertmanager = targets, list(rule_files), alertmanager
        self.dir = Path(tempfile.mkdtemp(prefix="mergeserve-prom-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=10, trust_env=False)
        self.proc: subprocess.Popen | None = None

    def config(self) -> dict:
        alerting = {"alerting": {"alertmanagers": [{"static_configs": [{"targets": [self.alertmanager]}]}]}}
        return {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {"job_name": job, "metrics_path": "/metrics", "static_configs": [{"targets": [target]}]}
                for job, target in self.targets.items()
            ],
            **(alerting if self.alertmanager else {}),
        }

    def __enter__(self) -> Prometheus:
        try:
            return self._start()
        except BaseException:
            self.__exit__()  # a failed start leaves no process and no temp dir behind
            raise

    def _start(self) -> Prometheus:
        cfg = self.dir / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(self.config()))
        check = promtool("check", "config", str(cfg))
        assert check.returncode == 0, check.stdout + check.stderr
        self.log = open(self.dir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={cfg}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            assert self.proc.poll() is None, self.logs()
            try:
                if self.http.get("/-/ready").status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("Prometheus did not become ready in 30 s\n" + self.logs())

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None) is not None:
            self.log.close()
        self.http.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def logs(self) -> str:
        p = self.dir / "prometheus.log"
        return p.read_text()[-4000:] if p.exists() else ""

    def get(self, path: str, **params: object) -> dict | list:
        r = self.http.get(path, params=params)
        body = r.json()
        assert r.status_code == 200 and body.get("status") == "success", (path, params, r.text[:2000])
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant query; the result as a list of series (a scalar counts as one)."""
        data = self.get("/api/v1/query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]
