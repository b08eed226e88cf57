"""The ingest pipeline without Ray: acceptance rules, the activation gate, recovery, version numbers."""

import asyncio
import os

import numpy as np
import pytest
import torch
from _pipeline_util import LocalWorker, activate_fn, config, run_all, submission, task_submission

from serving.errors import Problem
from serving.pipeline import Pipeline, gate
from serving.worker import IngestWorker


@pytest.fixture(scope="module")
def worker_cfg(tmp_path_factory):
    return config(str(tmp_path_factory.mktemp("pipe")))


def test_gate_rules():
    ok = gate({"a": 0.9}, {"a": 0.8, "b": 0.7}, "b", 0.3, 0.2, True)
    assert ok["passed"] and ok["drops"] == {"a": pytest.approx(0.1)}
    drop = gate({"a": 0.9}, {"a": 0.5, "b": 0.7}, "b", 0.3, 0.2, True)
    assert not drop["passed"] and "a fell" in drop["reasons"][0]
    no_gain = gate({}, {"b": 0.3}, "b", 0.3, 0.2, True)
    assert not no_gain["passed"] and "zero-shot" in no_gain["reasons"][0]
    assert gate({}, {"b": 0.3}, "b", 0.3, 0.2, False)["passed"]
    assert gate({}, {"b": 1.0}, "b", 1.0, 0.2, True)["passed"]  # nothing left to gain is not a failure


def test_accept_rejects_without_writing(tmp_path):
    pipe = Pipeline(config(str(tmp_path)))
    cases = {
        "invalid-domain-name": submission("nl\n"),
        "unknown-method": submission("d", method="nope"),
        "bad-hyper-parameter": submission("d", hyper={"lr": 1e30}),
    }
    for code, s in cases.items():
        with pytest.raises(Problem) as e:
            pipe.accept(s)
        assert e.value.code == code and e.value.status == 422
    for hyper, field in (({"steps": "abc"}, "steps"), ({"every": 0}, "every"), ({"steps": 10**6}, "steps"),
                         ({"density": 0.2}, "density")):
        with pytest.raises(Problem) as e:
            pipe.accept(submission("d", hyper=hyper))
        assert field in e.value.detail, e.value.detail
    assert not os.path.exists(tmp_path / "domains") and pipe.db.jobs() == []


def test_idempotency_key_bound_to_the_request(tmp_path):
    pipe = Pipeline(config(str(tmp_path)))
    job, replayed = pipe.accept(submission("d1", key="k"))
    again, replayed2 = pipe.accept(submission("d1", key="k"))
    assert not replayed and replayed2 and again["id"] == job["id"]
    with pytest.raises(Problem) as e:
        pipe.accept(submission("d1", seed=5, key="k"))
    assert e.value.code == "idempotency-key-reused"


def test_learn_then_gate_rejects_a_broken_merge(tmp_path):
    cfg = config(str(tmp_path), gate={"max_drop": 0.2, "require_gain": True})
    pipe, worker = Pipeline(cfg), LocalWorker(cfg)
    pipe.accept(submission("d1"))
    (first,) = run_all(pipe, worker)
    assert first["status"] == "succeeded" and pipe.active == 1, first
    acc1 = pipe.db.accuracy(1)["d1"]
    assert acc1 > 0.6, "precondition: the first domain is learned"

    class Broken(IngestWorker):  # what lr=1e30 did before hyper-parameters were bounded
        def _train(self, *args, **kwargs):
            temp, info, d = super()._train(*args, **kwargs)
            g = torch.Generator().manual_seed(0)
            return {k: torch.randn(v.shape, generator=g) * 100 for k, v in temp.items()}, info, d

    pipe.accept(submission("d2", seed=1, method="finetune"))
    (bad,) = run_all(pipe, LocalWorker(cfg, Broken))
    assert bad["status"] == "rejected" and pipe.active == 1, bad
    assert bad["gate"]["drops"]["d1"] > 0.2 and not bad["gate"]["passed"]
    assert pipe.db.version(bad["version"]) is not None and "d2" not in pipe.db.domain_names()
    # the operator can still activate the rejected version explicitly
    asyncio.run(activate_fn(pipe)(bad["version"]))
    assert pipe.active == bad["version"]


def test_no_gain_is_rejected(tmp_path):
    cfg = config(str(tmp_path), gate={"max_drop": 1.0, "require_gain": True})
    pipe = Pipeline(cfg)
    pipe.accept(submission("d1", hyper={"lr": 1e-9, "steps": 1}, method="finetune"))
    (job,) = run_all(pipe, LocalWorker(cfg))
    assert job["status"] == "rejected" and "zero-shot" in job["error"] and pipe.active == 0


