"""Feedback counted once per prediction, with the version that answered, and the gauges an alert reads
(accuracy lost against the parent version, the queue, a silent job), without Ray."""

import re

import pytest
from _pipeline_util import config

from serving.controller import task_state
from serving.errors import Problem
from serving.metrics import ServerMetrics
from serving.pipeline import Pipeline


def _learn(pipe: Pipeline, version: int, parent: int | None, acc: dict, domain: str | None = None) -> None:
    job = None if domain is None else {"id": f"j{version}", "domain": domain, "n_train": 4, "n_heldout": 1}
    pipe.db.record_version(job, version, f"global@v{version}", parent, "pam", sorted(acc), {}, "sha", acc)
    pipe.set_active(version)


@pytest.fixture
def pipe(tmp_path):
    p = Pipeline(config(str(tmp_path)))
    _learn(p, 0, None, {})
    _learn(p, 1, 0, {"d": 0.9}, "d")
    return p


def test_a_retried_feedback_counts_once_and_names_the_version_that_answered(pipe):
    pipe.db.remember_predictions([("r1", "d", "a", 1), ("r2", "d", "b", 1)], keep=100, ttl_s=3600)
    _learn(pipe, 2, 1, {"d": 0.9, "e": 0.8}, "e")  # a swap between the prediction and its feedback
    first = pipe.feedback("r1", None, "a", None)
    again = pipe.feedback("r1", None, "a", None)
    assert first == {"domain": "d", "correct": True, "version": 1, "feedback_accuracy": 1.0, "n": 1, "replayed": False}
    assert again == {**first, "replayed": True}
    with pytest.raises(Problem) as e:
        pipe.feedback("r1", None, "b", None)
    assert e.value.status == 409 and e.value.code == "feedback-conflict"
    wrong = pipe.feedback("r2", None, "a", None)
    assert wrong["n"] == 2 and wrong["feedback_accuracy"] == 0.5 and not wrong["correct"]
    explicit = pipe.feedback(None, "d", "a", "a")  # no request id: judges the active version
    assert explicit["version"] == 2 and explicit["n"] == 3 and not explicit["replayed"]


def test_feedback_is_a_counter_per_task_domain_version_and_verdict():
    m = ServerMetrics(("classify", "vqa"))
    m.count_feedback("classify", "d", 3, True)
    m.count_feedback("classify", "d", 3, True)
    m.count_feedback("classify", "d", 3, False)
    text = m.render({}, True).decode()
    assert 'mergeserve_feedback_total{correct="true",domain="d",task="classify",version="3"} 2.0' in text
    assert 'mergeserve_feedback_total{correct="false",domain="d",task="classify",version="3"} 1.0' in text
    for task in ("classify", "vqa"):  # job and swap series carry the task from the start
        assert f'mergeserve_ingest_jobs_total{{status="failed",task="{task}"}} 0.0' in text
        assert f'mergeserve_swap_seconds_count{{task="{task}"}} 0.0' in text


def test_the_drop_gauge_names_the_active_version_and_ends_with_a_rollback(pipe):
    _learn(pipe, 2, 1, {"d": 0.6, "e": 0.8}, "e")
    m = ServerMetrics()
    text = m.render({"classify": task_state(pipe)}, True).decode()
    drop = re.search(r'^mergeserve_domain_accuracy_drop\{(.*)\} (\S+)$', text, re.M)
    assert drop.group(1) == 'domain="d",parent="1",task="classify",version="2"'
    assert float(drop.group(2)) == pytest.approx(0.3)
    pipe.set_active(1)  # rollback: v1's parent (v0) knew no domain, so no fall is left
    assert "mergeserve_domain_accuracy_drop{" not in m.render({"classify": task_state(pipe)}, True).decode()


def test_queue_and_a_silent_job_are_gauges(pipe):
    pipe.db.add_job("q1", "x", "pam", {}, None, "h", 4, 1)
    pipe.db.add_job("t1", "y", "pam", {}, None, "h2", 4, 1)
    pipe.db.update_job("t1", status="training")
    now = pipe.db.job("t1")["updated"] + 600
    st = task_state(pipe, now)
    assert st.queued == 1 and st.oldest_queued_s >= 600 and st.stalled_s == pytest.approx(600)
    text = ServerMetrics().render({"classify": st}, True).decode()
    assert 'mergeserve_ingest_queued{task="classify"} 1.0' in text
    assert 'mergeserve_ingest_stalled_seconds{task="classify"} 600.0' in text
