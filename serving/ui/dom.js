// Element building without innerHTML: domain names, labels, answers and error messages come from users
// and the server, so every one of them reaches the page as text, never as markup.

const SVG_NS = "http://www.w3.org/2000/svg";

function fill(el, attrs, children) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** `h("td", {class: "x"}, "text", child)`: an HTML element. */
export function h(tag, attrs, ...children) {
  return fill(document.createElement(tag), attrs, children);
}

/** The same for SVG elements (charts). */
export function s(tag, attrs, ...children) {
  return fill(document.createElementNS(SVG_NS, tag), attrs, children);
}

/** Replace an element's content. */
export function show(el, ...children) {
  el.replaceChildren();
  fill(el, {}, children);
}

/** An accuracy as the console writes it everywhere (cells, tooltips, tables): three decimals, or "—". */
export function acc(v) {
  return v === null || v === undefined ? "—" : v.toFixed(3);
}

export function when(t) {
  return new Date(t * 1000).toLocaleString();
}

/** A message in a live region: `kind` is "ok", "error" or "info" (styled and announced). */
export function say(el, kind, text) {
  el.dataset.kind = kind;
  el.textContent = text;
}
