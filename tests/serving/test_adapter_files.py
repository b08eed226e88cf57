"""Adapters out of and into the live test server (issue 27): a peft download that ``PeftModel.from_pretrained``
loads with the served model's outputs, an import of it as a new version, deletion and its protections."""

import base64
import hashlib
import io
import json
import os
import time
import zipfile

import numpy as np
import torch
from _util import CLASSES, make_archive, png


def _newest_learned(server) -> dict:
    if not server.http.get("/v1/domains").json()["domains"]:  # this test may run first: learn one domain
        server.wait(server.ingest("files-d1", make_archive(shift=2)).json()["job_id"])
    a = server.http.get("/v1/adapters").json()
    return next(v for v in a["versions"] if v["version"] == a["active"])


def _images(n: int = 6) -> tuple[list[bytes], torch.Tensor]:
    from serving.archive import Limits, decode_images

    raws = [png(i % 3, 500 + i) for i in range(n)]
    return raws, torch.from_numpy(decode_images(raws, 32, Limits()))


def test_a_peft_download_loads_in_peft_with_the_servers_answers(server, tmp_path):
    from peft import PeftModel

    from training.backbones import create_backbone, get_spec, preprocess

    active = _newest_learned(server)
    r = server.http.get(f"/v1/adapters/{active['version']}/download", params={"format": "peft"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == "vit_test"
    model = PeftModel.from_pretrained(create_backbone("vit_test", len(CLASSES), seed=0), str(tmp_path)).eval()
    raws, x = _images()
    with torch.no_grad():
        probs = model(preprocess(get_spec("vit_test"), x)).softmax(-1)
    body = {"images": [base64.b64encode(b).decode() for b in raws], "top_k": 3}
    served = server.http.post("/v1/classify", json=body).json()
    assert served["adapter_version"] == active["version"]
    for p, preds in zip(probs, served["results"]):
        got = {d["label"]: d["score"] for d in preds}
        want = {CLASSES[i]: float(p[i]) for i in range(len(CLASSES))}
        assert max(abs(got[k] - want[k]) for k in got) < 1e-5, (got, want)


def test_the_downloads_readme_code_gives_the_servers_answers(server, tmp_path):
    """The README inside a peft download is runnable: its lines build the base through the task registry
    and load the adapter; the task's forward then gives the served probabilities."""
    from training.data import ImageSamples

    active = _newest_learned(server)
    r = server.http.get(f"/v1/adapters/{active['version']}/download", params={"format": "peft"})
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(tmp_path)
    readme = (tmp_path / "README.txt").read_text()
    code = "\n".join(ln[4:] for ln in readme.splitlines() if ln.startswith("    "))
    code = code.replace("<this folder>", str(tmp_path))
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the file this server wrote, run as its reader would
    task, model = scope["task"], scope["model"]
    raws, x = _images()
    probs = task.forward(model, task.make_batch(ImageSamples(x, torch.zeros(len(x), dtype=torch.int64))))
    body = {"images": [base64.b64encode(b).decode() for b in raws], "top_k": len(CLASSES)}
    served = server.http.post("/v1/classify", json=body).json()["results"]
    for p, preds in zip(probs, served):
        assert max(abs(d["score"] - float(p[CLASSES.index(d["label"])])) for d in preds) < 1e-5


def test_the_mergeserve_download_is_the_store_with_its_checksum(server):
    active = _newest_learned(server)
    r = server.http.get(f"/v1/adapters/{active['version']}/download", params={"format": "mergeserve"})
    zf = zipfile.ZipFile(io.BytesIO(r.content))
    files = {n: zf.read(n) for n in zf.namelist()}
    weights, manifest = files[f"{active['name']}.safetensors"], json.loads(files[f"{active['name']}.json"])
    assert hashlib.sha256(weights).hexdigest() == manifest["sha256"] == active["sha256"]
    assert server.http.get("/v1/adapters/9999/download").status_code == 404


def test_an_import_is_a_new_inactive_version_that_serves_what_it_was(server):
    active = _newest_learned(server)
    peft = server.http.get(f"/v1/adapters/{active['version']}/download").content
    before = server.http.get("/v1/adapters").json()
    r = server.http.post("/v1/adapters", files={"archive": ("a.zip", peft)},
                         data={"sha256": hashlib.sha256(peft).hexdigest()}, headers=server.auth)
    assert r.status_code == 201, r.text
    row = r.json()
    assert row["method"] == "import" and not row["active"] and row["version"] > before["versions"][-1]["version"]
    assert server.http.get("/v1/adapters").json()["active"] == before["active"]  # nothing served changed
    t0 = time.time()
    while not (acc := _version(server, row["version"])["accuracy"]) and time.time() - t0 < 60:
        time.sleep(0.3)  # the worker measures it on every learned domain, in the background
    assert set(acc) == {d["name"] for d in server.http.get("/v1/domains").json()["domains"]}
    assert acc == _version(server, active["version"])["accuracy"]  # the same weights, the same numbers
    raws, _ = _images(3)
    body = {"images": [base64.b64encode(b).decode() for b in raws], "top_k": 3}
    want = server.http.post("/v1/classify", json=body).json()["results"]
    server.http.post(f"/v1/adapters/{row['version']}/activate", headers=server.auth).raise_for_status()
    got = server.http.post("/v1/classify", json=body).json()
    assert got["adapter_version"] == row["version"]
    assert np.allclose([[p["score"] for p in r] for r in got["results"]], [[p["score"] for p in r] for r in want],
                       atol=1e-5)
    server.http.post(f"/v1/adapters/{active['version']}/activate", headers=server.auth).raise_for_status()


def _version(server, v: int) -> dict:
    return next(x for x in server.http.get("/v1/adapters").json()["versions"] if x["version"] == v)


def _zip(files: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_an_import_that_does_not_fit_is_a_422_naming_why_and_changes_nothing(server):
    active = _newest_learned(server)
    peft = server.http.get(f"/v1/adapters/{active['version']}/download").content
    good = zipfile.ZipFile(io.BytesIO(peft))
    config, weights = json.loads(good.read("adapter_config.json")), good.read("adapter_model.safetensors")
    before = server.http.get("/v1/adapters").json()
    cases = {
        "bad-adapter": _zip({"adapter_config.json": json.dumps(config)}),  # no weights
        "bad-adapter ": _zip({"adapter_config.json": json.dumps(config), "adapter_model.bin": b"pickle"}),
        "adapter-mismatch": _zip({"adapter_config.json": json.dumps({**config, "use_dora": True}),
                                  "adapter_model.safetensors": weights}),
        "checksum-mismatch": peft,  # fine, but not the file the client said it sent
    }
    for code, data in cases.items():
        extra = {"sha256": "0" * 64} if code == "checksum-mismatch" else {}
        r = server.http.post("/v1/adapters", files={"archive": ("a.zip", data)}, data=extra, headers=server.auth)
        assert r.status_code == 422 and r.json()["type"].endswith("/" + code.strip()), (code, r.text)
    assert server.http.post("/v1/adapters", files={"archive": ("a.zip", b"x")}).status_code == 401
    assert server.http.get("/v1/adapters").json() == before


def test_delete_spares_what_a_rollback_needs(server):
    active = _newest_learned(server)
    for v in {active["version"], active["parent"]} - {None}:
        r = server.http.delete(f"/v1/adapters/{v}", headers=server.auth)
        assert r.status_code == 409 and r.json()["type"].endswith("/version-protected"), r.text
    peft = server.http.get(f"/v1/adapters/{active['version']}/download").content
    row = server.http.post("/v1/adapters", files={"archive": ("a.zip", peft)}, headers=server.auth).json()
    assert server.http.delete(f"/v1/adapters/{row['version']}").status_code == 401
    r = server.http.delete(f"/v1/adapters/{row['version']}", headers=server.auth)
    assert r.status_code == 200 and r.json()["deleted"] == row["version"]
    assert row["version"] not in [v["version"] for v in server.http.get("/v1/adapters").json()["versions"]]
    assert not os.path.exists(os.path.join(server.data_dir, "adapters", f"{row['name']}.safetensors"))
    assert server.http.delete(f"/v1/adapters/{row['version']}", headers=server.auth).status_code == 404