def test_recover_quarantines_unrecorded_adapters_and_numbers_never_collide(tmp_path):
    cfg = config(str(tmp_path))
    pipe, worker = Pipeline(cfg), LocalWorker(cfg)
    pipe.accept(submission("d1"))
    run_all(pipe, worker)
    # a crash left global@v2 on disk (not recorded) and a temporary file
    tensors = pipe.store.load("global@v1")[0]
    man = pipe.store.manifest("global@v1").model_copy(update={"name": "global@v2"})
    pipe.store.save(tensors, man)
    open(os.path.join(pipe.store.root, "global@v3.safetensors.tmp-123"), "wb").close()
    pipe.db.close()
    pipe = Pipeline(cfg)
    done = pipe.recover()
    assert done["quarantined"] == ["global@v2"] and "global@v2" not in pipe.store.names()
    assert not [f for f in os.listdir(pipe.store.root) if ".tmp-" in f]
    assert pipe.next_version() == 3  # above the quarantined v2
    pipe.accept(submission("d2", seed=1))
    (job,) = run_all(pipe, worker)
    assert job["status"] == "succeeded" and job["version"] == 3


def test_interrupted_jobs_requeue_in_order_with_bounded_attempts(tmp_path):
    cfg = config(str(tmp_path), max_attempts=2)
    pipe = Pipeline(cfg)
    a = pipe.accept(submission("da"))[0]
    b = pipe.accept(submission("db", seed=1))[0]
    pipe.db.update_job(a["id"], status="training", attempts=1)
    pipe.db.update_job(b["id"], status="merging", attempts=2)
    done = pipe.recover()
    assert done["requeued"] == [a["id"]] and done["gave_up"] == [b["id"]]
    assert pipe.db.job(b["id"])["status"] == "failed" and "2 attempts" in pipe.db.job(b["id"])["error"]
    (job,) = run_all(pipe, LocalWorker(cfg))
    assert job["id"] == a["id"] and job["status"] == "succeeded" and job["attempts"] == 2


def test_predictions_bounded_and_one_bad_row_drops_alone(tmp_path):
    pipe = Pipeline(config(str(tmp_path)))
    for i in range(30):
        pipe.db.remember_predictions([(f"r{i}-{j}", "d", "a") for j in range(10)], keep=100, ttl_s=3600)
    assert pipe.db.count_predictions() <= 100 and pipe.db.prediction("r29-9") is not None
    dropped = pipe.db.remember_predictions([("ok-1", "d", "a"), ("bad", "\ud800", "a"), ("ok-2", None, "b")],
                                           keep=100, ttl_s=3600)
    assert dropped == 1 and pipe.db.prediction("ok-1") and pipe.db.prediction("ok-2")
    pipe.db.remember_predictions([("late", "d", "a")], keep=100, ttl_s=-1)  # ttl: everything older goes
    assert pipe.db.count_predictions() == 0


def test_split_is_fixed():
    from serving.pipeline import split

    a, b = split(10, 3, 0)
    assert np.array_equal(np.sort(np.concatenate([a, b])), np.arange(10)) and len(b) == 3
    assert np.array_equal(split(10, 3, 0)[1], b)


def test_adaptive_online_learns_alpha_per_domain(tmp_path):
    cfg = config(str(tmp_path))
    pipe, worker = Pipeline(cfg), LocalWorker(cfg)
    pipe.accept(submission("d1", method="pam"))  # a global-LoRA version first: it becomes a stand-in component
    pipe.accept(submission("d2", seed=1, method="adaptive", hyper={"spc": 2, "b_max": 3.0, "fit_steps": 5}))
    pipe.accept(submission("d3", seed=2, shift=1, method="adaptive", hyper={"fit_steps": 5, "base": "linear"}))
    jobs = run_all(pipe, worker)
    assert [j["status"] for j in jobs] == ["succeeded"] * 3, jobs
    v = pipe.db.version(pipe.active)
    assert v["method"] == "adaptive" and set(v["coefficients"]) == {"d1", "d2", "d3"}
    assert all(0 < a < 3.0 for a in v["coefficients"].values())
    comps = [k for k in v["metrics"] if k.startswith("c/")]
    assert comps[0] == "c/global@v1" and len(comps) == 3  # stand-in for d1, then each domain's own adapter
    assert pipe.store.manifest(v["name"]).format == "delta"
    with pytest.raises(Problem) as e:  # factor-space methods can't continue a dense adaptive version
        pipe.accept(submission("d4", seed=3, method="pam"))
    assert e.value.code == "incompatible-method" and e.value.status == 409
    with pytest.raises(Problem) as e:
        pipe.accept(submission("d4", seed=3, method="pam_nope"))
    assert e.value.code == "unknown-method"


