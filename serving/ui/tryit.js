// Try it: one image to POST /v1/classify, or an image and a question to POST /v1/<task> (vqa, vlm, ...); the top-k answers
// and the adapter version that gave them, exactly as the API returned them.

import { call } from "./api.js";
import { h, say, show } from "./dom.js";

const $ = (id) => document.getElementById(id);

function base64(file) {
  return new Promise((ok, no) => {
    const r = new FileReader();
    r.onload = () => ok(String(r.result).split(",", 2)[1]);
    r.onerror = () => no(r.error);
    r.readAsDataURL(file);
  });
}

function resultTable(rows, version, what) {
  return h("div", {},
    h("p", { id: "try-version" }, `answered by adapter v${version}`),
    h("table", { class: "results", id: "try-results" },
      h("caption", {}, `Top ${rows.length} ${what}`),
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "rank"), h("th", { scope: "col" }, what.replace(/s$/, "")),
        h("th", { scope: "col" }, "score"))),
      h("tbody", {}, rows.map((r, i) => h("tr", {}, h("td", {}, i + 1), h("td", { class: "label" }, r.label),
        h("td", {}, r.score == null ? "—" : r.score.toFixed(4)))))));
}

async function ask(task, file, topK, domain) {
  const body = { image: await base64(file), top_k: topK };
  if (domain) body.domain = domain;
  if (task !== "classify") {  // a question task: vqa, or one from the server's tasks config
    body.question = $("try-question").value;
    const r = await call(`v1/${encodeURIComponent(task)}`, { method: "POST", json: body });
    return { version: r.adapter_version, rows: r.answers[0].top_k.map((a) => ({ label: a.answer, score: a.score })), what: "answers" };
  }
  const r = await call("v1/classify", { method: "POST", json: body });
  return { version: r.adapter_version, rows: r.predictions, what: "labels" };
}

async function submit(ev, task) {
  ev.preventDefault();
  const status = $("try-status");
  const file = $("try-image").files[0];
  if (!file) return say(status, "error", "Choose an image first.");
  const topK = Number($("try-topk").value || "3");
  say(status, "info", task() !== "classify" ? "asking…" : "classifying…");
  try {
    const r = await ask(task(), file, Number.isInteger(topK) ? topK : $("try-topk").value, $("try-domain").value.trim());
    show($("try-out"), resultTable(r.rows, r.version, r.what));
    say(status, "ok", `${r.rows[0].label} (${r.rows[0].score.toFixed(3)}), adapter v${r.version}`);
  } catch (e) {
    show($("try-out"));
    say(status, "error", e.message);
  }
}

function preview(ev) {
  const file = ev.target.files[0];
  const img = $("try-preview");
  if (img.src) URL.revokeObjectURL(img.src);
  if (file) img.src = URL.createObjectURL(file);
  img.hidden = !file;
}

/** Show the question field for VQA only; the top-k bound is the task's label (answer) count. */
export function tryForTask(task, labels) {
  $("try-question-field").hidden = task === "classify";
  $("try-question").required = task !== "classify";
  $("try-topk").max = String(labels.length);
  $("try-topk-hint").textContent = `1 to ${labels.length}`;
  $("try-submit").textContent = task !== "classify" ? "Ask" : "Classify";
}

export function setupTry(task) {
  $("try-image").addEventListener("change", preview);
  $("try-form").addEventListener("submit", (ev) => submit(ev, task));
}
