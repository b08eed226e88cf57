// Lineage: every stored version with its parent, method, the job that made it (the activation gate's
// verdict and numbers) and learned α; one button per version to roll back or forward to it.

import { call, token } from "./api.js";
import { acc, h, say, show, when } from "./dom.js";

function gateText(job) {
  if (!job) return "initial version (no gate)";
  const g = job.gate;
  if (!g) return job.status === "failed" ? `failed: ${job.error}` : job.status;
  // the gate records each seen domain's fall (parent minus new): shown as the change, a gain with "+"
  const changes = Object.entries(g.drops || {}).map(([d, v]) => `${d} ${v > 0 ? "−" : "+"}${acc(Math.abs(v))}`);
  const verdict = g.passed ? "passed" : `rejected: ${(g.reasons || []).join("; ")}`;
  return `${verdict}. ${job.domain}: ${acc(g.new)} (zero-shot ${acc(g.zero_shot)}); `
    + `seen domains: ${changes.join(", ") || "none"} (largest fall allowed ${g.max_drop})`;
}

function alphaText(coefficients) {
  const parts = Object.entries(coefficients || {}).map(([d, a]) => `${d} ${a.toFixed(3)}`);
  return parts.length ? parts.join(", ") : "—";
}

function button(v, active, onActivate) {
  if (v.version === active) return h("span", { class: "badge" }, "active");
  const verb = v.version < active ? "Roll back to" : "Roll forward to";
  return h("button", { type: "button", class: "activate", "data-version": v.version,
    onclick: () => onActivate(v.version) }, `${verb} v${v.version}`);
}

/** The versions table, newest first; `jobs` give each version's gate, `onActivate(v)` does the swap. */
export function lineageTable(adapters, jobs, onActivate) {
  const byVersion = Object.fromEntries(jobs.filter((j) => j.adapter_version !== null).map((j) => [j.adapter_version, j]));
  const rows = [...adapters.versions].sort((a, b) => b.version - a.version).map((v) => h("tr", {
    class: v.version === adapters.active ? "active" : "", "data-version": v.version },
    h("th", { scope: "row" }, `v${v.version}`),
    h("td", {}, v.parent === null ? "—" : `v${v.parent}`),
    h("td", {}, v.method),
    h("td", {}, v.domains.join(", ") || "—"),
    h("td", { class: "gate" }, gateText(byVersion[v.version])),
    h("td", {}, alphaText(v.coefficients)),
    h("td", {}, when(v.created)),
    h("td", {}, button(v, adapters.active, onActivate))));
  return h("div", { class: "scroll" }, h("table", { class: "lineage" },
    h("caption", {}, "Adapter versions, newest first. A gate-rejected version is stored and can still be activated."),
    h("thead", {}, h("tr", {}, ["version", "parent", "method", "domains", "activation gate", "learned α", "created", ""]
      .map((t) => h("th", { scope: "col" }, t)))),
    h("tbody", {}, rows)));
}

/**
 * Render the lineage table into `body`; a swap's outcome goes to `status` (outside `body`, so the message
 * outlives the re-render that `refresh()` does after the swap).
 */
export function renderLineage(body, status, task, adapters, jobs, refresh) {
  async function onActivate(version) {
    say(status, "info", `activating v${version}…`);
    try {
      const r = await call(`v1/adapters/${version}/activate?task=${encodeURIComponent(task)}`, { method: "POST", auth: true });
      say(status, "ok", `v${r.active} is active (every replica swapped in ${r.swap_seconds.toFixed(2)} s)`);
      await refresh();
    } catch (e) {
      say(status, "error", e.status === 401 && !token() ? `${e.message} Enter the server's bearer token above.` : e.message);
    }
    status.focus(); // the pressed button is gone after the re-render: keep keyboard users where the news is
  }
  show(body, lineageTable(adapters, jobs, onActivate));
}