def test_pam_adaptive_online_keeps_its_pam_lineage_beside_the_alpha_merge(tmp_path):
    """``pam_adaptive`` online (adaptive.py, ``pam_adaptive``): each domain's temporary is cloned from the
    previous version's shadow global LoRA and aligned with it, the served adapter is the α-merge of the
    temporaries, and the shadow becomes Avg(shadow, temporary) — stored beside the version, deleted with it."""
    import merge
    from serving import versions

    cfg = config(str(tmp_path))
    pipe, worker = Pipeline(cfg), LocalWorker(cfg)
    hyper = {"fit_steps": 3, "every": 2}
    for i, name in enumerate(("d1", "d2", "d3")):
        pipe.accept(submission(name, seed=i, method="pam_adaptive", hyper=hyper))
    jobs = run_all(pipe, worker)
    assert [j["status"] for j in jobs] == ["succeeded"] * 3, [j["error"] for j in jobs]
    rows = [pipe.db.version(v) for v in (1, 2, 3)]
    shadows = [sorted(k for k in r["metrics"] if k.startswith("s/")) for r in rows]
    assert shadows == [[f"s/pam@v{v}"] for v in (1, 2, 3)]
    v3 = rows[2]
    assert set(v3["coefficients"]) == {"d1", "d2", "d3"} and pipe.store.manifest(v3["name"]).format == "delta"
    comps = [k[2:] for k in v3["metrics"] if k.startswith("c/")]
    assert comps == ["domain@d1@v1", "domain@d2@v2", "domain@d3@v3"]
    # the shadow is PAM's running average of the temporaries (factor space), the first one itself
    load = lambda n: pipe.store.load(n)[0]  # noqa: E731
    assert all(torch.equal(load("pam@v1")[k], load("domain@d1@v1")[k]) for k in load("pam@v1"))
    want = merge.average([load("pam@v2"), load("domain@d3@v3")])
    assert all(torch.allclose(load("pam@v3")[k], want[k]) for k in want)
    pipe.set_active(2)  # make v3 deletable: its shadow goes with it, v2's stays
    versions.delete(pipe, 3)
    assert "pam@v3" not in pipe.store.names() and "pam@v2" in pipe.store.names()


@pytest.mark.parametrize("task", ["classify", "vqa"])
def test_each_task_has_its_own_lineage(tmp_path, task):
    """The same pipeline for every task: accept, train, merge, evaluate, record, activate; the data,
    versions and accuracy live in the task's own directory; the labels come from the task's model."""
    root = config(str(tmp_path))
    cfg = root.for_task(task)
    pipe, worker = Pipeline(cfg), LocalWorker(cfg)
    pipe.accept(task_submission(task, "d1"))
    pipe.accept(task_submission(task, "d2", seed=1, method="average", family="shape"))
    done = run_all(pipe, worker)
    assert [j["status"] for j in done] == ["succeeded", "succeeded"], [j["error"] for j in done]
    assert pipe.active == 2 and set(pipe.db.accuracy(2)) == {"d1", "d2"}
    assert pipe.labels == (root.class_names if task == "classify" else worker.w.labels) and pipe.labels
    where = str(tmp_path) if task == "classify" else str(tmp_path / task)
    assert os.path.exists(os.path.join(where, "domains", "d1.safetensors"))
    assert pipe.store.manifest("global@v2").backbone == cfg.backbone
    with pytest.raises(Problem) as e:  # the other lineage is untouched by this one's names
        pipe.accept(task_submission(task, "d1"))
    assert e.value.code == "domain-exists"


def test_vqa_adaptive_fits_alpha_on_buffered_questions(tmp_path):
    """``adaptive`` for VQA: each family's own LoRA, α fit through the task's loss on a replay buffer that
    keeps every buffered image's question (a class being an answer)."""
    from training.buffer import ReplayBuffer

    cfg = config(str(tmp_path)).for_task("vqa")
    pipe, worker = Pipeline(cfg), LocalWorker(cfg)
    hyper = {"spc": 2, "fit_steps": 3}
    pipe.accept(task_submission("vqa", "d1", method="adaptive", hyper=hyper))
    pipe.accept(task_submission("vqa", "d2", seed=1, method="adaptive", family="shape", hyper=hyper))
    done = run_all(pipe, worker)
    assert [j["status"] for j in done] == ["succeeded", "succeeded"], [j["error"] for j in done]
    v = pipe.db.version(2)
    assert v["method"] == "adaptive" and set(v["coefficients"]) == {"d1", "d2"}
    assert pipe.store.manifest("global@v2").format == "delta"
    buf = ReplayBuffer.load(cfg.path("buffer.safetensors"))
    d = buf.domain()
    assert buf.domains() == ["d1", "d2"] and len(d.q_train) == len(d.y_train) == len(buf)
    assert {q.split()[0] for q in d.q_train} == {"how", "what"}  # count and shape questions, kept with their images


