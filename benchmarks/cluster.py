"""Two-node cluster check: where does each mergeserve actor run?

Starts a two-node Ray cluster on this machine (`ray start --head` + `ray start --address ... --num-gpus
N`: a worker node that declares logical GPUs, like a GPU worker group), runs the server against it
with `trainer_num_gpus: 1` (`serve run --address` with a Serve config, as `serve.yaml` does),
ingests a domain end to end over HTTP, checks Prometheus' two targets (the app's /metrics and each
node's Ray metrics agent on the port given to `ray start --metrics-export-port`), prints where every
actor runs, checks the placement, and tears everything down (only the processes it started).

    .venv/bin/python benchmarks/cluster.py                 # exit 0 when the placement is right
    # the code before the serving rewrite (two GPU actors, an Ingress deployment):
    .venv/bin/python benchmarks/cluster.py --gpu-node-gpus 2 --pin-deployments Model,Ingress

Placement checked (class names matched exactly or as the last `:`-part of Ray's class name, so the
Serve replica `ServeReplica:mergeserve:Model` matches `Model`):
  --gpu-classes  (default Worker,TrainerActor,MergeActor): every one found must be on the GPU node,
                 and at least one must exist;
  --head-classes (default Model,Ingress): every one found must be on the head node, at least one.
Everything else (the controller, Serve's controller and proxies) is reported, not checked; a controller
off the head prints a warning. Serve spreads replicas over all nodes, so the deployments named by
--pin-deployments (default Model) get a Serve config override with a label_selector for the head's
node label (`--pin-deployments ''` leaves placement to Serve).

Isolation on a shared machine: RAY_TMPDIR points at a private directory (Ray's temp files and its
`ray_current_cluster` file go there, so a plain `ray.init()` elsewhere on the machine never joins
this cluster), every fixed Ray port is a free one, and token authentication is on for every process
with a private token (RAY_AUTH_MODE=token + RAY_AUTH_TOKEN_PATH): Ray 2.60 turns token auth on by
itself only for a new in-process cluster, so `ray start` and any driver joining with --address must
be told the same mode and token. Nothing leaves the host (HTTP and scrapes use 127.0.0.1; Ray itself
maps 127.0.0.1 to the host's own interface address for its GCS and nodes).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import yaml
from PIL import Image

from serving.ports import DIRECT_PORTS, free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLASSES = ["a", "b", "c"]
TOKEN = "cluster-check-token"
ROLE_LABEL = "mergeserve-role"  # node label: "serving" on the head, "gpu-worker" on the GPU node


def archive(n_per_class: int = 20) -> bytes:
    """A learnable 3-class image archive (class_name/image.png), as POST /v1/domains takes it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for j, c in enumerate(CLASSES):
            for i in range(n_per_class):
                rng = np.random.RandomState(100 * j + i)
                img = rng.randint(0, 60, (32, 32, 3)).astype(np.uint8)
                img[8 * j : 8 * j + 8, :, j] = 250
                out = io.BytesIO()
                Image.fromarray(img).save(out, format="PNG")
                info = tarfile.TarInfo(f"{c}/{i}.png")
                info.size = out.tell()
                out.seek(0)
                tf.addfile(info, out)
    return buf.getvalue()


def short(node_id: str | None) -> str:
    return (node_id or "-")[:8]


