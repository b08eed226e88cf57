"""The job event stream's generator (serving/sse.py), driven by a stand-in for the controller."""

import asyncio
import json

from serving.sse import job_events


def _job(status: str, step: int, loss: float | None = None) -> dict:
    return {"id": "j", "status": status, "progress": {"step": step, "total": 3, "loss": loss}}


def _parse(chunks: list[bytes]) -> list[tuple[str, dict]]:
    out = []
    for block in b"".join(chunks).decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if "event" in fields:
            out.append((fields["event"], json.loads(fields["data"])))
    return out


def _run(rows: list, first: dict, **kw) -> list[bytes]:
    later = iter(rows)

    async def fetch() -> dict:
        r = next(later)
        if isinstance(r, Exception):
            raise r
        return r

    async def collect() -> list[bytes]:
        return [c async for c in job_events(fetch, first, poll_s=0, **kw)]

    return asyncio.run(collect())


def test_only_changes_are_sent_and_the_stream_ends_with_the_job():
    rows = [_job("queued", 0), _job("training", 0), _job("training", 1, 0.9), _job("training", 1, 0.9),
            _job("training", 3, 0.2), _job("merging", 3, 0.2), _job("succeeded", 3, 0.2), _job("never", 0)]
    events = _parse(_run(rows, _job("queued", 0)))
    assert [(k, d["status"], d["progress"]["step"]) for k, d in events] == [
        ("status", "queued", 0), ("status", "training", 0), ("progress", "training", 1),
        ("progress", "training", 3), ("status", "merging", 3), ("status", "succeeded", 3)]


def test_a_quiet_job_gets_keep_alive_comments_and_a_lost_controller_an_error_event():
    chunks = _run([_job("training", 1)] * 3 + [RuntimeError("controller gone")], _job("training", 1),
                  keepalive_s=0)
    assert chunks.count(b": keep-alive\n\n") == 3
    (kind, body) = _parse(chunks)[-1]
    assert kind == "error" and body["type"] == "/problems/internal-error" and "controller gone" in body["detail"]
