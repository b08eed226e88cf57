"""The console (``GET /ui``) in a real browser, Debian's chromium driven by playwright, on the live test server.

Every check compares what the page shows with what the public API answers for the same question: the page is
a client of the API, so any number or label it invents, drops or rounds wrongly is a failure here.
"""

import base64
import io
import json
import tarfile
from decimal import ROUND_HALF_UP, Decimal

import pytest
from _browser import browser
from _util import CLASSES, TOKEN, make_archive, png

ALPHA = ("adaptive", "pam_adaptive")  # an active adaptive version takes only adaptive methods next (409)


@pytest.fixture(scope="module")
def console(server):
    """One page on the server's console, with what it logged: console messages, uncaught errors, requests."""
    with browser() as b:
        page = b.new_page(viewport={"width": 1200, "height": 900})
        log = {"console": [], "errors": [], "requests": []}
        page.on("console", lambda m: log["console"].append((m.type, m.text)))
        page.on("pageerror", lambda e: log["errors"].append(str(e)))
        page.on("request", lambda r: log["requests"].append(r.url))
        page.goto(f"{server.url}/ui")
        page.wait_for_selector("body[data-ready]", timeout=30_000)
        yield page, log
    assert not log["errors"], log["errors"]  # no uncaught exception in the page, in any test


def _view(page, name: str) -> None:
    page.click(f"#tab-{name}")
    page.wait_for_selector(f"section#{name}:not([hidden])")


def _method_and_hyper(server) -> tuple[str, dict]:
    """A method the active version accepts, and hyper-parameters that keep the job short."""
    a = server.http.get("/v1/adapters").json()
    active = next(v for v in a["versions"] if v["version"] == a["active"])
    return ("adaptive", {"fit_steps": 3}) if active["method"] in ALPHA else ("pam", {})


def _fill_hyper(page, hyper: dict) -> None:
    for k, v in hyper.items():
        page.fill(f"#hyper-{k}", str(v))


def _submit_ingest(page, timeout: float = 120_000) -> str:
    page.eval_on_selector("#ingest-status", "el => { el.textContent = ''; }")  # not the last submit's outcome
    page.click("#ingest-submit")
    page.wait_for_function("() => /job \\w+ (succeeded|failed|rejected)|^\\d{3} /.test("
                           "document.getElementById('ingest-status').textContent)", timeout=timeout)
    return page.text_content("#ingest-status")


def test_console_files_are_served_from_the_package_with_a_strict_policy(server):
    r = server.http.get("/ui")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert server.http.get("/ui/console.js").headers["content-type"].startswith("text/javascript")
    assert server.http.head("/ui").status_code == 200
    for bad in ("/ui/nope.js", "/ui/..%2Fapi.py", "/ui/%2E%2E%2Fconsole.py"):
        miss = server.http.get(bad)
        assert miss.status_code == 404 and miss.headers["content-type"] == "application/problem+json", bad
    assert "/ui" not in server.http.get("/openapi.json").json()["paths"]  # a page, not part of the API


def test_page_loads_with_no_console_error_and_no_outside_request(console, server):
    page, log = console
    errors = [t for kind, t in log["console"] if kind == "error"]
    assert not errors, errors
    assert log["requests"] and all(u.startswith(server.url + "/") for u in log["requests"]), log["requests"]
    assert page.eval_on_selector_all("#task option", "os => os.map(o => o.value)") == ["classify", "vqa", "vlm"]
    assert "ready" in page.text_content("#server-status")


