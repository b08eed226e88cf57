"""What one ``mergeserve serve`` run owns on its machine, and how the next start deals with what a killed run left.

A server is a process tree: the driver (``mergeserve serve``), Ray's GCS and raylet, the actors' worker
processes, and Serve's HAProxy. Ray ties its own processes to the driver (they die with it, even on
SIGKILL), but HAProxy runs in a process group of its own and survives: it keeps the main port, and the
next start fails inside Serve ("cannot bind socket"), after Ray is up. Three mechanisms close that gap:

* **A tag.** Before Ray starts, the driver sets ``MERGESERVE_RUN=<data dir>|<run id>`` in its environment;
  every process Ray starts inherits it (HAProxy included), so a run's processes can be found by their
  environment alone.
* **A reaper.** A small process in a session of its own, started before Ray, holds the read end of a pipe
  whose write end only the driver has, and notes the driver's descendants every second (Ray's workers
  rename themselves, which hides their environment, so the tag alone misses them). However the driver
  ends (a clean stop, SIGKILL, the OOM killer, a supervisor's short stop timeout), the pipe closes and the
  reaper kills every process it noted or that carries the run's tag, within about a second, and removes
  the run's temporary directory (where Serve's HAProxy keeps its config and sockets; by default they pile
  up under /tmp/haproxy-serve, one folder per start).
* **A lock on the data dir.** The driver holds ``flock`` on ``<data dir>/server.lock`` (JSON: pid, run,
  ports) for its whole life; the kernel releases it when the process dies. The next start on the same
  data dir takes the lock (a live server holding it is a one-line error), then kills whatever is still
  tagged with that data dir or listed in the reaper's last note (``server.procs.json``: for a reaper that
  was killed too), and checks its ports: a port held by anything else is a one-line error naming the port
  and its holder, before Ray starts.

Linux and macOS (``psutil`` reads other processes' environments on both); the lock uses ``fcntl``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import IO

import psutil

from training.artifacts import write_json

TAG = "MERGESERVE_RUN"
LOCK = "server.lock"
TMP_PREFIX = "ms-run-"  # short: HAProxy refuses socket paths over 97 bytes, and adds a 56-byte node id
TMP_DIR = "/tmp" if os.path.isdir("/tmp") else None  # None: tempfile's default
TMP_PREFIX_PATH = os.path.join(TMP_DIR, TMP_PREFIX) if TMP_DIR else TMP_PREFIX
PROCS = "server.procs.json"  # the reaper's last list of the run's processes: (pid, start time)


class StartError(RuntimeError):
    """Why this server cannot start here (one line, for the operator)."""


def tag_of(data_dir: str, run: str) -> str:
    return f"{os.path.realpath(data_dir)}|{run}"


def tagged(prefix: str) -> list[psutil.Process]:
    """Processes whose ``MERGESERVE_RUN`` starts with ``prefix`` (``<data dir>|`` or a whole tag), this one excluded."""
    out = []
    for p in psutil.process_iter():
        if p.pid == os.getpid():
            continue
        try:
            if p.environ().get(TAG, "").startswith(prefix):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return out


def kill_tagged(prefix: str, timeout: float = 10.0) -> list[int]:
    """SIGKILL every process tagged ``prefix`` and wait (up to ``timeout`` s) until they are gone; their pids."""
    procs = tagged(prefix)
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    psutil.wait_procs(procs, timeout=timeout)
    return [p.pid for p in procs]


# --- the reaper ----------------------------------------------------------------------------------
def start_reaper(tag: str, procs_file: str, tmp: str) -> subprocess.Popen:
    """Start the reaper of this process's run; keep the returned object (its stdin is the pipe) for the
    process's life.

    The reaper runs in a new session (so killing the server's process group spares it) and without the
    tag (so it never kills itself). Closing its stdin, by exiting or explicitly, makes it act.
    """
    env = {k: v for k, v in os.environ.items() if k != TAG}
    cmd = [sys.executable, "-m", "serving.lifecycle", tag, str(os.getpid()), procs_file, tmp]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def release(run: Run, reaper: subprocess.Popen, timeout: float = 15.0) -> None:
    """A clean stop's last step: the reaper ends whatever Ray left (nothing, usually) and removes the run's
    temporary directory, then the lock goes."""
    reaper.stdin.close()
    try:
        reaper.wait(timeout)
    except subprocess.TimeoutExpired:
        reaper.kill()
    run.lock.close()


def _key(p: psutil.Process) -> tuple[int, float] | None:
    try:
        return p.pid, p.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def kill_known(known: list[list[float]] | set[tuple[int, float]], timeout: float = 10.0) -> list[int]:
    """SIGKILL processes given as ``(pid, create time)`` that still run (a reused pid has another start time)."""
    procs = []
    for pid, created in known:
        try:
            p = psutil.Process(int(pid))
            if abs(p.create_time() - created) < 0.01:
                p.send_signal(signal.SIGKILL)
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    psutil.wait_procs(procs, timeout=timeout)
    return [p.pid for p in procs]


def reap(tag: str, driver: int, procs_file: str, tmp: str, stdin: IO[bytes], every_s: float = 1.0) -> None:
    """The reaper's body: until the driver goes (EOF on ``stdin``), note its descendants every ``every_s``
    (in ``procs_file`` too, for a next start in case the reaper is killed as well); then kill them and
    whatever carries ``tag``.

    Both are needed: Ray's workers rename themselves (``setproctitle``), which overwrites what the kernel
    shows of their environment, so the tag finds only the processes that do not (GCS, raylet, HAProxy);
    and a process orphaned before a snapshot is no longer anyone's descendant.
    """
    known: set[tuple[int, float]] = set()
    try:
        root = psutil.Process(driver)
    except psutil.NoSuchProcess:
        root = None
    while True:
        ready, _, _ = select.select([stdin], [], [], every_s)
        if ready and not stdin.read1(4096):
            break
        if root is None:
            continue
        try:
            now = {k for p in root.children(recursive=True) if p.pid != os.getpid() and (k := _key(p))}
        except psutil.NoSuchProcess:
            continue
        if not now <= known:
            known |= now
            write_json(procs_file, sorted(known))  # atomic: the next start reads it
    kill_known(known)
    kill_tagged(tag)  # this run only: a later run on the same data dir has another run id
    shutil.rmtree(tmp, ignore_errors=True)
    if os.path.exists(procs_file):
        os.remove(procs_file)


# --- the next start ------------------------------------------------------------------------------
def listener(port: int, host: str = "") -> str | None:
    """Who listens on TCP ``port``: ``pid N (command)``, a phrase when that cannot be read, or None when
    nothing listens (connections left in TIME-WAIT by a process that just ended hold no port for good)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("" if host in ("0.0.0.0", "::") else host, port))
            return None
        except OSError as e:
            if e.errno not in (errno.EADDRINUSE, errno.EACCES):
                raise
    try:
        conns = [c for c in psutil.net_connections(kind="tcp") if c.laddr and c.laddr.port == port]
    except (psutil.AccessDenied, OSError):  # macOS without root
        return "another process (not visible to this user)"
    for c in conns:
        if c.status == psutil.CONN_LISTEN:
            try:
                return f"pid {c.pid} ({' '.join(psutil.Process(c.pid).cmdline())[:100]})" if c.pid else "a process"
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                return f"pid {c.pid}"
    return None


