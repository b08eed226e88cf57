"""Build the Serve application and run it: ``mergeserve serve`` or ``serve run deploy/serve.yaml``."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import sys
import time
import urllib.request

import ray
from ray import serve

from . import lifecycle
from .api import Model, TaskModel
from .config import DEFAULT_TASK, ServerConfig, TaskServing, config_from_args
from .controller import get_or_create_controller
from .pipeline import Submission, check_labels
from .ports import DIRECT_PORTS, free_port


def replica_env() -> dict[str, str]:
    """Serve settings for the ``Model`` replicas' processes only (other deployments keep Serve's defaults);
    a value set in the environment ``build_app`` runs in wins.

    ``RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0`` (Serve's default is 1; its throughput preset sets 0)
    runs the API on the replica's main event loop instead of a second loop in a thread of its own: every
    request, from the direct-ingress port or the proxy, was handed from one loop to the other and its
    answer back, and the two threads took turns on the GIL. 1 image × 16 clients on the direct port, 2
    cores, two runs of each setting, alternated: replica CPU 1.60 → 1.40 ms a request, +15 % req/s.
    Safe here because nothing the API runs on the loop blocks it longer than a batch may wait: large
    decodes, ingest reads and long forwards run in threads (``batching.py``); the user loop's health
    probe and Serve's own work keep going.
    """
    key = "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"
    return {key: os.environ.get(key, "0")}


def build_app(args: dict | None = None) -> serve.Application:
    """Application builder (``import_path: serving.app:build_app`` in deploy/serve.yaml).

    Creates (or reattaches to) the detached controller, then binds the ``Model`` deployment (HTTP API +
    the classifier) and one ``TaskModel`` deployment per other configured task (``VqaModel``, ...), which
    it calls for ``POST /v1/<task>``: one model deployment per task (they differ in type and size). The
    driver imports no torch: only replicas and the worker do.
    """
    cfg = ServerConfig.model_validate(args or {})
    controller = get_or_create_controller(cfg)
    for task in cfg.tasks_held():  # every task's v0 exists and its job runner is up before replicas start
        ray.get(controller.ready.remote(task))
    # after every v0: the bootstrap jobs train on the one worker, and a v0 queued behind them would hold
    # /readyz back for a whole training run (~60 s). Idempotent: also for `serve run deploy/serve.yaml`
    bootstrap(cfg)
    actor = {"num_cpus": 0.25, "num_gpus": cfg.replica_num_gpus}
    opts: dict = {
        "ray_actor_options": {**actor, "runtime_env": {"env_vars": replica_env()}},
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "user_config": {"max_batch_images": cfg.max_batch_images, "batch_wait_timeout_s": cfg.batch_wait_timeout_s},
    }
    if cfg.num_replicas == "auto":
        opts["autoscaling_config"] = cfg.autoscaling
    else:
        opts["num_replicas"] = int(cfg.num_replicas)
    handles = {task: TaskModel.options(name=deployment_name(task), **task_options(ts, cfg, actor)).bind(
        cfg.model_dump(mode="json"), task) for task, ts in cfg.served().items()}
    return Model.options(**opts).bind(cfg.model_dump(mode="json"), handles)


def deployment_name(task: str) -> str:
    """A task's model deployment: ``VqaModel`` for ``vqa``, ``VlmModel`` for ``vlm`` (metrics and logs name it)."""
    return "".join(w.title() for w in task.split("_")) + "Model"


def task_options(ts: TaskServing, cfg: ServerConfig, actor: dict) -> dict:
    """Serve options of one task's model deployment (replicas or autoscaling from its section)."""
    scale = {"autoscaling_config": ts.autoscaling} if ts.num_replicas == "auto" else {"num_replicas": ts.num_replicas}
    return {**scale, "max_ongoing_requests": cfg.max_ongoing_requests, "ray_actor_options": actor}


def bootstrap(cfg: ServerConfig) -> list[str]:
    """On a fresh data dir, queue each task's configured bootstrap domains as ordinary ingest jobs:
    ``digits5`` domains for classification, each other task's ``bootstrap_benchmark`` (``scenes_vqa``
    question families for vqa).

    The data is a built-in source the worker materialises (with the benchmark's own held-out split).
    Idempotent (fixed ``Idempotency-Key`` per domain; nothing once a task has a domain), so every
    start path can call it. Returns the ids of the bootstrap jobs.
    """
    controller = get_or_create_controller(cfg)
    ids = []
    for task, bench in cfg.bootstrap_sources().items():
        names = cfg.for_task(task).bootstrap
        if not names or ray.get(controller.domains.remote(task)):
            continue
        for d in names:
            key = f"bootstrap-{d}" if task == DEFAULT_TASK else f"bootstrap-{task}-{d}"  # the default: as before
            s = Submission(d, None, {}, key, None, None, source=f"builtin:{bench}/{d}", task=task)
            ids.append(ray.get(controller.submit.remote(s))["job"]["id"])
    return ids


#: Serve's HAProxy-mode listeners besides the main port, which :func:`ray_env` puts on free ports
HAPROXY_SIDE_PORTS = ("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                      "RAY_SERVE_HAPROXY_STATS_PORT")


#: where Serve's HAProxy keeps its files (it adds a folder per node under each one's directory); an
#: in-process run points them into its own temporary directory (serving/lifecycle.py)
HAPROXY_FILES = {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg", "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
                 "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "", "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
                 "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock"}


def ray_env(direct_port: int | None = None) -> None:
    """Environment for an in-process Ray, set before ``ray.init`` (its processes inherit it); a value the
    caller already set wins.

    Serve kills an HTTP proxy that misses 3 readiness checks of 5 s each, and ``serve.start`` then fails
    after 60 s: on 2 busy cores the proxy's first import alone can take longer. 15 s per check (45 s in
    all) still fails inside ``serve.start``'s 60 s when a proxy really cannot start.

    Args:
        direct_port: when set, Serve's direct ingress is on: each ``Model`` replica also serves the whole
            HTTP API itself on a port from ``direct_port`` up (:data:`DIRECT_PORTS` of them), with no proxy
            hop; and the main port is Serve's HAProxy ingress, routing across those ports (unless the
            caller set ``RAY_SERVE_ENABLE_HA_PROXY=0``: then Serve's Python proxy, as without direct ingress).
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "15")
    # Serve's handles (the proxy's calls to replicas, Model's to VqaModel) over gRPC instead of Ray actor
    # calls, as Serve's throughput preset does: 1 image x 16 clients through the proxy, 2 cores, two
    # interleaved pairs of runs: 210 -> 254 req/s, replica CPU 3.9 -> 3.3 ms a request
    os.environ.setdefault("RAY_SERVE_USE_GRPC_BY_DEFAULT", "1")
    if direct_port:
        os.environ.setdefault("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1")
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", str(direct_port))
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", str(direct_port + DIRECT_PORTS - 1))
        # Serve holds a stopping direct-ingress replica open 30 s by default, so that an external load
        # balancer can deregister it; the only one here is Serve's own HAProxy, which Serve updates itself
        # and which retries a refused connection on another replica, and the wait would hold every
        # shutdown and redeploy back. In-flight requests are still drained.
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
        # Serve's HAProxy ingress (Ray's high-throughput mode) replaces the Python proxy on the main port:
        # HAProxy balances over the replicas' direct ports (leastconn, retrying refused connections) and
        # falls back to a Python proxy only while no replica is up. 1 image x 16 clients, 2 cores, one
        # server, ports alternated: 263-275 req/s through the Python proxy, 853-869 through HAProxy
        if os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1") == "1":
            # its side listeners (fallback proxy, HAProxy's exporter and stats page) default to fixed ports
            # (8500, 9101, 8404); free ones let two servers, or a server and the tests, share a host
            first = free_port(span=len(HAPROXY_SIDE_PORTS))  # consecutive, so distinct
            for i, key in enumerate(HAPROXY_SIDE_PORTS):
                os.environ.setdefault(key, str(first + i))


def direct_ports(host: str = "127.0.0.1", app: str = "mergeserve", first: int | None = None) -> list[int]:
    """The direct-ingress ports on ``host`` whose replica serves application ``app`` (Serve answers
    ``GET /-/routes`` there with ``{route_prefix: app}``); empty when direct ingress is off.

    Args:
        host: where to look (a wildcard bind address is looked at on loopback).
        app: the Serve application name.
        first: the first port of the range (default: this process's ``RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT``).
    """
    if first is None:
        if os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") != "1":
            return []
        first = int(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "30000"))
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    out = []
    for port in range(first, first + DIRECT_PORTS):
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/-/routes", timeout=1.0) as r:
                if r.status == 200 and app in json.loads(r.read()).values():
                    out.append(port)
        # URLError and timeouts are OSErrors; a port of another protocol (gRPC) answers a BadStatusLine
        except (OSError, ValueError, AttributeError, http.client.HTTPException):
            continue
    return out


def start(
    cfg: ServerConfig,
    port: int,
    host: str = "127.0.0.1",
    address: str | None = None,
    metrics_export_port: int | None = None,
    direct_port: int | None = None,
) -> None:
    """Start Ray (in-process unless ``address``), Serve on ``host:port``, and deploy the app.

    ``direct_port`` turns on direct ingress for an in-process Ray (:func:`ray_env`); a cluster
    (``address``) has it when its nodes were started with the same variables.

    The app is built (controller up, every task's v0 made, recovery done, bootstrap queued: seconds, more on
    a fresh data dir) before Serve opens the port: until its routes exist Serve's proxy answers every path
    404, which a client cannot tell from a wrong URL; before it opens, a client's connection is refused.
    """
    ray_env(None if address else direct_port)
    if not ray.is_initialized():
        # Ray 2.60 reads no environment variable for this: in-process Ray gets the port here, a cluster
        # gets it from `ray start --metrics-export-port` (deploy/docker-compose.yml)
        extra = {"_metrics_export_port": metrics_export_port} if metrics_export_port and not address else {}
        if not address:  # Serve's start-up gap answers 503 + Retry-After, not 404 (serving/startup_gap.py)
            extra["runtime_env"] = {"worker_process_setup_hook": "serving.startup_gap.install"}
        ray.init(address=address, namespace="mergeserve", include_dashboard=False, log_to_driver=True, **extra)
    app = build_app(cfg.model_dump(mode="json"))
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name="mergeserve", route_prefix="/")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """CLI flags of ``mergeserve serve``."""
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--data-dir", help="state directory (default ~/.local/share/mergeserve or $MERGESERVE_DATA)")
    p.add_argument("--direct-port", type=int, default=8001,
                   help="first port where each model replica also serves the API itself (Serve's direct ingress); "
                   "the main port is then Serve's HAProxy balancing over these ports (~3x the single-image "
                   "throughput of Serve's Python proxy on 2 cores; RAY_SERVE_ENABLE_HA_PROXY=0 keeps the Python "
                   "proxy). Default 8001; 0: both off. In-process Ray only: a cluster sets "
                   "RAY_SERVE_ENABLE_HA_PROXY / RAY_SERVE_ENABLE_DIRECT_INGRESS on its nodes")
    p.add_argument("--address", help="join an existing Ray cluster instead of starting one in-process")
    p.add_argument("--replicas", help="model replicas: a number or 'auto' (default 1)")
    p.add_argument(
        "--metrics-export-port",
        type=int,
        help="port of Ray's metrics agent (in-process Ray only; with --address use `ray start --metrics-export-port`)",
    )
    p.add_argument("--backbone", help="registered backbone: efficientnet_lite0_offline (default, ImageNet-pretrained) "
                   "or vit_tiny_offline (~11x cheaper per image, less accurate; docs/results.md compares them)")
    p.add_argument("--no-bootstrap", action="store_true",
                   help="learn nothing on first start (default: the digits5 'mnist' domain; vqa.bootstrap is empty)")
    p.add_argument("--worker-idle-s", type=float,
                   help="seconds before an idle training worker process exits (default 120; 0: never)")
    p.add_argument("--vqa-replicas",
                   help="VqaModel replicas: a number, or 'auto' (default: scales to zero after 5 idle minutes)")
    p.add_argument("--vqa-idle-s", type=float,
                   help="idle seconds before the VQA replica scales to zero (with 'auto', the default; 300)")
    p.add_argument("--no-vqa", action="store_true", help="serve image classification only (no /v1/vqa)")
    p.add_argument("--labels", help="comma-separated class names to serve, e.g. cat,dog,bird (default: the digits "
                   "0-9 of the built-in benchmark; other labels learn nothing at first start). A data dir keeps "
                   "the labels it started with")
    p.add_argument("--config", metavar="FILE", help="a ServerConfig as YAML or JSON (serving/config.py; the `args` of "
                   "deploy/serve.yaml); flags given beside it win")


def root_cause(e: BaseException) -> str:
    """The innermost error behind ``e`` (through Ray's task-error wrappers) as ``Type: message``, one line."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None) or e.__cause__
        if not isinstance(inner, BaseException):
            break
        e = inner
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)  # KeyError's str() quotes its message
    return f"{type(e).__name__}: {msg.strip().splitlines()[-1] if msg.strip() else ''}"


def catch_stop_signals(got: list[int] | None = None) -> list[int]:
    """Install SIGTERM and SIGINT handlers that append the signal to ``got`` (a new list by default);
    returns that list.

    Installed explicitly, as uvicorn does: a shell starts a background job with SIGINT ignored and
    Python keeps that, so without its own handler ``kill -INT`` (or a supervisor's SIGINT) would not stop
    a server started with ``&``. Installed before startup, so a signal that comes while Ray starts is
    kept and acted on once startup is done. Call again after ``ray.init``, which installs its own SIGTERM
    handler (``sys.exit``, so a SIGTERM during startup still ends the process, through Ray's atexit
    shutdown).
    """
    got = [] if got is None else got
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda n, _frame: got.append(n))
    return got


def wait_for_stop(got: list[int], poll_s: float = 1.0) -> int:
    """Block until :func:`catch_stop_signals` recorded a signal; returns its number."""
    while not got:
        time.sleep(poll_s)
    return got[0]


def run(args: argparse.Namespace) -> int:
    """Entry point of ``mergeserve serve``: runs until interrupted (2 on bad flags or config, 1 when this
    machine cannot host it: another server on the data dir, a port in use; both before anything starts)."""
    try:
        cfg = config_from_args(args)
        for task in cfg.tasks_held():
            check_labels(cfg.for_task(task))
    except ValueError as e:  # pydantic's ValidationError included
        print(f"mergeserve serve: {e}", file=sys.stderr)
        return 2
    stop = catch_stop_signals()
    held = None  # (data dir lock, reaper): for an in-process Ray, which this process owns
    if not args.address:
        ports = [args.port] + ([args.direct_port] if args.direct_port else [])
        try:
            claimed = lifecycle.claim(cfg.data_dir, args.host, ports, {"port": args.port})
        except lifecycle.StartError as e:
            print(f"mergeserve serve: {e}", file=sys.stderr)
            return 1
        # the reaper's pipe closes when this process ends, however it ends
        procs = os.path.join(cfg.data_dir, lifecycle.PROCS)
        held = (claimed, lifecycle.start_reaper(claimed.tag, procs, claimed.tmp))
        os.environ[lifecycle.TAG] = claimed.tag  # before Ray starts: every process it starts inherits the tag
        for key, name in HAPROXY_FILES.items():  # HAProxy's files in the run's directory, removed with it
            os.environ.setdefault(key, os.path.join(claimed.tmp, name))
    print(f"mergeserve: data in {cfg.data_dir}; starting Ray Serve on http://{args.host}:{args.port}", flush=True)
    try:
        start(cfg, args.port, args.host, args.address, args.metrics_export_port, args.direct_port)
    except Exception as e:  # noqa: BLE001 - e.g. a configured task whose model cannot be built: one line, exit 1
        print(f"mergeserve serve: could not start: {root_cause(e)}", file=sys.stderr)
        serve.shutdown()
        ray.shutdown()
        if held:
            lifecycle.release(*held)
        return 1
    catch_stop_signals(stop)  # ray.init replaced the SIGTERM handler
    jobs = bootstrap(cfg)
    if jobs:
        print(f"mergeserve: bootstrapping domains (jobs {jobs}); follow GET /v1/jobs/<id>", flush=True)
    print(f"mergeserve: ready on http://{args.host}:{args.port} (docs at /docs); Ctrl-C to stop", flush=True)
    direct = direct_ports(args.host)
    if direct:
        urls = ", ".join(f"http://{args.host}:{p}" for p in direct)
        print(f"mergeserve: the same API direct to this node's replica(s), without the ingress hop: {urls}",
              flush=True)
    wait_for_stop(stop)
    serve.shutdown()
    ray.shutdown()
    if held:
        lifecycle.release(*held)
    return 0
