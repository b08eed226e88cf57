// The console's entry point: loads the tasks and methods once, then keeps every view current by polling
// the API (faster while a job runs); a view is re-rendered only when its data changed, so the keyboard
// focus and a reader's place survive the polling.

import { allJobs, call, setToken, token } from "./api.js";
import { say } from "./dom.js";
import { setupIngest, fillMethods } from "./ingest.js";
import { RUNNING, renderJobs } from "./jobs.js";
import { renderLineage } from "./lineage.js";
import { renderAccuracy } from "./matrix.js";
import { setupTry, tryForTask } from "./tryit.js";

const $ = (id) => document.getElementById(id);
const VIEWS = ["accuracy", "lineage", "jobs", "ingest", "try"];
const last = {}; // view -> JSON of the data it shows now
let tasks = [];
let busy = false;
let view = "accuracy";

const task = () => $("task").value;

function route() {
  const want = location.hash.slice(1);
  if (VIEWS.includes(want)) view = want; // another hash (the skip link's #main) keeps the view
  for (const v of VIEWS) {
    $(v).hidden = v !== view;
    $(`tab-${v}`).setAttribute("aria-current", v === view ? "page" : "false");
  }
}

function tokenNotes() {
  const text = token()
    ? "Activate, roll back and ingest send the bearer token entered above."
    : "No bearer token set: activate, roll back and ingest are sent without one, and a server that has a "
      + "token refuses them (401). Enter it above.";
  for (const el of document.querySelectorAll(".token-note")) el.textContent = text;
}

function changed(view, data) {
  const json = JSON.stringify(data);
  if (last[view] === json) return false;
  last[view] = json;
  return true;
}

async function header() {
  try {
    const r = await call("readyz");
    const t = tasks.find((x) => x.name === task());
    const ingest = r.ingest;
    say($("server-status"), "ok", `ready · ${task()}: ${t ? t.model : "?"}, ${t ? t.labels.length : "?"} labels · `
      + `worker ${ingest.worker}, ${ingest.queued} queued`);
  } catch (e) {
    say($("server-status"), "error", e.message);
  }
}

/** Reload every view's data for the current task; returns whether a job is queued or running. */
export async function refresh() {
  if (busy) return true;
  busy = true;
  try {
    const t = encodeURIComponent(task());
    const [adapters, domains, jobs, every] = await Promise.all([call(`v1/adapters?task=${t}`),
      call(`v1/domains?task=${t}`).then((d) => d.domains), allJobs(task()), call("v1/jobs?limit=50")]);
    const rejected = jobs.filter((j) => j.status === "rejected").map((j) => j.adapter_version);
    if (changed("accuracy", [task(), adapters, domains, rejected])) {
      renderAccuracy($("matrix"), $("chart"), adapters, domains, jobs);
    }
    if (changed("lineage", [task(), adapters, jobs])) {
      renderLineage($("lineage-body"), $("lineage-status"), task(), adapters, jobs, refresh);
    }
    if (changed("jobs", every.jobs)) renderJobs($("jobs-body"), every.jobs);
    await header();
    say($("load-status"), "ok", `updated ${new Date().toLocaleTimeString()}`);
    return every.jobs.some((j) => j.status === "queued" || RUNNING.includes(j.status));
  } catch (e) {
    say($("load-status"), "error", `could not load: ${e.message}`);
    return false;
  } finally {
    busy = false;
  }
}

async function poll() {
  const active = await refresh();
  setTimeout(poll, active ? 1000 : 5000);
}

function onTask(catalog) {
  sessionStorage.setItem("mergeserve-task", task());
  const t = tasks.find((x) => x.name === task());
  fillMethods(catalog, task());
  tryForTask(task(), t.labels);
  refresh();
}

async function main() {
  $("token").value = token();
  $("token").addEventListener("input", () => { setToken($("token").value.trim()); tokenNotes(); });
  tokenNotes();
  window.addEventListener("hashchange", route);
  route();
  try {
    const [t, catalog] = await Promise.all([call("v1/tasks"), call("v1/methods")]);
    tasks = t.tasks;
    const saved = sessionStorage.getItem("mergeserve-task");
    for (const x of tasks) $("task").append(new Option(`${x.name} (${x.model})`, x.name, false, x.name === saved));
    $("task").addEventListener("change", () => onTask(catalog));
    setupIngest(catalog, task, refresh);
    setupTry(task);
    tryForTask(task(), tasks.find((x) => x.name === task()).labels);
  } catch (e) {
    say($("load-status"), "error", `could not load the server's tasks: ${e.message}`);
    return;
  }
  const active = await refresh();
  document.body.dataset.ready = "true"; // every view has its first data (the browser test waits for it)
  setTimeout(poll, active ? 1000 : 5000);
}

main();
