// The accuracy matrix: held-out accuracy of every domain (rows) under every adapter version (columns), as
// GET /v1/adapters reports it, plus each domain's live-feedback accuracy from GET /v1/domains; and the same
// numbers as lines over the versions, so forgetting shows as a line going down.

import { acc, h, s, show, when } from "./dom.js";

// One hue, lightness falling with accuracy: luminance is monotone in the value, so the scale reads the
// same in greyscale; the number is in every cell anyway, colour is only a second cue.
export function lightness(v) {
  return 96 - 66 * v;
}

function paint(td, v) {
  if (v === null || v === undefined) return;
  const l = lightness(v);
  td.style.backgroundColor = `hsl(215 55% ${l}%)`;
  td.style.color = l < 58 ? "#fff" : "#111";
}

/** Domains in the order they were learned (first version that holds them), then any not in a version yet. */
export function domainOrder(versions, domains) {
  const seen = [];
  for (const v of [...versions].sort((a, b) => a.version - b.version)) {
    for (const d of Object.keys(v.accuracy)) if (!seen.includes(d)) seen.push(d);
  }
  for (const d of domains) if (!seen.includes(d.name)) seen.push(d.name);
  return seen;
}

function header(versions, active, rejected) {
  return h("tr", {},
    h("th", { scope: "col" }, "domain"),
    versions.map((v) => h("th", {
      scope: "col", class: v.version === active ? "active" : "",
      title: `v${v.version}: ${v.method}, parent ${v.parent ?? "none"}, ${when(v.created)}`,
    }, `v${v.version}`, h("span", { class: "sub" }, v.method),
    v.version === active ? h("span", { class: "badge" }, "active") : "",
    rejected.has(v.version) ? h("span", { class: "badge rejected" }, "gate rejected") : "")),
    h("th", { scope: "col", class: "feedback" }, "live feedback", h("span", { class: "sub" }, "served answers")));
}

function cell(domain, v, active, learnedIn) {
  const value = v.accuracy[domain];
  const tip = value === undefined
    ? `${domain} is not evaluated in v${v.version} (learned later or in another branch)`
    : `${domain} on v${v.version}: held-out accuracy ${value.toFixed(4)}`
      + (learnedIn === v.version ? " (learned in this version)" : "")
      + (v.version === active ? " (active)" : "");
  const td = h("td", {
    class: ["cell", v.version === active ? "active" : "", learnedIn === v.version ? "learned" : ""].join(" "),
    title: tip, "aria-label": tip,
    dataset: { domain, version: String(v.version), value: value === undefined ? "" : String(value) },
  }, acc(value));
  paint(td, value);
  return td;
}

function feedbackCell(domain, info) {
  const value = info ? info.feedback_accuracy : null;
  const tip = value === null || value === undefined
    ? `${domain}: no feedback yet (POST /v1/feedback)`
    : `${domain}: live feedback accuracy ${value.toFixed(4)} of served answers`;
  const td = h("td", {
    class: "cell feedback", title: tip, "aria-label": tip,
    dataset: { domain, feedback: value === null || value === undefined ? "" : String(value) },
  }, acc(value));
  paint(td, value);
  return td;
}

function legend() {
  const steps = [0, 0.2, 0.4, 0.6, 0.8, 1];
  return h("div", { class: "legend", "aria-hidden": "true" }, "accuracy ",
    steps.map((v) => {
      const sw = h("span", { class: "swatch" }, v.toFixed(1));
      paint(sw, v);
      return sw;
    }));
}

/**
 * The heatmap as a table: numbers in the cells, the tooltip (title) with four decimals and context; `jobs`
 * mark the versions the activation gate rejected (stored, never served unless activated by hand).
 */
export function matrixTable(adapters, domains, jobs = []) {
  const rejected = new Set(jobs.filter((j) => j.status === "rejected").map((j) => j.adapter_version));
  const versions = [...adapters.versions].sort((a, b) => a.version - b.version);
  const info = Object.fromEntries(domains.map((d) => [d.name, d]));
  const rows = domainOrder(versions, domains).map((d) => h("tr", {},
    h("th", { scope: "row" }, d),
    versions.map((v) => cell(d, v, adapters.active, info[d]?.learned_version)),
    feedbackCell(d, info[d])));
  const table = h("table", { class: "matrix", id: "matrix-table" },
    h("caption", {}, "Held-out accuracy per domain (rows) and adapter version (columns); the last column is "
      + "accuracy on live feedback. Hover a cell for its numbers."),
    h("thead", {}, header(versions, adapters.active, rejected)),
    h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: versions.length + 2 },
      "No domain learned yet: ingest one."))));
  return h("div", {}, h("div", { class: "scroll" }, table), legend());
}

