"""``mergeserve serve``'s flags → the server config, and how it stops (no Ray started)."""

import argparse
import signal
import subprocess
import sys

import pytest

from serving.app import add_arguments, config_from_args


def _cfg(*argv: str):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return config_from_args(p.parse_args(list(argv)))


def test_no_flags_give_the_documented_defaults():
    cfg = _cfg()
    assert cfg.worker_idle_s == 120 and cfg.vqa.enabled and cfg.vqa.num_replicas == "auto"
    # no VQA replica until the first question: ~1 GB that would sit beside the bootstrap's training worker
    assert cfg.vqa.autoscaling["min_replicas"] == 0 and cfg.vqa.autoscaling["initial_replicas"] == 0
    assert cfg.bootstrap and cfg.vqa.bootstrap == []
    assert cfg.backbone == "efficientnet_lite0_offline"  # the measured choice (docs/results.md)


def test_vqa_scales_to_zero_after_the_idle_seconds_given():
    cfg = _cfg("--vqa-replicas", "auto", "--vqa-idle-s", "15", "--no-bootstrap", "--worker-idle-s", "0")
    a = cfg.vqa.autoscaling
    assert cfg.vqa.num_replicas == "auto" and a["min_replicas"] == 0 and a["max_replicas"] >= 1
    assert a["downscale_delay_s"] == a["downscale_to_zero_delay_s"] == 15
    assert cfg.worker_idle_s == 0 and cfg.bootstrap == [] and cfg.vqa.bootstrap == []  # flags compose
    assert _cfg("--backbone", "vit_tiny_offline").backbone == "vit_tiny_offline"


def test_serve_accepts_the_autoscaling_it_is_given():
    from ray.serve.config import AutoscalingConfig

    AutoscalingConfig(**_cfg("--vqa-replicas", "auto").vqa.autoscaling)  # Serve's own validation, not ours


BAD_LABELS = ["a", "a,a,b", "cat,,dog", "cat,dog/x", ",".join(str(i) for i in range(1001)), "cat,..", " ,x"]


@pytest.mark.parametrize("argv", [("--vqa-replicas", "many"), ("--worker-idle-s", "-1"), ("--direct-port", "-5"),
                                  ("--direct-port", "65500"), *[("--labels", x) for x in BAD_LABELS]])
def test_bad_flags_fail_before_anything_starts(argv, capsys):
    with pytest.raises(ValueError):
        _cfg(*argv)
    assert _run(*argv) == 2  # a one-line message and exit status 2, no traceback, no Ray
    err = capsys.readouterr().err
    assert err.startswith("mergeserve serve: ") and err.count("\n") == 1, err


def _run(*argv: str) -> int:
    """``mergeserve serve ARGV`` in process, for arguments that must be refused: were they accepted, the test
    fails at the data dir's claim instead of starting a server."""
    from unittest import mock

    from serving.app import run

    p = argparse.ArgumentParser()
    add_arguments(p)
    with mock.patch("serving.lifecycle.claim", side_effect=AssertionError("accepted: a server would start")):
        return run(p.parse_args(list(argv)))


def test_own_labels_turn_the_digit_bootstrap_off_and_show_in_the_config():
    cfg = _cfg("--labels", "cat, dog,bird")
    assert cfg.class_names == ["cat", "dog", "bird"] and cfg.bootstrap == []
    assert _cfg().bootstrap == ["mnist"] and _cfg("--labels", ",".join(map(str, range(10)))).bootstrap == ["mnist"]


@pytest.mark.parametrize("text, field", [
    ("trian: {steps: 3}\n", "trian"),                      # a typo is not a silently kept default
    ("train: {steps: -1}\n", "train.steps"),
    ("train: {stpes: 3}\n", "train.stpes"),
    ("vqa: {enabled: maybe}\n", "vqa.enabled"),
    ("class_names: [cat, cat]\n", "duplicated"),
    ("class_names: [cat, dog]\nbootstrap: [mnist]\n", "bootstrap"),
    ("[1, 2]\n", "mapping"),
    ("train: {steps: 3\n", "YAML"),
])
def test_a_bad_config_file_is_one_line_naming_the_key_and_exit_2(tmp_path, capsys, text, field):
    f = tmp_path / "server.yaml"
    f.write_text(text)
    assert _run("--config", str(f)) == 2
    err = capsys.readouterr().err
    assert err.startswith("mergeserve serve: ") and err.count("\n") == 1 and field in err, err


