// Jobs: what runs now (step/total and loss, from GET /v1/jobs), what waits in the queue, and what ended,
// with a failure's error and a rejection's gate numbers in full.

import { h, show, when } from "./dom.js";

export const RUNNING = ["training", "merging", "swapping"];
export const TERMINAL = ["succeeded", "failed", "rejected"];

export function progressText(j) {
  const p = j.progress;
  const loss = p.loss === null ? "" : `, loss ${p.loss.toFixed(4)}`;
  return `${j.status}: step ${p.step}/${p.total}${loss}`;
}

/** Earlier attempts that did not finish (a restart, a lost worker): the job ran again, and says why. */
export function historyText(j) {
  return (j.history || []).map((x) => `attempt ${x.attempt}: ${x.cause}`).join("; ");
}

function running(j) {
  const p = j.progress;
  return h("li", { class: "job running", "data-job": j.id },
    h("strong", {}, `${j.domain} `), `(${j.task}, ${j.method}, job ${j.id}) `,
    h("progress", { max: Math.max(p.total, 1), value: p.step, "aria-label": `job ${j.id} progress` }),
    h("span", { class: "progress-text" }, ` ${progressText(j)}`),
    j.history && j.history.length ? h("div", { class: "history" }, `ran again after ${historyText(j)}`) : "");
}

function outcome(j) {
  const earlier = j.history && j.history.length ? h("div", { class: "history" }, `earlier ${historyText(j)}`) : "";
  if (j.status === "failed") return [h("span", { class: "error" }, j.error || "failed"), earlier];
  if (j.status === "rejected") return [h("span", { class: "error" }, j.error || "rejected by the activation gate"), earlier];
  return [j.adapter_version === null ? "" : `adapter v${j.adapter_version}`, earlier];
}

function finishedTable(jobs) {
  return h("div", { class: "scroll" }, h("table", { class: "jobs" },
    h("caption", {}, "Finished jobs, newest first"),
    h("thead", {}, h("tr", {}, ["job", "domain", "task", "method", "status", "attempts", "result or error", "updated"]
      .map((t) => h("th", { scope: "col" }, t)))),
    h("tbody", {}, jobs.map((j) => h("tr", { "data-job": j.id, class: j.status },
      h("th", { scope: "row" }, j.id), h("td", {}, j.domain), h("td", {}, j.task), h("td", {}, j.method),
      h("td", {}, j.status), h("td", {}, j.attempts), h("td", {}, outcome(j)), h("td", {}, when(j.updated)))))));
}

/** Render the three lists; `jobs` is every task's jobs, newest first. */
export function renderJobs(body, jobs) {
  const now = jobs.filter((j) => RUNNING.includes(j.status));
  const queue = jobs.filter((j) => j.status === "queued").reverse(); // oldest first: the order they will run
  const done = jobs.filter((j) => TERMINAL.includes(j.status));
  show(body,
    h("h3", {}, "Running"),
    now.length ? h("ul", { class: "plain", id: "jobs-running" }, now.map(running)) : h("p", {}, "Nothing is training."),
    h("h3", {}, `Queue (${queue.length})`),
    queue.length
      ? h("ol", { id: "jobs-queue" }, queue.map((j) => h("li", { "data-job": j.id }, `${j.domain} (${j.task}, ${j.method}, job ${j.id}, since ${when(j.created)})`)))
      : h("p", {}, "The queue is empty."),
    h("h3", {}, "Finished"),
    done.length ? finishedTable(done) : h("p", {}, "No job has finished yet."));
}
