"""What a killed ``mergeserve serve`` leaves behind, and the next start (no Ray: stand-in processes)."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import psutil
import pytest

from serving import lifecycle

# A stand-in driver: starts its reaper, then (with the tag) a child that renames itself out of sight as
# Ray's workers do (its environment is dropped, so only the reaper's snapshot can find it) and a grandchild
# in a session of its own, as Serve's HAProxy (found by its tag too); prints their pids, then sleeps.
DRIVER = textwrap.dedent("""
    import os, subprocess, sys, time
    from serving import lifecycle
    tag, procs, tmp = sys.argv[1], sys.argv[2], sys.argv[3]
    reaper = lifecycle.start_reaper(tag, procs, tmp)
    os.environ[lifecycle.TAG] = tag
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    hidden = subprocess.Popen(sleeper, env={k: v for k, v in os.environ.items() if k != lifecycle.TAG})
    detached = subprocess.Popen(sleeper, start_new_session=True)
    print(hidden.pid, detached.pid, reaper.pid, flush=True)
    time.sleep(600)
""")


def _driver(tmp_path, tag: str) -> tuple[subprocess.Popen, list[int]]:
    procs = str(tmp_path / lifecycle.PROCS)
    (tmp_path / "run-tmp").mkdir()
    p = subprocess.Popen([sys.executable, "-c", DRIVER, tag, procs, str(tmp_path / "run-tmp")], stdout=subprocess.PIPE,
                         text=True,
                         cwd=os.getcwd(), start_new_session=True)
    pids = [int(x) for x in p.stdout.readline().split()]
    t0 = time.monotonic()
    while not (os.path.exists(procs) and len(json.load(open(procs))) >= 2) and time.monotonic() - t0 < 10:
        time.sleep(0.1)  # the reaper's first snapshot (every second)
    return p, pids


def _gone(pids: list[int], within: float) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        if not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("how", ["driver", "group"])
def test_whatever_kills_the_driver_its_processes_follow_within_seconds(tmp_path, how):
    tag = lifecycle.tag_of(str(tmp_path), "r1")
    driver, (hidden, detached, reaper) = _driver(tmp_path, tag)
    assert [p.pid for p in lifecycle.tagged(tag)] == [detached]  # the hidden one is not visible by its tag
    os.kill(driver.pid, signal.SIGKILL) if how == "driver" else os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert _gone([hidden, detached], within=5), "the driver's processes outlived it"
    assert _gone([reaper], within=5) and not os.path.exists(tmp_path / lifecycle.PROCS)
    assert not (tmp_path / "run-tmp").exists()  # the run's temporary directory went with it


def test_a_clean_release_ends_the_reaper_the_run_directory_and_the_lock(tmp_path):
    run = lifecycle.claim(str(tmp_path), "127.0.0.1", [])
    assert os.path.isdir(run.tmp) and run.tmp.startswith(lifecycle.TMP_PREFIX_PATH)
    reaper = lifecycle.start_reaper(run.tag, str(tmp_path / lifecycle.PROCS), run.tmp)
    lifecycle.release(run, reaper)
    assert reaper.returncode is not None and not os.path.exists(run.tmp)
    again = lifecycle.claim(str(tmp_path), "127.0.0.1", [])  # the lock is free again
    again.lock.close()
    os.rmdir(again.tmp)


def test_a_second_server_on_a_data_dir_is_refused_naming_the_first(tmp_path):
    run = lifecycle.claim(str(tmp_path), "127.0.0.1", [], {"port": 8123})
    with pytest.raises(lifecycle.StartError, match=rf"pid {os.getpid()}, port 8123"):
        lifecycle.claim(str(tmp_path), "127.0.0.1", [])
    run.lock.close()
    os.rmdir(run.tmp)


def test_the_next_start_ends_what_a_dead_run_of_its_data_dir_left(tmp_path):
    """The reaper died too (a kill of everything): the lock is free, the run's tagged processes and those in its
    last note are ended by the next start; another data dir's are not touched."""
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    env = {**os.environ, lifecycle.TAG: lifecycle.tag_of(str(tmp_path), "dead")}
    tagged = subprocess.Popen(sleeper, env=env, start_new_session=True)
    noted = subprocess.Popen(sleeper, start_new_session=True)
    other = subprocess.Popen(sleeper, env={**os.environ, lifecycle.TAG: lifecycle.tag_of(str(tmp_path / "x"), "r")},
                             start_new_session=True)
    note = [[noted.pid, psutil.Process(noted.pid).create_time()]]
    (tmp_path / lifecycle.PROCS).write_text(json.dumps(note))
    dead_tmp = tempfile.mkdtemp(prefix=lifecycle.TMP_PREFIX, dir="/tmp")
    (tmp_path / lifecycle.LOCK).write_text(json.dumps({"pid": 1, "tmp": dead_tmp}))  # what the dead run wrote
    try:
        run = lifecycle.claim(str(tmp_path), "127.0.0.1", [])
        tagged.wait(5), noted.wait(5)  # ended (their status was reaped by the claim's wait, so not -9 here)
        assert other.poll() is None and run.tag.startswith(os.path.realpath(tmp_path) + "|")
        assert not os.path.exists(dead_tmp)  # its temporary directory reclaimed
        run.lock.close()
        os.rmdir(run.tmp)
    finally:
        for p in (tagged, noted, other):
            p.kill()
            p.wait()


def test_a_port_held_by_something_else_is_one_line_naming_it_and_exit_1(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-c", "import sys; from mergeserve.cli import main; sys.exit(main())",
                              "serve", "--data-dir", str(tmp_path / "d"), "--port", str(port)],
                             capture_output=True, text=True, timeout=60)
        took = time.monotonic() - t0
    assert out.returncode == 1 and took < 15, (out.returncode, took)
    assert out.stderr.count("\n") == 1 and f"port {port} is in use by pid {os.getpid()}" in out.stderr, out.stderr
    assert "ray" not in out.stdout.lower()  # refused before Ray started


def test_connections_left_in_time_wait_do_not_hold_a_port():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        c = socket.create_connection(("127.0.0.1", port))
        conn, _ = srv.accept()
        conn.close()  # the server side closes first: its end goes to TIME-WAIT
        c.close()
    assert lifecycle.listener(port, "127.0.0.1") is None