def test_a_folder_picked_in_the_drop_zone_is_learned_and_becomes_a_new_column(console, server, tmp_path):
    page, _ = console
    folder = tmp_path / "ui-folder"
    for j, c in enumerate(CLASSES):
        (folder / c).mkdir(parents=True)
        for i in range(8):
            (folder / c / f"{i}.png").write_bytes(png(j, 500 + 10 * j + i, shift=1))
    (folder / ".DS_Store").write_bytes(b"\0junk")  # hidden: left out of the archive, as the CLI leaves it
    method, hyper = _method_and_hyper(server)
    before = {v["version"] for v in server.http.get("/v1/adapters").json()["versions"]}
    page.fill("#token", TOKEN)
    _view(page, "ingest")
    page.set_input_files("#ingest-folder", str(folder))
    page.wait_for_function("() => document.getElementById('ingest-picked').textContent.includes('24 files')")
    assert page.input_value("#ingest-name") == "ui-folder"  # suggested from the folder's name
    page.select_option("#ingest-method", method)
    _fill_hyper(page, hyper)
    status = _submit_ingest(page)
    assert "succeeded" in status, status
    job = server.http.get("/v1/jobs", params={"limit": 1}).json()["jobs"][0]
    assert job["domain"] == "ui-folder" and job["status"] == "succeeded" and job["n_train"] + job["n_heldout"] == 24
    new = job["adapter_version"]
    assert new not in before and f"v{new}" in status
    _view(page, "accuracy")
    page.wait_for_selector(f"#matrix td.cell[data-domain='ui-folder'][data-version='{new}']")
    assert page.is_visible(f"#matrix td.cell.active[data-version='{new}']")


def test_a_bad_value_shows_the_servers_422_then_a_dropped_archive_is_learned(console, server):
    page, _ = console
    archive = make_archive(shift=2)
    _view(page, "ingest")
    page.evaluate("""([b64, name]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, { type: "application/gzip" }));
        document.getElementById("dropzone").dispatchEvent(
            new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
    }""", [base64.b64encode(archive).decode(), "ui-drop.tar.gz"])
    page.wait_for_function("() => document.getElementById('ingest-picked').textContent.includes('ui-drop.tar.gz')")
    page.fill("#ingest-name", "ui-drop")
    method, hyper = _method_and_hyper(server)
    page.select_option("#ingest-method", method)
    bad = {"density": 2} if method == "adaptive" else {"percent": 150}
    _fill_hyper(page, {**hyper, **bad})
    status = _submit_ingest(page)
    api = server.ingest("ui-drop", archive, method=method, hyper=json.dumps({**hyper, **bad}))
    assert api.status_code == 422
    assert status == f"422 {api.json()['type'].rsplit('/', 1)[-1]}: {api.json()['detail']}"
    _fill_hyper(page, {k: "" for k in bad})  # emptied: the server's default
    status = _submit_ingest(page)
    assert "succeeded" in status and "'ui-drop'" in status, status
    assert "ui-drop" in [d["name"] for d in server.http.get("/v1/domains").json()["domains"]]


