"""Fault injection: the process is killed at each phase boundary of an ingest job, then restarted.

After every crash the store and the database agree, no half-written file remains, version numbers never
collide, and the accepted job ends ``succeeded`` (resumed, retried, or — when the crash came before the
202 — resubmitted by the client).
"""

import json
import os
import subprocess
import sys

POINTS = ["after-data-write", "during-training", "after-adapter-write", "after-db-record", "during-swap"]


def test_kill_at_each_phase_then_restart(tmp_path):
    runner = os.path.join(os.path.dirname(__file__), "_faults_runner.py")
    out = subprocess.run([sys.executable, runner, str(tmp_path), *POINTS], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    results = {r["point"]: r for r in map(json.loads, out.stdout.splitlines())}
    assert set(results) == set(POINTS)
    for point, r in results.items():
        assert r["exit"] == 137, (point, "the crash point was not reached")
        assert r["store"] == r["db_names"], (point, r)  # store and database agree
        assert r["tmp"] == [], (point, r)
        assert len(set(r["versions"])) == len(r["versions"])
        status, attempts, version = r["jobs"]["d2"]
        assert status == "succeeded" and r["active"] == version and r["domains"] == ["d1", "d2"], (point, r)
    assert results["during-training"]["jobs"]["d2"][1] == 2  # retried from its persisted data
    assert results["after-adapter-write"]["recovered"]["quarantined"] == ["global@v2"]
    assert results["after-adapter-write"]["jobs"]["d2"][2] == 3  # v2 is taken by the quarantined file
    for p in ("after-db-record", "during-swap"):  # recorded before the crash: only the swap is redone
        assert results[p]["recovered"]["resume_swap"] and results[p]["jobs"]["d2"][1] == 1