const DASHES = ["", "6 3", "2 3", "8 3 2 3", "1 2", "10 4"];
const MARKS = ["circle", "square", "diamond", "triangle", "cross", "ring"];

function marker(kind, x, y, title) {
  const t = s("title", {}, title);
  const r = 4;
  switch (kind) {
    case "square": return s("rect", { x: x - r, y: y - r, width: 2 * r, height: 2 * r, class: "pt" }, t);
    case "diamond": return s("polygon", { points: `${x},${y - r - 1} ${x + r + 1},${y} ${x},${y + r + 1} ${x - r - 1},${y}`, class: "pt" }, t);
    case "triangle": return s("polygon", { points: `${x},${y - r - 1} ${x + r + 1},${y + r} ${x - r - 1},${y + r}`, class: "pt" }, t);
    case "cross": return s("path", { d: `M${x - r},${y - r}L${x + r},${y + r}M${x - r},${y + r}L${x + r},${y - r}`, class: "pt open" }, t);
    case "ring": return s("circle", { cx: x, cy: y, r, class: "pt open" }, t);
    default: return s("circle", { cx: x, cy: y, r, class: "pt" }, t);
  }
}

/** Per-domain accuracy over the versions (creation order): an SVG line per domain, dash and marker distinct. */
export function overTime(adapters, domains) {
  const versions = [...adapters.versions].sort((a, b) => a.version - b.version);
  const names = domainOrder(versions, domains);
  const W = 720, H = 280, L = 48, R = 160, T = 16, B = 36;
  const x = (i) => L + (versions.length < 2 ? 0 : (i * (W - L - R)) / (versions.length - 1));
  const y = (v) => T + (1 - v) * (H - T - B);
  const grid = [0, 0.25, 0.5, 0.75, 1].map((v) => s("g", {},
    s("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }),
    s("text", { x: L - 6, y: y(v) + 4, class: "tick", "text-anchor": "end" }, v.toFixed(2))));
  const ticks = versions.map((v, i) => s("text", { x: x(i), y: H - B + 16, class: "tick", "text-anchor": "middle" },
    `v${v.version}`));
  const activeAt = versions.findIndex((v) => v.version === adapters.active);
  const mark = activeAt < 0 ? [] : [s("line", { x1: x(activeAt), x2: x(activeAt), y1: T, y2: H - B, class: "active-line" }),
    s("text", { x: x(activeAt) - 3, y: H - B - 4, class: "tick", "text-anchor": "end" }, "active")];
  const lines = names.map((d, k) => {
    const pts = versions.map((v, i) => [i, v.accuracy[d], v.version]).filter((p) => p[1] !== undefined);
    const shade = 15 + (k % 4) * 15; // greyscale-distinct strokes on top of distinct dashes and markers
    return s("g", { class: "series", "data-domain": d, stroke: `hsl(215 60% ${shade}%)`, fill: `hsl(215 60% ${shade}%)` },
      s("polyline", { points: pts.map(([i, v]) => `${x(i)},${y(v)}`).join(" "), "stroke-dasharray": DASHES[k % DASHES.length], class: "line" }),
      pts.map(([i, v, ver]) => marker(MARKS[k % MARKS.length], x(i), y(v), `${d} on v${ver}: ${v.toFixed(4)}`)),
      marker(MARKS[k % MARKS.length], W - R + 30, T + 8 + 18 * k, d),
      s("line", { x1: W - R + 40, x2: W - R + 60, y1: T + 8 + 18 * k, y2: T + 8 + 18 * k, "stroke-dasharray": DASHES[k % DASHES.length], class: "line" }),
      s("text", { x: W - R + 66, y: T + 12 + 18 * k, class: "tick", stroke: "none" }, d));
  });
  return s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img",
    "aria-label": "Held-out accuracy of each domain over the adapter versions; the numbers are in the matrix above" },
    s("title", {}, "Per-domain accuracy over versions"), grid, ticks, mark, lines);
}

/** Render the accuracy view's two parts (the headings are the page's). */
export function renderAccuracy(table, chart, adapters, domains, jobs) {
  show(table, matrixTable(adapters, domains, jobs));
  show(chart, overTime(adapters, domains));
}