class Cluster:
    """The processes this check starts, each in its own session so that teardown reaches exactly them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dir = Path(tempfile.mkdtemp(prefix="msc-", dir="/tmp"))  # short: Ray's socket paths live under it
        token = self.dir / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.env = {
            **os.environ,
            "RAY_TMPDIR": str(self.dir),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
        }
        for k in [k for k in self.env if k.lower().endswith("_proxy")]:
            del self.env[k]  # loopback only
        # this process joins the cluster too; ray reads the auth mode once, when first imported (below or
        # in run), so it must be set before
        os.environ.update({k: self.env[k] for k in ("RAY_TMPDIR", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")})
        if args.haproxy:
            # what `mergeserve serve` gives its in-process Ray (direct ingress, Serve's HAProxy on the HTTP
            # port, free side ports), here for every `ray start`: a cluster reads them from each node's env
            from serving.app import ray_env

            saved = dict(os.environ)
            ray_env(free_port(span=DIRECT_PORTS))
            self.env.update({k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")})
            os.environ.clear()  # this process is a driver, not a node: it keeps Serve's defaults
            os.environ.update(saved)
        self.gcs_port, self.http_port = free_port(), free_port()
        self.metrics_ports = {"head": free_port(), "gpu": free_port()}
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.procs: dict[str, subprocess.Popen] = {}

    def spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "w")
        p = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        self.procs[name] = p
        print(f"  started {name} (pid {p.pid}): {' '.join(cmd[:3])} ...", flush=True)
        return p

    def log_tail(self, name: str, n: int = 40) -> str:
        p = self.dir / f"{name}.log"
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:]) if p.exists() else ""

    def start_nodes(self) -> None:
        ray = str(BIN / "ray")
        common = ["--block", "--disable-usage-stats"]
        label = lambda role: f"--labels={json.dumps({ROLE_LABEL: role})}"  # noqa: E731
        self.spawn(
            "head",
            [ray, "start", "--head", *common, label("serving"), f"--port={self.gcs_port}",
             f"--num-cpus={self.args.head_cpus}", "--num-gpus=0", f"--metrics-export-port={self.metrics_ports['head']}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}"],
        )  # fmt: skip
        self.wait_port(self.gcs_port, "head", 120)
        self.spawn(
            "gpu-node",
            [ray, "start", f"--address={self.address}", *common, label("gpu-worker"),
             f"--num-cpus={self.args.gpu_node_cpus}", f"--num-gpus={self.args.gpu_node_gpus}",
             f"--metrics-export-port={self.metrics_ports['gpu']}",
             f"--dashboard-agent-listen-port={free_port()}"],
        )  # fmt: skip

    def wait_port(self, port: int, name: str, timeout: float) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited:\n{self.log_tail(name)}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.5)
        raise TimeoutError(f"{name}: port {port} not open after {timeout:.0f} s\n{self.log_tail(name)}")

    def serve_config(self) -> Path:
        """The Serve config `serve run` deploys: deploy/serve.yaml's shape with a tiny test model."""
        args = {
            "data_dir": str(self.dir / "data"),  # one machine: every node sees it (a real cluster: RWX volume)
            "backbone": "vit_test",
            "class_names": CLASSES,
            "bootstrap": [],
            "lora": {"rank": 2, "alpha": 4.0},
            "train": {"steps": 30, "batch_size": 16, "lr": 0.05},
            # a few held-out images make accuracy too coarse to gate on (as in tests/serving)
            "gate": {"max_drop": 1.0, "require_gain": False},
            "num_replicas": 1,
            "auth_token": TOKEN,
            "trainer_num_gpus": 1,
            "replica_num_gpus": 0,
            **json.loads(self.args.app_args),
        }
        app = {"name": "mergeserve", "route_prefix": "/", "import_path": "serving.app:build_app", "args": args}
        if self.args.pin_deployments:
            # Serve spreads replicas over all nodes; pin them to the serving (head) node by label. A
            # config's ray_actor_options replace the code's as a whole, so num_cpus/num_gpus are repeated.
            opts = {"num_cpus": self.args.replica_cpus, "num_gpus": 0, "label_selector": {ROLE_LABEL: "serving"}}
            app["deployments"] = [{"name": d, "ray_actor_options": opts} for d in self.args.pin_deployments]
        cfg = {
            "proxy_location": "HeadOnly",
            "http_options": {"host": "127.0.0.1", "port": self.http_port},
            "applications": [app],
        }
        path = self.dir / "serve.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def start_server(self) -> None:
        self.spawn("serve", [str(BIN / "serve"), "run", "--address", self.address, str(self.serve_config())])

    def teardown(self) -> None:
        """SIGINT to `serve run` (shuts the app down), then SIGTERM to each `ray start --block` (it stops
        the Ray processes it started); whatever is left of a session after 30 s gets SIGKILL."""
        order = [("serve", signal.SIGINT), ("gpu-node", signal.SIGTERM), ("head", signal.SIGTERM)]
        for name, sig in order:
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(sig)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for name, p in self.procs.items():
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the session this check created for `name`, nothing else
                print(f"  {name}: killed leftover processes of its session", flush=True)
            except ProcessLookupError:
                pass
        t0 = time.time()
        while (left := leftovers(self.dir)) and time.time() - t0 < 30:
            time.sleep(1)  # Ray workers exit on their own once their raylet is gone
        for pid in left:  # started by this check: they carry its private RAY_TMPDIR
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        print(f"  processes of this check left after 30 s (killed): {left or 'none'}", flush=True)
        if not self.args.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