def _luminance(rgb: str) -> float:
    r, g, b = (int(x) / 255 for x in rgb[rgb.index("(") + 1 : rgb.index(")")].split(",")[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _written(v: float) -> str:
    """An accuracy as the page writes it in a cell: JavaScript's ``toFixed(3)`` rounds the exact binary value
    half up, where Python's format rounds half to even (they differ on ties such as 0.0625)."""
    return str(Decimal(v).quantize(Decimal("0.001"), rounding=ROUND_HALF_UP))


def _page_cells(page) -> list[dict]:
    return page.eval_on_selector_all("#matrix td.cell", """tds => tds.map(td => ({
        domain: td.dataset.domain, version: td.dataset.version ?? null, value: td.dataset.value ?? null,
        feedback: td.dataset.feedback ?? null, text: td.textContent, active: td.classList.contains('active'),
        bg: getComputedStyle(td).backgroundColor}))""")


def test_heatmap_cells_equal_the_apis_numbers_and_read_in_greyscale(console, server):
    page, _ = console
    for ok in (True, False, True):  # live feedback accuracy 2/3 for the folder's domain
        server.http.post("/v1/feedback", json={"domain": "ui-folder", "label": "a", "prediction": "a" if ok else "b"},
                         headers=server.auth)
    page.reload()
    page.wait_for_selector("body[data-ready]")
    adapters, domains = server.http.get("/v1/adapters").json(), server.http.get("/v1/domains").json()["domains"]
    cells = _page_cells(page)
    held = {(c["domain"], int(c["version"])): c for c in cells if c["version"] is not None}
    for v in adapters["versions"]:
        for d in {x["name"] for x in domains} | set(v["accuracy"]):
            c = held[(d, v["version"])]
            if d in v["accuracy"]:
                assert float(c["value"]) == v["accuracy"][d] and c["text"] == _written(v["accuracy"][d]), c
            else:
                assert c["value"] == "" and c["text"] == "—"
    fb = {c["domain"]: c for c in cells if c["feedback"] is not None}
    for d in domains:
        shown, want = fb[d["name"]]["feedback"], d["feedback_accuracy"]
        assert (float(shown) if shown else None) == want
        assert fb[d["name"]]["text"] == ("—" if want is None else _written(want))
        if d["accuracy_now"] is not None:  # the active column is what /v1/domains calls accuracy now
            assert float(held[(d["name"], adapters["active"])]["value"]) == d["accuracy_now"]
            assert held[(d["name"], adapters["active"])]["active"]
    assert float(fb["ui-folder"]["feedback"]) == pytest.approx(2 / 3)
    # greyscale: a higher accuracy is never a lighter cell (and the number is written in it anyway)
    shade = sorted((float(c["value"] or c["feedback"]), _luminance(c["bg"]))
                   for c in cells if c["value"] or c["feedback"])
    assert all(a[1] >= b[1] for a, b in zip(shade, shade[1:]) if a[0] < b[0]), shade
    assert page.text_content("#matrix th.active").startswith(f"v{adapters['active']}")
    assert page.locator("svg.chart g.series").count() == len({c["domain"] for c in cells})


def test_rollback_button_needs_the_token_and_changes_readyz_version(console, server):
    page, _ = console
    before = server.http.get("/readyz").json()["active_version"]
    adapters = server.http.get("/v1/adapters").json()
    parent = next(v["parent"] for v in adapters["versions"] if v["version"] == before)
    assert parent is not None
    try:
        page.fill("#token", "")
        _view(page, "lineage")
        assert "No bearer token set" in page.text_content("#lineage .token-note")
        page.click(f"button.activate[data-version='{parent}']")
        page.wait_for_function("() => /^401 /.test(document.getElementById('lineage-status').textContent)")
        assert "Enter the server's bearer token" in page.text_content("#lineage-status")
        assert server.http.get("/readyz").json()["active_version"] == before
        page.fill("#token", TOKEN)
        page.click(f"button.activate[data-version='{parent}']")
        page.wait_for_function(f"() => document.getElementById('lineage-status').textContent"
                               f".startsWith('v{parent} is active')")
        assert server.http.get("/readyz").json()["active_version"] == parent
        page.wait_for_selector(f"#lineage-body tr.active[data-version='{parent}']")
    finally:
        server.http.post(f"/v1/adapters/{before}/activate", headers=server.auth)


def _page_results(page) -> tuple[list[tuple[str, str]], str]:
    page.wait_for_selector("#try-results")
    rows = page.eval_on_selector_all("#try-results tbody tr", "trs => trs.map(tr => [tr.children[1].textContent, "
                                     "tr.children[2].textContent])")
    return [tuple(r) for r in rows], page.text_content("#try-version")


def test_try_it_shows_what_the_api_answers(console, server):
    page, _ = console
    image = png(1, 77)
    b64 = base64.b64encode(image).decode()
    _view(page, "try")
    page.set_input_files("#try-image", files=[{"name": "x.png", "mimeType": "image/png", "buffer": image}])
    page.fill("#try-topk", "2")
    page.click("#try-submit")
    rows, version = _page_results(page)
    api = server.http.post("/v1/classify", json={"image": b64, "top_k": 2}).json()
    assert rows == [(p["label"], f"{p['score']:.4f}") for p in api["predictions"]]
    assert version == f"answered by adapter v{api['adapter_version']}"
    assert page.is_hidden("#try-question")  # classification asks no question
    page.select_option("#task", "vqa")
    page.wait_for_selector("#try-question-field:not([hidden])")
    page.fill("#try-question", "how many circles are there?")
    page.eval_on_selector("#try-out", "el => el.replaceChildren()")
    page.click("#try-submit")
    rows, version = _page_results(page)
    api = server.http.post("/v1/vqa", json={"image": b64, "question": "how many circles are there?",
                                            "top_k": 2}).json()
    assert rows == [(a["answer"], f"{a['score']:.4f}") for a in api["answers"][0]["top_k"]]
    assert version == f"answered by adapter v{api['adapter_version']}"
    page.select_option("#task", "classify")


def test_jobs_view_shows_progress_the_queue_a_failures_error_and_earlier_attempts(console):
    """The jobs view's rendering, on made-up jobs (a failure cannot be caused on demand on the live server)."""
    page, _ = console
    got = page.evaluate("""async () => {
        const { renderJobs } = await import("./ui/jobs.js");
        const job = (id, status, extra) => ({ id, status, task: "classify", domain: id, method: "pam", attempts: 1,
            progress: { step: 0, total: 6, loss: null }, adapter_version: null, error: null, gate: null,
            created: 1, updated: 2, ...extra });
        const el = document.createElement("div");
        renderJobs(el, [job("later", "queued", { created: 3 }), job("sooner", "queued", { created: 2 }),
            job("run", "training", { progress: { step: 3, total: 6, loss: 0.42101 } }),
            job("bad", "failed", { error: "RuntimeError: worker died", attempts: 2,
                history: [{ attempt: 1, cause: "training worker died during the job: RayActorError", at: 1 }] })]);
        const p = el.querySelector("progress");
        return { text: el.textContent, step: p.value, total: p.max,
                 queue: [...el.querySelectorAll("#jobs-queue li")].map((li) => li.dataset.job) };
    }""")
    assert got["step"] == 3 and got["total"] == 6 and "training: step 3/6, loss 0.4210" in got["text"]
    assert got["queue"] == ["sooner", "later"]  # oldest first: the order they run in
    assert "RuntimeError: worker died" in got["text"]
    assert "earlier attempt 1: training worker died during the job: RayActorError" in got["text"]


def test_matrix_marks_a_gate_rejected_version_and_what_a_version_did_not_evaluate(console):
    page, _ = console
    got = page.evaluate("""async () => {
        const { matrixTable } = await import("./ui/matrix.js");
        const v = (version, accuracy) => ({ version, accuracy, method: "pam", parent: version - 1, created: 1 });
        const el = matrixTable({ active: 1, versions: [v(1, { d1: 0.5 }), v(2, { d1: 0.25, d2: 0.75 })] },
            [{ name: "d1", learned_version: 1, feedback_accuracy: null }],
            [{ status: "rejected", adapter_version: 2 }]);
        const th = [...el.querySelectorAll("thead th")].map((t) => t.textContent);
        const cell = el.querySelector("td[data-domain='d2'][data-version='1']");
        return { th, text: cell.textContent, tip: cell.title };
    }""")
    assert got["th"][1] == "v1pamactive" and got["th"][2] == "v2pamgate rejected"
    assert got["text"] == "—" and "d2 is not evaluated in v1" in got["tip"]


def test_a_long_path_packs_into_a_tar_python_reads(console):
    """ustar's 100-byte name field: a longer path goes through the prefix field, as tar readers expect."""
    page, _ = console
    path = "top/" + "d" * 120 + "/a/image.png"
    data = page.evaluate("""async (path) => {
        const { tarBlob } = await import("./ui/tar.js");
        const blob = tarBlob([{ path, file: new File([new Uint8Array([1, 2, 3])], "x") }]);
        return Array.from(new Uint8Array(await blob.arrayBuffer()));
    }""", path)
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tf:
        (m,) = tf.getmembers()
        assert m.name == path and tf.extractfile(m).read() == b"\x01\x02\x03"


def test_keyboard_reaches_every_control_and_every_input_is_labelled(console):
    page, _ = console
    for view in ("accuracy", "lineage", "jobs", "ingest", "try"):
        page.focus(f"#tab-{view}")
        page.keyboard.press("Enter")
        page.wait_for_selector(f"section#{view}:not([hidden])")
        controls = page.evaluate("""() => [...document.querySelectorAll("a[href], button, input, select")]
            .filter((el) => el.offsetParent !== null && !el.closest("[hidden]"))
            .map((el) => el.id || el.textContent)""")
        page.focus("#task")
        reached = set()
        for _ in range(len(controls) + 10):
            reached.add(page.evaluate("() => document.activeElement.id || document.activeElement.textContent"))
            page.keyboard.press("Tab")
        assert set(controls) <= reached, (view, set(controls) - reached)
        unlabelled = page.evaluate("""() => [...document.querySelectorAll("input, select")]
            .filter((el) => !el.labels.length && !el.getAttribute("aria-label")).map((el) => el.id)""")
        assert not unlabelled, unlabelled
