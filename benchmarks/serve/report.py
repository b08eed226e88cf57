"""``bench-serve --peers``' tables and the issue's targets, from the results dict."""

from __future__ import annotations

from collections.abc import Sequence

from .compare import PEERS, TITLES


def _ratio(row: dict, peer: str, me: str = "mergeserve") -> float:
    """``me``'s req/s over ``peer``'s in one cell (nan when either is missing)."""
    ms, other = row.get(me), row.get(peer)
    return ms["rps"] / other["rps"] if ms and other and other["rps"] else float("nan")


def format_peers_table(res: dict, peers: Sequence[str] = PEERS) -> str:
    """Rows = cells; per peer: req/s, images/s, p50/p99 ms; then req/s ratios and errors: mergeserve /
    plain through the main port (like for like), the same through direct ingress, and mergeserve's main
    port / the plain app behind Serve's Python proxy (each as it ships)."""
    w = 32
    head1 = (f"{'cell':<16}" + "".join(f"| {TITLES.get(p, p):<{w - 2}}" for p in peers)
             + "| ms/plain | D/D     | ms/py   | errors")
    head2 = f"{'img × clients':<16}" + f"| {'req/s':>6} {'img/s':>6} {'p50ms':>7} {'p99ms':>7} " * len(peers) + "|"
    lines = [head1, head2, "-" * len(head1)]
    for (n_img, clients), row in res["cells"].items():
        s = f"{n_img:>3} × {clients:<10}  "
        for p in peers:
            r = row.get(p)
            s += (f"| {r['rps']:>6.1f} {r['images_per_s']:>6.0f} {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} "
                  if r else f"| {'-':>6} {'-':>6} {'-':>7} {'-':>7} ")
        errs = "/".join(str(row[p]["errors"] + row[p]["warmup_errors"]) if p in row else "-" for p in peers)
        lines.append(s + f"| {_ratio(row, 'plain'):>7.2f}× | {_ratio(row, 'plain-direct', 'mergeserve-direct'):>6.2f}× "
                     f"| {_ratio(row, 'plain-proxy'):>6.2f}× | {errs}")
    return "\n".join(lines)


def format_cpu_table(res: dict, peers: Sequence[str] = PEERS) -> str:
    """Server CPU ms per request by role (and the load generator's), per cell and peer."""
    roles = ("proxy", "replica", "ray-rest", "total", "loadgen")
    lines = [f"{'cell':<14}{'peer':<18}" + "".join(f"{r:>10}" for r in roles), "-" * 82]
    for (n_img, clients), row in res["cells"].items():
        for p in peers:
            r = row.get(p)
            if not r or "server_cpu_s" not in r or not r["requests"]:
                continue
            cpu, n = r["server_cpu_s"], r["requests"]
            app = p.removesuffix("-direct").removesuffix("-proxy")
            replica = sum(v for k, v in cpu.items() if k == "replica:" + app or k == "uvicorn")
            proxy = cpu.get("proxy", 0.0)
            total = sum(cpu.values())
            vals = (proxy, replica, total - proxy - replica, total, r["loadgen_cpu_s"])
            lines.append(f"{n_img:>3} × {clients:<9}{TITLES.get(p, p):<18}"
                         + "".join(f"{1e3 * v / n:>10.2f}" for v in vals))
    return "\n".join(lines)


def check_targets(res: dict) -> list[tuple[str, bool | None, str]]:
    """The issue's targets: ``(target, passed or None when not measured, numbers)``.

    The ratio target is checked three ways: mergeserve as shipped (its main port, Serve's HAProxy) against a
    plain Ray Serve app as deployed by default (Serve's Python proxy), and like for like on each path (both
    apps behind the same HAProxy; both on their replicas' own ports). The concurrency and 50 % targets are
    checked on each of mergeserve's two paths.
    """
    cells, out = res["cells"], []

    def rps(cell: tuple[int, int], peer: str) -> float | None:
        r = cells.get(cell, {}).get(peer)
        return r["rps"] if r else None

    for me, peer in (("mergeserve", "plain-proxy"), ("mergeserve", "plain"), ("mergeserve-direct", "plain-direct")):
        ratios = {c: (rps(c, me) or 0) / rps(c, peer) for c in cells if rps(c, peer)}
        if ratios and any(rps(c, me) for c in cells):
            worst = min(ratios, key=ratios.get)
            out.append((f"{TITLES[me]} ≥ 1.0× {TITLES[peer]} in every cell", all(v >= 1.0 for v in ratios.values()),
                        f"lowest {ratios[worst]:.2f}× at {worst[0]} img × {worst[1]} clients"))
    for me in ("mergeserve", "mergeserve-direct"):
        a, b = cells.get((1, 4), {}).get(me), cells.get((1, 16), {}).get(me)
        if a and b:
            out.append((f"{TITLES[me]} req/s non-decreasing 4 → 16 clients (1 img)", b["rps"] >= a["rps"],
                        f"{a['rps']:.1f} → {b['rps']:.1f} req/s"))
            out.append((f"{TITLES[me]} p99 at 16 clients ≤ 2× p99 at 4 (1 img)", b["p99_ms"] <= 2 * a["p99_ms"],
                        f"{b['p99_ms']:.1f} ms vs 2 × {a['p99_ms']:.1f} ms"))
        c = cells.get((16, 16), {}).get(me)
        if c and res.get("inprocess"):
            t = res["inprocess_threads"]
            ref = max(v for k, v in res["inprocess"].items() if k.endswith(f"_t{t}"))
            out.append((f"{TITLES[me]} 16 img × 16 clients images/s ≥ 50 % of in-process",
                        c["images_per_s"] >= 0.5 * ref,
                        f"{c['images_per_s']:.0f} vs in-process {ref:.0f} images/s ({t} thread(s)): "
                        f"{100 * c['images_per_s'] / ref:.0f} %"))
    if "rss_mb" in res:
        for key, what, limit in (("rss", "at rest", 2.0), ("peak", "at its peak (from the launch through the "
                                                             "bootstrap and 20 requests per task)", 3.5)):
            mb, pss = res[f"{key}_mb"], res["pss_mb" if key == "rss" else "peak_pss_mb"]
            out.append((f"summed RSS of the default server {what} ≤ {limit} GB", mb <= limit * 1024,
                        f"{mb / 1024:.2f} GB (PSS {pss / 1024:.2f} GB)"))
    if "ready_s" in res:
        out.append(("mergeserve serve → first 200 /readyz ≤ 90 s", res["ready_s"] <= 90, f"{res['ready_s']:.1f} s"))
    return out