def check_ports(host: str, ports: list[int], wait_s: float = 5.0) -> None:
    """Nothing listens on ``ports``, waiting ``wait_s`` for listeners of processes that are going away.

    Raises:
        StartError: naming the first busy port and its holder.
    """
    deadline = time.monotonic() + wait_s
    for port in ports:
        while (who := listener(port, host)) is not None:
            if time.monotonic() > deadline:
                raise StartError(f"port {port} is in use by {who}; stop it or choose another port "
                                 "(--port / --direct-port)")
            time.sleep(0.2)


@dataclass
class Run:
    """What :func:`claim` hands the server: keep ``lock`` open for the process's life."""

    lock: IO[str]  # the data dir's lock file, held (flock) until the process ends
    tag: str  # MERGESERVE_RUN for every process of the run
    tmp: str  # the run's own temporary directory (HAProxy's config and sockets): removed when it ends


def _previous(f: IO[str]) -> dict:
    f.seek(0)
    try:
        return json.loads(f.read() or "{}")
    except ValueError:
        return {}


def claim(data_dir: str, host: str, ports: list[int], info: dict | None = None) -> Run:
    """Make this process the one server of ``data_dir`` on this machine.

    Takes the data dir's lock, kills processes an earlier (dead) run of this data dir left behind and
    removes its temporary directory, checks the ports, makes this run's temporary directory, and writes
    its pid, run id, ports and directory into the lock file.

    Raises:
        StartError: another live server holds the data dir, or a port is held by something else.
    """
    os.makedirs(data_dir, exist_ok=True)
    f = open(os.path.join(data_dir, LOCK), "a+")  # noqa: SIM115 - held open for the process's life
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = _previous(f)
        f.close()
        raise StartError(f"another server (pid {other.get('pid', '?')}, port {other.get('port', '?')}) is running "
                         f"on the data dir {data_dir}; stop it, or give this one its own --data-dir") from None
    before = _previous(f)
    procs_file = os.path.join(data_dir, PROCS)
    try:
        with open(procs_file) as pf:
            noted = json.load(pf)
    except (OSError, ValueError):
        noted = []
    stale = kill_known(noted) + kill_tagged(tag_of(data_dir, ""))
    if stale:
        print(f"mergeserve: stopped {len(stale)} processes an earlier run on {data_dir} left behind "
              f"(pids {stale[:8]})", file=sys.stderr, flush=True)
    if before.get("tmp", "").startswith(TMP_PREFIX_PATH):  # the dead run's, reclaimed
        shutil.rmtree(before["tmp"], ignore_errors=True)
    try:
        check_ports(host, ports, wait_s=5.0 if stale else 1.0)  # a just-ended process's sockets take a moment
    except StartError:
        f.close()
        raise
    run = uuid.uuid4().hex[:12]
    # under /tmp, not $TMPDIR: HAProxy's Unix sockets go in <tmp>/<56-hex node id>/, and a socket path is
    # limited to ~104 bytes (macOS's $TMPDIR alone is ~50)
    tmp = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=TMP_DIR)
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "run": run, "ports": ports, "started": time.time(), "tmp": tmp,
                        **(info or {})}))
    f.flush()
    return Run(f, tag_of(data_dir, run), tmp)


if __name__ == "__main__":  # the reaper: python -m serving.lifecycle <tag>
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the driver's end (EOF) makes it act
    reap(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.stdin.buffer)
