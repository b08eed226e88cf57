// Ingest: a dropped or picked folder (packed here into a tar) or archive goes to POST /v1/domains with the
// task, method, hyper-parameters and held-out share; then the job is followed to its end.

import { call } from "./api.js";
import { h, say, show } from "./dom.js";
import { hyperFields, hyperValues } from "./hyper.js";
import { progressText, TERMINAL } from "./jobs.js";
import { gzip, isArchive, tarBlob, visible } from "./tar.js";

const $ = (id) => document.getElementById(id);
let upload = null; // {blob, filename, what}: what the next submit sends

/** A domain name the server accepts, from a folder or archive name ("My Photos.tar.gz" → "my-photos"). */
export function suggestName(filename) {
  const base = filename.toLowerCase().replace(/\.(zip|tgz|tar(\.(gz|bz2|xz))?)$/, "");
  return base.replace(/[^a-z0-9_-]+/g, "-").replace(/^[^a-z0-9]+/, "").slice(0, 63);
}

async function useFolder(entries, folder) {
  const files = entries.filter((e) => visible(e.path));
  if (!files.length) throw new Error(`${folder}: no files in it (hidden ones are left out)`);
  const { blob, name } = await gzip(tarBlob(files));
  const bytes = files.reduce((a, e) => a + e.file.size, 0);
  setUpload({ blob, filename: name, what: `folder ${folder}: ${files.length} files, ${(bytes / 1e6).toFixed(2)} MB` }, folder);
}

function useArchive(file) {
  if (!isArchive(file.name)) throw new Error(`${file.name}: not a folder nor a .zip / .tar(.gz) archive`);
  setUpload({ blob: file, filename: file.name, what: `archive ${file.name}: ${(file.size / 1e6).toFixed(2)} MB` }, file.name);
}

function setUpload(u, source) {
  upload = u;
  say($("ingest-picked"), "ok", `Ready: ${u.what}`);
  if (!$("ingest-name").value) $("ingest-name").value = suggestName(source);
}

// A FileSystemEntry tree (a dropped folder) as [{path, file}]; readEntries returns a folder in batches.
async function walk(entry, out) {
  if (entry.isFile) {
    out.push({ path: entry.fullPath.replace(/^\//, ""), file: await new Promise((ok, no) => entry.file(ok, no)) });
    return;
  }
  const reader = entry.createReader();
  for (;;) {
    const batch = await new Promise((ok, no) => reader.readEntries(ok, no));
    if (!batch.length) return;
    for (const e of batch) await walk(e, out);
  }
}

async function onDrop(ev) {
  ev.preventDefault();
  $("dropzone").classList.remove("over");
  // the items are readable only during the event: take the entries before the first await
  const entries = [...ev.dataTransfer.items].map((i) => i.webkitGetAsEntry && i.webkitGetAsEntry()).filter(Boolean);
  const files = [...ev.dataTransfer.files];
  try {
    if (entries.some((e) => e.isDirectory)) {
      const out = [];
      for (const e of entries) await walk(e, out);
      await useFolder(out, entries.length === 1 ? entries[0].name : "dropped items");
    } else if (files.length === 1) {
      useArchive(files[0]);
    } else {
      throw new Error("drop one folder (class_name/image files) or one archive");
    }
  } catch (e) {
    say($("ingest-picked"), "error", e.message);
  }
}

async function onFolder(ev) {
  const files = [...ev.target.files];
  if (!files.length) return;
  try {
    await useFolder(files.map((f) => ({ path: f.webkitRelativePath || f.name, file: f })),
      (files[0].webkitRelativePath || "folder").split("/")[0]);
  } catch (e) {
    say($("ingest-picked"), "error", e.message);
  }
}

function onArchive(ev) {
  const file = ev.target.files[0];
  if (!file) return;
  try {
    useArchive(file);
  } catch (e) {
    say($("ingest-picked"), "error", e.message);
  }
}

/** Fill the method list and the hyper-parameter fields for the chosen task and method. */
export function fillMethods(catalog, task) {
  const info = catalog.tasks[task];
  const select = $("ingest-method");
  const keep = info.methods.includes(select.value) ? select.value : info.default_method;
  show(select, info.methods.map((m) => h("option", { value: m, selected: m === keep },
    m === info.default_method ? `${m} (default)` : m)));
  $("ingest-heldout").placeholder = `default: ${info.heldout_fraction}`;
  fillHyper(catalog, task);
}

function fillHyper(catalog, task) {
  const method = $("ingest-method").value;
  $("ingest-method-doc").textContent = catalog.methods[method].description;
  show($("ingest-hyper"), h("legend", {}, `Hyper-parameters of ${method} (empty: the default)`),
    hyperFields(catalog, method, task));
}

async function follow(jobId, status, refresh) {
  for (;;) {
    const j = await call(`v1/jobs/${encodeURIComponent(jobId)}`);
    if (TERMINAL.includes(j.status)) {
      const verdict = j.status === "succeeded"
        ? `succeeded: '${j.domain}' is in adapter v${j.adapter_version}, now active`
        : `${j.status}: ${j.error}`;
      say(status, j.status === "succeeded" ? "ok" : "error", `job ${j.id} ${verdict}`);
      await refresh();
      return j;
    }
    say(status, "info", `job ${j.id} ${progressText(j)}`);
    await new Promise((r) => setTimeout(r, 500));
  }
}

async function submit(ev, catalog, task, refresh) {
  ev.preventDefault();
  const status = $("ingest-status");
  if (!upload) return say(status, "error", "Choose or drop a folder or an archive first.");
  const form = new FormData();
  form.append("archive", upload.blob, upload.filename);
  form.append("name", $("ingest-name").value.trim());
  form.append("task", task());
  form.append("method", $("ingest-method").value);
  const hyper = hyperValues($("ingest-hyper"));
  if (Object.keys(hyper).length) form.append("hyper", JSON.stringify(hyper));
  if ($("ingest-heldout").value.trim()) form.append("heldout_fraction", $("ingest-heldout").value.trim());
  say(status, "info", `uploading ${upload.what}…`);
  try {
    const r = await call("v1/domains", { method: "POST", form, auth: true });
    say(status, "info", `accepted: job ${r.job_id} (${r.task} domain '${r.domain}')`);
    await follow(r.job_id, status, refresh);
  } catch (e) {
    say(status, "error", e.message);
  }
}

/** Wire the form once; `task()` is the task picked in the header, `refresh()` reloads the other views. */
export function setupIngest(catalog, task, refresh) {
  const zone = $("dropzone");
  zone.addEventListener("dragover", (ev) => { ev.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", onDrop);
  $("ingest-folder").addEventListener("change", onFolder);
  $("ingest-archive").addEventListener("change", onArchive);
  $("ingest-method").addEventListener("change", () => fillHyper(catalog, task()));
  $("ingest-form").addEventListener("submit", (ev) => submit(ev, catalog, task, refresh));
  fillMethods(catalog, task());
}
