"""Every problem ``code`` the server can answer with, documented where the problem's ``type`` points.

RFC 9457 wants a problem ``type`` that, dereferenced, documents the problem (or ``about:blank``). Each
problem body's ``type`` is the relative reference ``/problems/<code>``, which resolves against the URL
that was requested: the server that answered serves the page (``GET /problems/<code>``), so it
resolves behind any proxy, port or host name, and never on a domain nobody owns.
tests/serving/test_problems.py proves that every code raised anywhere in ``serving/`` is listed here.
"""

from __future__ import annotations

import html

#: code -> (title, what it means and what to do). Titles are what ``title`` says in every body.
PROBLEMS: dict[str, tuple[str, str]] = {
    # --- the framework: routing, body parsing -------------------------------------------------------
    "bad-request": ("Bad request", "The request could not be parsed (e.g. a broken multipart body)."),
    "not-found": ("Not found", "No route answers this path; see /docs for the API."),
    "method-not-allowed": ("Method not allowed", "The route exists but not with this HTTP method."),
    "unsupported-media-type": ("Unsupported media type", "Send JSON or multipart/form-data as the route documents."),
    "invalid-request": ("Invalid request", "A field is missing, of the wrong type or out of range; `detail` "
                        "names the first few (the request is strict: unknown keys are refused too)."),
    "http-error": ("HTTP error", "An HTTP error without a more specific code; `status` says which."),
    "internal-error": ("Internal error", "A bug: the server failed in a way it does not expect. Report it with "
                       "the `request_id` (the server's log names it)."),
    "bad-json": ("Bad JSON", "The body is not valid JSON in UTF-8 (a lone surrogate escape counts as invalid)."),
    "too-large": ("Too large", "The body, an archive's expanded size or file count, or the images per request "
                  "exceed the server's limits (`max_upload_bytes`, `max_images`); send less per request."),
    # --- authentication and availability -----------------------------------------------------------
    "unauthorized": ("Unauthorized", "Mutating routes need `Authorization: Bearer <token>` (the server's "
                     "`MERGESERVE_TOKEN`); the 401 carries `WWW-Authenticate: Bearer`."),
    "unavailable": ("Unavailable", "A server component (the controller, a model replica) is restarting or not "
                    "up yet. Temporary: retry after `Retry-After` seconds."),
    "not-ready": ("Not ready", "The server is starting (or its controller is away); `/readyz` says when it is "
                  "ready. Retry after `Retry-After` seconds."),
    # --- classification and VQA requests -----------------------------------------------------------
    "no-image": ("No image", "Send `image` (base64), `images` (a list) or multipart files."),
    "bad-image": ("Bad image", "An image is not valid base64 or not decodable by the server's image library."),
    "image-too-large": ("Image too large", "An image's header declares more pixels than `max_image_pixels`."),
    "bad-top-k": ("Bad top_k", "`top_k` must be an integer from 1 to the number of labels (or answers)."),
    "bad-domain": ("Bad domain", "`domain` must be a UTF-8 string of at most 256 characters."),
    "no-question": ("No question", "Send `image` + `question`, or `items` of both."),
    "too-many-questions": ("Too many questions", "A VQA request holds at most `vqa.max_questions` items."),
    "unknown-task": ("Unknown task", "The task is not enabled on this server; `GET /v1/tasks` lists the tasks."),
    # --- ingestion ----------------------------------------------------------------------------------
    "invalid-domain-name": ("Invalid domain name", "A domain name matches `[a-z0-9][a-z0-9_-]{0,62}`."),
    "no-archive": ("No archive", "A multipart ingest needs a file field `archive`."),
    "bad-archive": ("Bad archive", "The upload is not a readable zip or tar(.gz) archive, or holds special, "
                    "truncated or mis-sized members."),
    "archive-bomb": ("Archive bomb", "The archive expands beyond the allowed compression ratio or size."),
    "path-traversal": ("Path traversal", "An archive member or a named image leaves the archive (`..`, absolute "
                       "paths, links)."),
    "bad-layout": ("Bad layout", "Images must sit in `class_name/image` folders (VQA: images + one "
                   "`questions.jsonl`)."),
    "unknown-label": ("Unknown label", "A class folder, feedback label or prediction is not one of the served "
                      "labels (`GET /v1/tasks`)."),
    "empty-domain": ("Empty domain", "No images (or questions) to train on, or none left after the held-out split."),
    "bad-source": ("Bad source", "A JSON ingest's `source` must be `file://` under the server's `source_roots`, "
                   "a regular file or folder, no links."),
    "unknown-answer": ("Unknown answer", "VQA answers must be in the model's answer vocabulary."),
    "missing-image": ("Missing image", "`questions.jsonl` names images the archive does not hold."),
    "bad-questions": ("Bad questions", "`questions.jsonl` must be UTF-8 JSON lines with non-empty `image`, "
                      "`question` and `answer`."),
    "bad-heldout-fraction": ("Bad held-out fraction", "`heldout_fraction` is a number strictly between 0 and 1."),
    "unknown-method": ("Unknown method", "The merge method is not offered online (`detail` lists those that are)."),
    "bad-hyper-parameter": ("Bad hyper-parameter", "A `hyper` field is unknown or out of range; `detail` names it "
                            "and its range (training/hyper.py)."),
    "incompatible-method": ("Incompatible method", "The active version is an adaptive (dense ΔW) merge: continue "
                            "with an adaptive method, or activate a LoRA-format version first."),
    "domain-busy": ("Domain busy", "This domain already has an ingest job running; follow it with "
                    "`GET /v1/jobs/{id}`."),
    "domain-exists": ("Domain exists", "The domain is already learned; ingest under a new name."),
    "too-many-domains": ("Too many domains", "The server holds at most `max_domains` domains (and jobs in flight)."),
    "idempotency-key-reused": ("Idempotency key reused", "This `Idempotency-Key` came with a different request "
                               "before; use a new key for a new request."),
    # --- jobs, adapters, feedback -------------------------------------------------------------------
    "unknown-job": ("Unknown job", "No job has this id (`GET /v1/jobs` lists them)."),
    "bad-cursor": ("Bad cursor", "Pass back a `next_cursor` this route returned, unchanged."),
    "unknown-version": ("Unknown version", "No adapter version has this number (`GET /v1/adapters` lists them)."),
    "corrupt-adapter": ("Corrupt adapter", "The stored adapter's files fail their checksum or were made for "
                        "another backbone; it is not activated."),
    "unknown-request": ("Unknown request", "No recorded prediction has this `request_id` (predictions are kept "
                        "for `prediction_ttl_s`, at most `prediction_retention` of them)."),
    "incomplete-feedback": ("Incomplete feedback", "Give `request_id` + `label`, or `domain` + `prediction` + "
                            "`label`."),
    "unknown-domain": ("Unknown domain", "Feedback names a domain the server has not learned (metric labels stay "
                       "bounded)."),
    "version-protected": ("Version protected", "The version cannot be deleted: it is the active one, a running "
                          "canary, or an ancestor a rollback needs (`detail` lists the protected versions)."),
    "already-active": ("Already active", "A canary must be another version than the active one."),
    "no-canary": ("No canary", "No canary is running for this task; `GET /v1/adapters` shows its history."),
    "version-not-loaded": ("Version not loaded", "A request pinned `adapter_version` to a version this replica does "
                           "not serve now (only the active version and a running canary are loaded)."),
    "bad-adapter": ("Bad adapter", "An imported adapter must be one peft LoRA folder (`adapter_config.json` + "
                    "`adapter_model.safetensors`; pickled `.bin` weights are never loaded)."),
    "adapter-mismatch": ("Adapter mismatch", "The imported adapter does not fit the served base model: another base, "
                         "target modules, rank or tensor shapes (`detail` says which)."),
    "checksum-mismatch": ("Checksum mismatch", "The upload's SHA-256 differs from the `sha256` field sent with it."),
    "feedback-conflict": ("Feedback conflict", "This `request_id` already has feedback with another label; a "
                          "prediction's feedback counts once (a retry with the same label is answered as the "
                          "first was)."),
}


def title(code: str) -> str:
    """The documented title of ``code`` (a readable form of the code for one not listed)."""
    return PROBLEMS.get(code, (code.replace("-", " ").capitalize(), ""))[0]


def page(code: str) -> str:
    """``GET /problems/<code>``: one code's documentation as a small HTML page."""
    name, text = PROBLEMS[code]
    return _html(name, f"<p><code>{code}</code></p><p>{html.escape(text)}</p>"
                       '<p><a href="/problems">every problem type</a> · <a href="/docs">API docs</a></p>')


def index() -> str:
    """``GET /problems``: every code, linked to its page."""
    rows = "".join(f'<li><a href="/problems/{c}"><code>{c}</code></a>: {html.escape(t)}</li>'
                   for c, (t, _) in sorted(PROBLEMS.items()))
    return _html("mergeserve problem types", f"<p>RFC 9457 problem types this server answers with.</p><ul>{rows}</ul>")


def _html(heading: str, body: str) -> str:
    h = html.escape(heading)
    return f'<!doctype html><html lang="en"><meta charset="utf-8"><title>{h}</title><h1>{h}</h1>{body}</html>'
