// The hyper-parameter fields of the ingest form, built from GET /v1/methods: each field is one property of
// the pydantic model the server validates `hyper` with, so the form offers exactly what the server takes.
// The browser checks nothing: an empty field is left out (the server's default), anything typed is sent
// and a bad value comes back as the server's own 422 message.

import { h } from "./dom.js";

/** A property's own schema and whether null is allowed (pydantic writes `x | None` as anyOf). */
export function resolve(prop) {
  if (!prop.anyOf) return { ...prop, nullable: false };
  const own = prop.anyOf.find((p) => p.type !== "null") || {};
  return { ...prop, ...own, nullable: prop.anyOf.some((p) => p.type === "null") };
}

function defaultText(key, p, taskInfo) {
  if (p.default === null && key in taskInfo) return `default: the server's ${taskInfo[key]}`;
  return `default: ${JSON.stringify(p.default)}`;
}

function input(id, key, p, taskInfo) {
  if (p.type === "boolean" || p.enum) {
    const values = p.enum || [true, false];
    return h("select", { id, name: key, "data-hyper": key, "data-kind": p.type === "boolean" ? "boolean" : "string" },
      h("option", { value: "" }, defaultText(key, p, taskInfo)),
      values.map((v) => h("option", { value: String(v) }, String(v))));
  }
  return h("input", { id, name: key, type: "text", inputmode: p.type === "integer" ? "numeric" : "decimal",
    "data-hyper": key, "data-kind": p.type, placeholder: defaultText(key, p, taskInfo), autocomplete: "off" });
}

/** One labelled field per property of `method`'s schema, with its range as the server words it. */
export function hyperFields(catalog, method, task) {
  const info = catalog.methods[method];
  const taskInfo = catalog.tasks[task] || {};
  const props = info.hyper_schema.properties || {};
  return Object.entries(props).map(([key, raw]) => {
    const p = resolve(raw);
    const id = `hyper-${key}`;
    let range = info.allowed[key] || "";
    if (key === "steps") range += ` (at most ${catalog.max_steps} on this server)`;
    return h("div", { class: "field" },
      h("label", { for: id }, key),
      input(id, key, p, taskInfo),
      h("small", { id: `${id}-hint` }, range));
  });
}

// A typed number goes as a JSON number; anything else as the text typed, for the server to refuse by name.
function parse(el) {
  const v = el.value.trim();
  if (el.dataset.kind === "boolean") return v === "true";
  if (el.dataset.kind === "integer" || el.dataset.kind === "number") {
    return /^-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(v) ? Number(v) : v;
  }
  return v;
}

/** The `hyper` object of the filled fields under `root` (empty ones are left to the server's defaults). */
export function hyperValues(root) {
  const out = {};
  for (const el of root.querySelectorAll("[data-hyper]")) {
    if (el.value.trim() !== "") out[el.dataset.hyper] = parse(el);
  }
  return out;
}
