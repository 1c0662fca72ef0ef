// Charts drawn as inline SVG from plain numbers: bars for counts, a line for latencies.
import { h, s } from "./dom.js";

const W = 560;
const H = 180;
const PAD = { l: 48, r: 8, t: 10, b: 36 };

function scale(max) {
  if (!max || max <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(max));
  return Math.ceil(max / p) * p;
}

function fmt(v) {
  if (v >= 1e6) return `${(v / 1e6).toFixed(1)}M`;
  if (v >= 1e3) return `${(v / 1e3).toFixed(1)}k`;
  return Number.isInteger(v) ? String(v) : v.toFixed(1);
}

function axes(top, labels, x) {
  const out = [];
  for (const f of [0, 0.5, 1]) {
    const y = PAD.t + (1 - f) * (H - PAD.t - PAD.b);
    out.push(s("line", { x1: PAD.l, x2: W - PAD.r, y1: y, y2: y, class: "grid" }));
    out.push(s("text", { x: PAD.l - 4, y: y + 4, "text-anchor": "end", class: "tick" }, fmt(top * f)));
  }
  const every = Math.max(1, Math.ceil(labels.length / 8));
  labels.forEach((label, i) => {
    if (i % every) return;
    out.push(s("text", { x: x(i), y: H - PAD.b + 14, "text-anchor": "middle", class: "tick" }, label));
  });
  return out;
}

// points: [{label, value}]; a bar per point, with the value in a <title> tooltip.
export function barChart(title, points, { unit = "" } = {}) {
  const top = scale(Math.max(0, ...points.map((p) => p.value || 0)));
  const inner = W - PAD.l - PAD.r;
  const step = inner / Math.max(1, points.length);
  const x = (i) => PAD.l + step * i + step / 2;
  const y = (v) => PAD.t + (1 - (v || 0) / top) * (H - PAD.t - PAD.b);
  const bars = points.map((p, i) =>
    s(
      "rect",
      { x: x(i) - step * 0.35, width: step * 0.7, y: y(p.value), height: H - PAD.b - y(p.value), class: "bar" },
      s("title", {}, `${p.label}: ${fmt(p.value || 0)}${unit}`),
    ),
  );
  return figure(title, [...axes(top, points.map((p) => p.label), x), ...bars], points.length);
}

// series: [{name, points: [{label, value|null}]}], sharing labels.
export function lineChart(title, series, { unit = "" } = {}) {
  const labels = series[0]?.points.map((p) => p.label) || [];
  const values = series.flatMap((se) => se.points.map((p) => p.value || 0));
  const top = scale(Math.max(0, ...values));
  const inner = W - PAD.l - PAD.r;
  const x = (i) => PAD.l + (labels.length > 1 ? (inner * i) / (labels.length - 1) : inner / 2);
  const y = (v) => PAD.t + (1 - v / top) * (H - PAD.t - PAD.b);
  const lines = series.map((se, n) => {
    const pts = se.points.map((p, i) => (p.value === null || p.value === undefined ? null : [x(i), y(p.value)]));
    const d = pts
      .filter(Boolean)
      .map(([px, py], i) => `${i ? "L" : "M"}${px.toFixed(1)},${py.toFixed(1)}`)
      .join(" ");
    const dots = se.points.map((p, i) =>
      p.value === null || p.value === undefined
        ? null
        : s("circle", { cx: x(i), cy: y(p.value), r: 3, class: `dot s${n}` }, s("title", {}, `${se.name} ${p.label}: ${fmt(p.value)}${unit}`)),
    );
    return [d ? s("path", { d, class: `line s${n}` }) : null, ...dots].filter(Boolean);
  });
  const legend = h("p", { class: "legend" }, series.map((se, n) => h("span", { class: `key s${n}` }, se.name)));
  const fig = figure(title, [...axes(top, labels, x), ...lines.flat()], labels.length);
  fig.append(legend);
  return fig;
}

function figure(title, parts, count) {
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title, class: "chart" }, ...parts);
  return h("figure", { class: "chart-box" }, h("figcaption", title), count ? svg : h("p", { class: "muted" }, "No data in this window."));
}
