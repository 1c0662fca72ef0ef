// DOM helpers. Everything that came from the API goes in as text (textContent, attributes set
// one by one), never as markup: there is no innerHTML anywhere in the console.

const SVG_NS = "http://www.w3.org/2000/svg";

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

function setAttrs(el, attrs) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name === "class") el.className = value;
    else if (name in el && typeof value !== "string") el[name] = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
}

// h("a", {href: "#/x", class: "btn"}, "text", child...)
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  if (attrs instanceof Node || typeof attrs !== "object" || Array.isArray(attrs)) {
    children.unshift(attrs);
    attrs = {};
  }
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

export function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (value !== null && value !== undefined) el.setAttribute(name, String(value));
  }
  append(el, children);
  return el;
}

export function clear(el) {
  el.replaceChildren();
  return el;
}

export function table(columns, rows, { empty = "Nothing here yet." } = {}) {
  if (!rows.length) return h("p", { class: "muted" }, empty);
  return h(
    "table",
    h("thead", h("tr", columns.map((c) => h("th", c.title)))),
    h(
      "tbody",
      rows.map((row) => h("tr", columns.map((c) => h("td", c.render ? c.render(row) : row[c.key] ?? "")))),
    ),
  );
}

const TONES = {
  good: ["Ready", "ready", "approved", "succeeded", "running", "pass", "true", "completed", "live"],
  bad: ["Degraded", "Revoked", "rejected", "revoked", "failed", "fail", "error", "backoff", "false", "cancelled"],
  warn: ["Progressing", "pending_approval", "queued", "starting", "warn", "deprecated", "ScaledToZero", "draining"],
};

export function badge(text, tone) {
  const value = String(text);
  const t = tone || Object.keys(TONES).find((k) => TONES[k].includes(value)) || "plain";
  return h("span", { class: `badge ${t}` }, value);
}

export function link(href, text) {
  return h("a", { href }, text);
}

export function button(text, onclick, { kind = "", title, disabled, id } = {}) {
  return h("button", { type: "button", class: kind, onclick, title, id, disabled: Boolean(disabled) }, text);
}

export function section(title, ...children) {
  return h("section", { class: "card" }, h("h2", title), ...children);
}

export function kv(pairs) {
  return h(
    "dl",
    { class: "kv" },
    pairs.filter(([, v]) => v !== undefined && v !== null && v !== "").map(([k, v]) => [h("dt", k), h("dd", v)]),
  );
}

export function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleString();
}

export function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = Number(n);
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${v.toFixed(i ? 1 : 0)} ${units[i]}`;
}

// Ids are UUIDv7: their first characters are a timestamp, shared by objects made together.
// The last ones are random, so they tell objects apart.
export function short(id) {
  const s = String(id || "");
  return s.length > 12 ? `…${s.slice(-8)}` : s;
}

// An error from the API, shown where the action was taken: its message and any field errors.
export function problem(err) {
  const lines = err.fields && err.fields.length ? err.fields : [];
  return h(
    "div",
    { class: "problem", role: "alert" },
    h("strong", err.status ? `${err.status}: ` : "Error: "),
    err.message,
    lines.length ? h("ul", lines.map((l) => h("li", l))) : null,
  );
}

export function notice(text, tone = "info") {
  return h("div", { class: `notice ${tone}`, role: "status" }, text);
}

// Run an action from a button: disable it meanwhile, show the problem next to it on failure.
export async function act(buttonEl, out, fn) {
  buttonEl.disabled = true;
  clear(out);
  try {
    await fn();
  } catch (err) {
    out.append(problem(err));
  } finally {
    buttonEl.disabled = false;
  }
}