def test_a_config_file_yaml_or_json_and_flags_win(tmp_path):
    y = tmp_path / "server.yaml"
    y.write_text("class_names: [cat, dog]\ntrain: {steps: 7}\nvqa: {enabled: false}\n")
    cfg = _cfg("--config", str(y))
    assert cfg.class_names == ["cat", "dog"] and cfg.train.steps == 7 and not cfg.vqa.enabled
    assert cfg.train.batch_size == 64 and cfg.bootstrap == []  # the rest: defaults
    j = tmp_path / "server.json"
    j.write_text('{"class_names": ["cat", "dog"], "vqa": {"max_questions": 8}}')
    cfg = _cfg("--config", str(j), "--labels", "x,y,z", "--no-vqa", "--worker-idle-s", "0")
    assert cfg.class_names == ["x", "y", "z"] and not cfg.vqa.enabled and cfg.vqa.max_questions == 8
    assert cfg.worker_idle_s == 0


def test_a_data_dir_keeps_the_labels_it_started_with(tmp_path, capsys):
    from serving.pipeline import Pipeline

    Pipeline(_cfg("--data-dir", str(tmp_path), "--labels", "cat,dog")).db.put("labels", ["cat", "dog"])
    assert _run("--data-dir", str(tmp_path), "--labels", "cat,dog,bird") == 2
    err = capsys.readouterr().err
    assert "['cat', 'dog']" in err and "another data dir" in err and err.count("\n") == 1


def test_the_shipped_serve_configs_are_valid_server_configs():
    """``deploy/serve.yaml`` and the RayService's embedded Serve config: every key known, every value valid."""
    from pathlib import Path

    import yaml

    from serving.config import ServerConfig

    deploy = Path(__file__).parents[2] / "deploy"
    serve_yaml = yaml.safe_load((deploy / "serve.yaml").read_text())
    docs = yaml.safe_load_all((deploy / "rayservice.yaml").read_text())
    ray_service = next(d for d in docs if d["kind"] == "RayService")
    embedded = yaml.safe_load(ray_service["spec"]["serveConfigV2"])
    for conf in (serve_yaml, embedded):
        args = conf["applications"][0]["args"]
        cfg = ServerConfig.model_validate(args)
        assert set(args) <= set(ServerConfig.model_fields), set(args) - set(ServerConfig.model_fields)
        assert cfg.data_dir == args["data_dir"]


DIRECT_VARS = ("RAY_SERVE_ENABLE_DIRECT_INGRESS", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT",
               "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S",
               "RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
               "RAY_SERVE_HAPROXY_STATS_PORT")


def test_direct_port_sets_serves_variables_and_the_callers_win(monkeypatch):
    import os

    from serving.app import DIRECT_PORTS, HAPROXY_SIDE_PORTS, direct_ports, ray_env

    monkeypatch.setattr(os, "environ", dict(os.environ))  # what ray_env sets must not reach later tests' Ray
    for v in DIRECT_VARS:
        monkeypatch.delenv(v, raising=False)
    ray_env(None)  # --direct-port 0: Serve as it comes
    assert not any(v in os.environ for v in DIRECT_VARS) and direct_ports() == []
    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", "9100")  # an operator's own range end
    ray_env(9001)
    assert os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == "9001"
    assert os.environ["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] == "9100" != str(9001 + DIRECT_PORTS - 1)
    assert float(os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]) <= 2
    # the main port becomes Serve's HAProxy; its side listeners get free, distinct ports, not Serve's fixed
    # 8500 / 9101 / 8404, so two servers on one host do not collide
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    side = [int(os.environ[k]) for k in HAPROXY_SIDE_PORTS]
    assert len(set(side)) == 3 and not {8500, 9101, 8404} & set(side)
    for v in DIRECT_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")  # an operator keeps Serve's Python proxy
    ray_env(9001)
    assert os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert not any(k in os.environ for k in HAPROXY_SIDE_PORTS)
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args([]).direct_port == 8001 and p.parse_args(["--direct-port", "0"]).direct_port == 0


