"""The HTTP client and the client commands, against a stand-in transport (no server)."""

import io
import tarfile

import httpx
import pytest

from mergeserve.client import Client, ClientError, pack
from mergeserve.commands.ingest import report


def _client(handler) -> Client:
    c = Client("http://server.test", token="t0k")
    c.http = httpx.Client(base_url=c.url, transport=httpx.MockTransport(handler), headers=c.http.headers)
    return c


def test_url_and_token_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("MERGESERVE_URL", "http://elsewhere:9000/")
    monkeypatch.setenv("MERGESERVE_TOKEN", "s3cret")
    c = Client()
    assert c.url == "http://elsewhere:9000" and c.http.headers["authorization"] == "Bearer s3cret"
    assert Client("http://x:1", token="").url == "http://x:1" and "authorization" not in Client(token="").http.headers


def test_a_problem_becomes_an_error_with_its_status_and_code():
    def handler(request):
        status = 404 if request.url.path.endswith("gone") else 422
        return httpx.Response(status, json={"type": "https://x/problems/unknown-x", "detail": "class folder 'x'"},
                              headers={"content-type": "application/problem+json"})

    with pytest.raises(ClientError) as e:
        _client(handler).job("abc")
    assert e.value.status == 422 and e.value.code == "unknown-x" and "class folder 'x'" in str(e.value)
    with pytest.raises(ClientError) as e:
        _client(handler).job("gone")
    assert e.value.status == 404  # the API's own 404 (unknown job) is final


def test_an_unreachable_server_says_where_it_looked():
    def handler(request):
        raise httpx.ConnectError("refused")

    with pytest.raises(ClientError) as e:
        _client(handler).status()
    assert e.value.status == 0 and "http://server.test" in str(e.value) and "MERGESERVE_URL" in str(e.value)


def test_following_a_job_waits_out_a_restart():
    answers = iter([httpx.ConnectError("down"), httpx.Response(503, json={"type": "x/not-ready"}),
                    httpx.Response(404, text="Path '/v1/jobs/j1' not found."),  # Serve's, before the routes
                    httpx.Response(200, json={"status": "training", "progress": {}}),
                    httpx.Response(200, json={"status": "succeeded", "progress": {}})])

    def handler(request):
        if request.url.path.endswith("/events"):
            raise httpx.ConnectError("down")  # the stream is lost too: polling waits the restart out
        a = next(answers)
        if isinstance(a, Exception):
            raise a
        return a

    seen, lost = [], []
    job = _client(handler).follow("j1", lambda j: seen.append(j["status"]), poll_s=0, on_lost=lost.append)
    assert job["status"] == "succeeded" and seen == ["training", "succeeded"] and len(lost) == 3


def test_an_ingest_is_retried_under_the_same_idempotency_key():
    keys = []

    def handler(request):
        keys.append(request.headers["idempotency-key"])
        if len(keys) == 1:
            raise httpx.RemoteProtocolError("connection dropped")
        return httpx.Response(202, json={"job_id": "j", "status": "queued", "domain": "d", "task": "classify",
                                         "replayed": True})

    assert _client(handler).ingest("d", b"tar")["replayed"] and len(keys) == 2 and keys[0] == keys[1]


def test_pack_a_folder_as_the_upload_layout(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "a.png").write_bytes(b"png")
    (tmp_path / ".hidden").write_bytes(b"x")
    (tmp_path / "cat" / "link.png").symlink_to(tmp_path / "cat" / "a.png")
    with tarfile.open(fileobj=io.BytesIO(pack(str(tmp_path)))) as tf:
        assert tf.getnames() == ["cat/a.png"]
    archive = tmp_path / "d.tar.gz"
    archive.write_bytes(b"as is")
    assert pack(str(archive)) == b"as is"
    with pytest.raises(ValueError, match="not a folder"):
        pack(str(tmp_path / "cat" / "a.png"))


def test_ingest_exits_0_only_when_the_job_succeeded(capsys):
    base = {"domain": "d", "adapter_version": 4, "attempts": 1, "timings": {"training": 1.0}}
    assert report({**base, "status": "succeeded", "gate": {"new": 0.9, "zero_shot": 0.1}}) == 0
    gate = {"new": 0.41, "zero_shot": 0.4, "drops": {"mnist": 0.31}, "passed": False}
    assert report({**base, "status": "rejected", "gate": gate, "error": "activation gate: mnist fell"}) == 1
    err = capsys.readouterr().err
    assert "0.410" in err and "mnist +0.310" in err and "mergeserve activate 4" in err
    assert report({**base, "status": "failed", "gate": None, "error": "boom"}) == 1


def test_the_commands_are_registered():
    from mergeserve.cli import COMMANDS

    assert {"ingest", "classify", "ask", "jobs", "activate", "status"} <= set(COMMANDS)



def _sse(*events: tuple[str, dict]) -> bytes:
    import json

    out = b": keep-alive\n\n"
    for i, (kind, data) in enumerate(events):
        out += f"id: {i}\nevent: {kind}\ndata: {json.dumps(data)}\n\n".encode()
    return out


def _job(status: str, step: int) -> dict:
    return {"status": status, "progress": {"step": step, "total": 4, "loss": 0.5}}


def test_following_a_job_reads_its_event_stream_and_never_polls():
    paths = []

    def handler(request):
        paths.append(request.url.path)
        body = _sse(("status", _job("training", 0)), ("progress", _job("training", 2)),
                    ("status", _job("succeeded", 4)))
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    c = _client(handler)
    seen = []
    job = c.follow("j1", lambda j: seen.append((j["status"], j["progress"]["step"])), poll_s=0)
    assert job["status"] == "succeeded" and seen == [("training", 0), ("training", 2), ("succeeded", 4)]
    assert paths == ["/v1/jobs/j1/events"] and c.followed == "events"


def test_without_a_stream_or_when_it_breaks_following_falls_back_to_polling():
    def old_server(request):  # no events route: the API's 404 problem
        if request.url.path.endswith("/events"):
            return httpx.Response(404, json={"type": "/problems/not-found"},
                                  headers={"content-type": "application/problem+json"})
        return httpx.Response(200, json=_job("succeeded", 4))

    c = _client(old_server)
    assert c.follow("j1", lambda j: None, poll_s=0)["status"] == "succeeded" and c.followed == "polling"

    polls = []

    def broken(request):  # the stream ends with an error event before the job does
        if request.url.path.endswith("/events"):
            body = _sse(("status", _job("training", 1)), ("error", {"type": "/problems/unavailable"}))
            return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})
        polls.append(1)
        return httpx.Response(200, json=_job("succeeded" if len(polls) > 1 else "training", 4))

    seen = []
    c = _client(broken)
    assert c.follow("j1", lambda j: seen.append(j["status"]), poll_s=0)["status"] == "succeeded"
    assert seen == ["training", "training", "succeeded"] and len(polls) == 2 and c.followed == "polling"
