"""The client commands against the test server (``vit_test``, labels a/b/c, a bearer token)."""

import io
import json
import tarfile

from _util import TOKEN, make_archive

from mergeserve.cli import main


def _folder(tmp_path, archive: bytes):
    with tarfile.open(fileobj=io.BytesIO(archive)) as tf:
        tf.extractall(tmp_path, filter="data")
    return tmp_path


def test_ingest_a_folder_follows_the_job_and_exits_0(server, tmp_path, capsys):
    folder = _folder(tmp_path / "cli-d1", make_archive(6, shift=1))
    args = ["--server", server.url, "--token", TOKEN]
    assert main(["ingest", str(folder), "--name", "cli-d1", "--hyper", '{"steps": 4}', *args]) == 0
    out = capsys.readouterr()
    assert "succeeded: 'cli-d1' is in adapter v" in out.out and "accepted: job" in out.out
    assert main(["jobs", "--limit", "1", "--json", *args]) == 0
    newest = json.loads(capsys.readouterr().out.splitlines()[0])
    assert newest["domain"] == "cli-d1" and newest["status"] == "succeeded"
    img = folder / "a" / "0.png"
    assert main(["classify", str(img), str(img), "--top-k", "2", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(img)) and f"(adapter v{newest['adapter_version']})" in lines[0]


def test_refusals_are_one_line_and_exit_2(server, tmp_path, capsys):
    folder = _folder(tmp_path / "bad", make_archive(2, classes=["a", "zebra"]))
    args = ["--server", server.url, "--token", TOKEN]
    assert main(["ingest", str(folder), "--name", "cli-bad", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mergeserve ingest: 422 unknown-label") and "zebra" in err and err.count("\n") == 1
    assert main(["ingest", str(folder), "--name", "cli-bad2", "--server", server.url, "--token", "wrong"]) == 2
    assert "401 unauthorized" in capsys.readouterr().err
    assert main(["activate", "999", *args]) == 2 and "404 unknown-version" in capsys.readouterr().err
    assert main(["ingest", str(tmp_path / "missing"), "--name", "x", *args]) == 2
    assert main(["status", "--server", "http://127.0.0.1:9"]) == 1  # nothing listens on the discard port
    assert "cannot reach the server at http://127.0.0.1:9" in capsys.readouterr().err


def test_jobs_pages_are_newest_first_and_complete(server, capsys):
    everything = server.http.get("/v1/jobs", params={"limit": 200}).json()
    assert everything["next_cursor"] is None
    ids, cursor = [], None
    while True:
        page = server.http.get("/v1/jobs", params={"limit": 1, **({"cursor": cursor} if cursor else {})}).json()
        ids += [j["id"] for j in page["jobs"]]
        if not (cursor := page["next_cursor"]):
            break
    assert ids == [j["id"] for j in everything["jobs"]] and len(set(ids)) == len(ids) >= 1
    created = [j["created"] for j in everything["jobs"]]
    assert created == sorted(created, reverse=True)
    r = server.http.get("/v1/jobs", params={"cursor": "not-a-cursor"})
    assert r.status_code == 422 and r.json()["type"].endswith("/bad-cursor")
    assert main(["status", "--server", server.url]) == 0
    out = capsys.readouterr().out
    assert "ready" in out and "labels: a, b, c" in out