CHILD = """
from serving.app import catch_stop_signals, wait_for_stop
got = catch_stop_signals()
print("ready", flush=True)
print(wait_for_stop(got, 0.05), flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_the_server_stops_on_sigint_even_when_started_with_it_ignored(sig):
    # a shell's background job (`mergeserve serve &`) starts with SIGINT ignored; the server must still stop
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        assert child.stdout.readline().strip() == "ready"  # the handlers are in
        child.send_signal(sig)
        out, _ = child.communicate(timeout=15)
    finally:
        child.kill()
    assert child.returncode == 0
    assert out.strip() == str(int(sig))


def test_the_driver_and_the_control_plane_import_no_torch():
    """``mergeserve serve``'s process and the controller actor need none (~700 MB each with the CUDA build)."""
    code = ("import serving.app, serving.controller, serving.pipeline, mergeserve.cli, sys; "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_direct_ports_skips_a_port_that_speaks_another_protocol():
    """A gRPC listener in the scanned range answers HTTP/1 with binary frames (``BadStatusLine``): the scan goes
    on instead of crashing ``mergeserve serve`` after it printed "ready" (seen once in the acceptance suite)."""
    import socket
    import threading

    from serving.app import direct_ports

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()

        def answer() -> None:
            conn, _ = srv.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x64")  # an HTTP/2 frame

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        assert direct_ports(first=srv.getsockname()[1]) == []
        t.join(5)
        assert not t.is_alive()  # the scan did talk to it


def test_the_startup_gap_template_answers_503_not_ready_in_a_fresh_interpreter():
    """``serving.startup_gap.install`` (Ray's worker_process_setup_hook) rewrites Serve's HAProxy default backend
    when the template module is imported after it, as in the HAProxyManager actor; the rest is unchanged."""
    code = ("from serving.startup_gap import install, NEW, OLD; install()\n"
            "from ray.serve._private import haproxy, haproxy_templates as t\n"
            "assert NEW in haproxy.HAPROXY_CONFIG_TEMPLATE and OLD not in t.HAPROXY_CONFIG_TEMPLATE\n"
            "print(len(haproxy.HAPROXY_CONFIG_TEMPLATE.splitlines()))\n")
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0, fresh.stderr
    from ray.serve._private import haproxy_templates as t  # unpatched in this process
    assert "status 404" in t.HAPROXY_CONFIG_TEMPLATE  # Ray's own line is there to replace (an upgrade shows here)
    assert int(fresh.stdout) == len(t.HAPROXY_CONFIG_TEMPLATE.splitlines())


def test_a_start_failure_is_reported_as_its_innermost_cause():
    """`mergeserve serve` prints why it could not start in one line: the error at the bottom of Ray's wrappers
    (a task error's ``cause``) and Python's chaining, a KeyError's message unquoted."""
    from serving.app import root_cause

    class Wrapped(Exception):  # Ray's RayTaskError carries the remote error as ``cause``
        def __init__(self, cause: BaseException) -> None:
            super().__init__("Traceback (most recent call last):\n  ...\nmany lines")
            self.cause = cause

    try:
        try:
            raise KeyError("unknown task 'nope'; registered: ['classify', 'vlm', 'vqa']")
        except KeyError as inner:
            raise RuntimeError("controller.ready failed") from Wrapped(inner)
    except RuntimeError as e:
        assert root_cause(e) == "KeyError: unknown task 'nope'; registered: ['classify', 'vlm', 'vqa']"
    assert root_cause(ValueError("bad\nlast line")) == "ValueError: last line"