def leftovers(marker: Path) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if str(marker) in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    out.append(int(d.name))
                if str(marker).encode() in (d / "environ").read_bytes():
                    out.append(int(d.name))
            except OSError:
                pass
    return sorted(set(out) - {os.getpid()})


def matches(class_name: str, names: list[str]) -> bool:
    return any(class_name == n or class_name.rsplit(":", 1)[-1] == n for n in names)


def table(rows: list[list[str]], header: list[str]) -> str:
    w = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "| " + " | ".join(str(x).ljust(n) for x, n in zip(r, w)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (n + 2) for n in w) + "|", *map(line, rows)])


def scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10, trust_env=False).text


def run(args: argparse.Namespace) -> int:
    c = Cluster(args)
    t_all = time.time()
    print(f"cluster check in {c.dir} (gcs {c.address}, http {c.http_port}, ray metrics {c.metrics_ports})")
    try:
        c.start_nodes()
        import ray
        from ray.util.state import list_actors

        ray.init(address=c.address, namespace="mergeserve", log_to_driver=False)
        t0 = time.time()
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            if time.time() - t0 > 120:
                raise TimeoutError("the GPU node did not join:\n" + c.log_tail("gpu-node"))
            time.sleep(0.5)
        nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        head_id = next(i for i, n in nodes.items() if "node:__internal_head__" in n["Resources"])
        gpu_id = next(i for i, n in nodes.items() if n["Resources"].get("GPU", 0) > 0)
        role = {head_id: "head", gpu_id: "gpu"}
        print("\nnodes:")
        print(
            table(
                [
                    [role[i], short(i), n["NodeManagerAddress"], n["MetricsExportPort"],
                     json.dumps({k: v for k, v in n["Resources"].items() if k in ("CPU", "GPU")}),
                     (n.get("Labels") or {}).get(ROLE_LABEL, "")]
                    for i, n in nodes.items()
                ],
                ["role", "node id", "IP", "ray metrics port", "resources", ROLE_LABEL],
            )
        )  # fmt: skip

        print(f"\nserve run --address {c.address} (trainer_num_gpus: 1)", flush=True)
        c.start_server()
        http = httpx.Client(base_url=f"http://127.0.0.1:{c.http_port}", timeout=60, trust_env=False)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        t0 = time.time()
        while True:
            if c.procs["serve"].poll() is not None:
                raise RuntimeError("serve run exited:\n" + c.log_tail("serve"))
            try:
                if http.get("/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() - t0 > args.timeout:
                raise TimeoutError("server not ready:\n" + c.log_tail("serve"))
            time.sleep(1)
        t_ready = time.time() - t0
        print(f"  ready in {t_ready:.1f} s", flush=True)

        t0 = time.time()
        r = http.post(
            "/v1/domains",
            data={"name": "cluster-check"},
            files={"archive": ("d.tar.gz", archive(), "application/gzip")},
            headers=auth,
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        while True:
            job = http.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "rejected"):
                break
            if time.time() - t0 > args.timeout:
                raise TimeoutError(f"job {job_id} still {job['status']}")
            time.sleep(0.5)
        t_job = time.time() - t0
        print(f"  POST /v1/domains -> job {job_id}: {job['status']} in {t_job:.1f} s", flush=True)
        cls = http.post("/v1/classify", json={"image": base64.b64encode(_png()).decode()}).json()
        print(f"  /v1/classify answered by adapter version {cls.get('adapter_version')}", flush=True)
        listener = {psutil.Process(x.pid).name() for x in psutil.net_connections("tcp")
                    if x.status == "LISTEN" and x.laddr.port == c.http_port and x.pid}
        print(f"  HTTP port {c.http_port} served by {sorted(listener)}", flush=True)

        app_metrics = http.get("/metrics").text
        ray_series = {name: sum(1 for ln in scrape(p).splitlines() if ln.startswith("ray_")) for name, p in
                      c.metrics_ports.items()}  # fmt: skip
        print(
            f"  app /metrics: {sum(1 for ln in app_metrics.splitlines() if ln.startswith('mergeserve_'))} "
            f"mergeserve_* samples; Ray metrics agents: "
            + ", ".join(f"{k} :{c.metrics_ports[k]} {v} ray_* samples" for k, v in ray_series.items()),
            flush=True,
        )

        actors = [a for a in list_actors(address=c.address, detail=True, limit=1000) if a.state == "ALIVE"]
        rows = []
        for a in sorted(actors, key=lambda a: (role.get(a.node_id, "?"), a.class_name)):
            res = {
                k: v
                for k, v in (a.required_resources or {}).items()
                if not k.startswith("node:") or k == "node:__internal_head__"
            }
            rows.append([a.class_name, a.name or "", role.get(a.node_id, "?"), short(a.node_id),
                         nodes.get(a.node_id, {}).get("NodeManagerAddress", "?"), a.pid, json.dumps(res)])  # fmt: skip
        print("\nactors:")
        print(table(rows, ["class", "name", "node", "node id", "IP", "pid", "required resources"]))

        errors = []
        gpu_found = [a for a in actors if matches(a.class_name, args.gpu_classes)]
        head_found = [a for a in actors if matches(a.class_name, args.head_classes)]
        if not gpu_found:
            errors.append(f"no actor of {args.gpu_classes} alive")
        if not head_found:
            errors.append(f"no actor of {args.head_classes} alive")
        errors += [
            f"{a.class_name} on {role.get(a.node_id, '?')}, expected gpu" for a in gpu_found if a.node_id != gpu_id
        ]
        errors += [
            f"{a.class_name} on {role.get(a.node_id, '?')}, expected head" for a in head_found if a.node_id != head_id
        ]
        ctrl = [a for a in actors if matches(a.class_name, ["Controller"])]
        if any(a.node_id != head_id for a in ctrl):
            print("  WARNING: the controller (SQLite owner) is not on the head node: nothing pins it there")
        if job["status"] != "succeeded":
            errors.append(f"ingest job ended {job['status']}: {job.get('error')}")
        if args.haproxy and listener != {"haproxy"}:
            errors.append(f"--haproxy: the HTTP port is served by {sorted(listener)}, not haproxy")
        made, got = job.get("adapter_version"), cls.get("adapter_version")
        if got != made:
            errors.append(f"classify answered by version {got}, the job made {made}")
        if not all(ray_series.values()):
            errors.append(f"a Ray metrics agent exported no ray_* series: {ray_series}")
        print(
            f"\nplacement: {'OK' if not errors else 'FAILED'}; ready {t_ready:.1f} s, ingest {t_job:.1f} s, "
            f"total {time.time() - t_all:.1f} s"
        )
        for e in errors:
            print(f"  ERROR: {e}")
        ray.shutdown()
        return 0 if not errors else 1
    finally:
        print("\nteardown:", flush=True)
        try:
            import ray

            ray.shutdown()
        except Exception:  # noqa: BLE001
            pass
        c.teardown()


def _png() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 30, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    csv = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--gpu-classes", type=csv, default=["Worker", "TrainerActor", "MergeActor"])
    p.add_argument("--head-classes", type=csv, default=["Model", "Ingress"])
    p.add_argument(
        "--pin-deployments",
        type=csv,
        default=["Model"],
        help="Serve deployments pinned to the head by label_selector ('' = leave placement to Serve)",
    )
    p.add_argument("--replica-cpus", type=float, default=0.25, help="num_cpus of the pinned deployments")
    p.add_argument("--head-cpus", type=int, default=2)
    p.add_argument("--gpu-node-cpus", type=int, default=2)
    p.add_argument("--gpu-node-gpus", type=int, default=1, help="logical GPUs the worker node declares")
    p.add_argument("--app-args", default="{}", help="JSON merged into the app's args (ServerConfig fields)")
    p.add_argument("--timeout", type=float, default=600, help="seconds for start-up and for the ingest job")
    p.add_argument("--haproxy", action="store_true",
                   help="the nodes run Serve's direct ingress with HAProxy on the HTTP port, as `mergeserve serve`")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data) after teardown")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
