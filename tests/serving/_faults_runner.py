"""Kill the ingest pipeline at each phase boundary (os._exit, as SIGKILL), restart, and report the state.

Run as ``python _faults_runner.py DIR POINT...``; prints one JSON line per point. The parent imports torch
but runs no torch op, so forking a child per phase is safe.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from _pipeline_util import LocalWorker, config, run_all, submission  # noqa: E402

from serving.pipeline import Pipeline  # noqa: E402


def _child(fn) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        finally:
            os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def scenario(root: str, point: str) -> dict:
    cfg = config(os.path.join(root, point), train={"steps": 10, "batch_size": 8, "lr": 0.05})
    out_file = os.path.join(root, f"{point}.json")

    def before() -> None:
        pipe, worker = Pipeline(cfg), LocalWorker(cfg)
        pipe.accept(submission("d1"))
        run_all(pipe, worker)
        os.environ["MERGESERVE_CRASH_AT"] = point
        pipe.accept(submission("d2", seed=1))
        run_all(pipe, worker)

    def after() -> None:
        pipe, worker = Pipeline(cfg), LocalWorker(cfg)
        rec = pipe.recover()
        if "d2" not in {j["domain"] for j in pipe.db.jobs(("queued", "swapping"))}:
            if not any(j["domain"] == "d2" for j in pipe.db.jobs(("succeeded",))):
                pipe.accept(submission("d2", seed=1))  # no 202 was sent: the client retries
        run_all(pipe, worker)
        jobs = pipe.db.jobs(("succeeded", "failed", "rejected", "queued", "training", "merging", "swapping"))
        versions = pipe.db.versions()
        for v in versions:
            pipe.store.verify(v["name"])  # every recorded version is complete and intact
        state = {
            "recovered": rec,
            "jobs": {j["domain"]: [j["status"], j["attempts"], j["version"]] for j in jobs},
            "versions": [v["version"] for v in versions],
            "store": sorted(pipe.store.names()),
            "db_names": sorted(v["name"] for v in versions),
            "tmp": [f for d in ("adapters", "domains") for f in os.listdir(cfg.path(d)) if ".tmp" in f],
            "active": pipe.active,
            "domains": sorted(pipe.db.domain_names()),
        }
        with open(out_file, "w") as f:
            json.dump(state, f)

    crashed = _child(before)
    _child(after)
    with open(out_file) as f:
        return {"point": point, "exit": crashed, **json.load(f)}


if __name__ == "__main__":
    for p in sys.argv[2:]:
        print(json.dumps(scenario(sys.argv[1], p)), flush=True)