def test_domains_from_every_source_meet_at_one_size(tmp_path):
    """The default server's failure (issue 24): the bootstrap's built-in domain (digits5, made at 32 px), then
    uploads at the backbone's 64 px; the replay buffer, evaluation and the α fit read them together."""
    from serving.pipeline import Submission

    digits = [str(i) for i in range(10)]
    cfg = config(str(tmp_path), backbone="efficientnet_lite0_offline", class_names=digits,
                 train={"steps": 2, "batch_size": 8, "lr": 1e-3, "eval_batch": 128})
    pipe, worker = Pipeline(cfg), LocalWorker(cfg)
    rng = np.random.RandomState(0)
    upload = [(rng.randint(0, 255, (30, 3, 64, 64)).astype(np.uint8), np.arange(30) % 10) for _ in range(2)]
    pipe.accept(Submission("mnist", None, {}, None, None, None, source="builtin:digits5/mnist"))
    pipe.accept(Submission("up1", "adaptive", {"fit_steps": 2}, None, *upload[0]))
    pipe.accept(Submission("up2", "adaptive", {"fit_steps": 2}, None, *upload[1]))
    done = run_all(pipe, worker)
    assert [(j["domain"], j["status"]) for j in done] == [("mnist", "succeeded"), ("up1", "succeeded"),
                                                          ("up2", "succeeded")], [j["error"] for j in done]
    assert {worker.w.domain(d).x_train.shape[-1] for d in ("mnist", "up1", "up2")} == {64}
    from training.buffer import ReplayBuffer

    buf = ReplayBuffer.load(cfg.path("buffer.safetensors"))
    assert buf.domains() == ["mnist", "up1", "up2"] and buf.tensors()[0].shape[1:] == (3, 64, 64)


class _DiesFirst(LocalWorker):
    """A worker whose process 'dies' during the first ``n`` jobs it is given (OOM kill, node loss)."""

    def __init__(self, cfg, n: int) -> None:
        super().__init__(cfg)
        self.n = n

    async def run(self, *args):
        if self.n > 0:
            self.n -= 1
            from serving.pipeline import WorkerLost

            raise WorkerLost("training worker died during a job: ActorDiedError")
        return await super().run(*args)


def test_a_lost_worker_requeues_the_job_which_then_succeeds(tmp_path):
    cfg = config(str(tmp_path))
    pipe = Pipeline(cfg)
    pipe.accept(submission("d1"))
    done = run_all(pipe, _DiesFirst(cfg, 1))
    assert [j["status"] for j in done] == ["queued", "succeeded"]  # the lost attempt went back in line
    job = pipe.db.job(done[-1]["id"])
    assert job["attempts"] == 2 and [h["attempt"] for h in job["history"]] == [1]
    assert "ActorDiedError" in job["history"][0]["cause"] and pipe.active == 1


def test_a_job_that_kills_its_worker_every_time_fails_naming_each_attempt(tmp_path):
    cfg = config(str(tmp_path), max_attempts=3)
    pipe = Pipeline(cfg)
    pipe.accept(submission("d1"))
    done = run_all(pipe, _DiesFirst(cfg, 99))
    job = done[-1]
    assert [j["status"] for j in done] == ["queued", "queued", "failed"] and job["attempts"] == 3
    assert job["error"].startswith("gave up after 3 attempts (the training worker died on every attempt")
    assert [h["attempt"] for h in job["history"]] == [1, 2, 3] and pipe.active == 0


def test_retention_deletes_what_no_rollback_needs_and_frees_its_domains(tmp_path):
    cfg = config(str(tmp_path), keep_versions=0)
    pipe, worker = Pipeline(cfg), LocalWorker(cfg)
    for i, name in enumerate(("d1", "d2")):
        pipe.accept(submission(name, seed=i))
        run_all(pipe, worker)
    assert [v["version"] for v in pipe.db.versions()] == [0, 1, 2]  # a chain: every version is an ancestor
    asyncio.run(activate_fn(pipe)(1))  # roll back: v2 is no longer on the active version's chain
    pipe.accept(submission("d3", seed=3))
    run_all(pipe, worker)  # v3 (parent v1) recorded: retention deletes v2
    assert [v["version"] for v in pipe.db.versions()] == [0, 1, 3] and "global@v2" not in pipe.store.names()
    assert "d2" not in pipe.db.domain_names()  # learned by v2 alone: it may be learned again
    pipe.accept(submission("d2", seed=1))
    assert [j["status"] for j in run_all(pipe, worker)] == ["succeeded"]
