// Usage and cost: what the gateway served (by day, deployment and key) as charts, and the
// measured cost with the recommendations. Charts are inline SVG drawn by charts.js.
import { get } from "../api.js";
import { barChart, lineChart } from "../charts.js";
import { clear, h, section, short, table } from "../dom.js";

function days(since, until) {
  const out = [];
  const d = new Date(`${since.slice(0, 10)}T00:00:00Z`);
  const end = new Date(until);
  while (d < end && out.length < 400) {
    out.push(d.toISOString().slice(0, 10));
    d.setUTCDate(d.getUTCDate() + 1);
  }
  return out;
}

const num = (v) => (v === null || v === undefined ? "" : Number.isInteger(v) ? String(v) : v.toFixed(2));

export async function render(root, ctx) {
  const options = ctx.me.is_admin ? [h("option", { value: "" }, "All projects")] : [];
  const projectSel = h("select", { id: "usage-project" }, options, ctx.projects.map((p) => h("option", { value: p.id }, p.name)));
  const windowSel = h("select", { id: "usage-window" }, [7, 30, 90].map((n) => h("option", { value: String(n), selected: n === 30 }, `last ${n} days`)));
  const out = h("div", { id: "usage-charts" });
  root.append(h("h1", "Usage and cost"), h("div", { class: "toolbar" }, h("label", "Project ", projectSel), h("label", "Window ", windowSel)), out);
  if (!ctx.me.is_admin && !ctx.projects.length) {
    out.append(h("p", { class: "muted" }, "Usage is per project, and this key has none."));
    return undefined;
  }

  async function load() {
    const project = projectSel.value || undefined;
    const n = Number(windowSel.value);
    const since = new Date(Date.now() - (n - 1) * 86400e3).toISOString().slice(0, 10);
    const [byDay, byDeployment, byKey, cost, advice] = await Promise.all([
      get("/usage", { project, since, group_by: "day" }),
      get("/usage", { project, since, group_by: "deployment" }),
      get("/usage", { project, since, group_by: "key" }),
      get("/cost/report", { project, since }),
      get("/cost/recommendations", { project }),
    ]);
    const labels = days(byDay.since, byDay.until);
    const at = new Map(byDay.data.map((r) => [String(r.day), r]));
    const series = (field) => labels.map((label) => ({ label: label.slice(5), value: at.get(label)?.[field] ?? (field.includes("ms") ? null : 0) }));
    const t = byDay.totals;
    clear(out).append(
      h(
        "div",
        { class: "counters" },
        [
          ["requests", t.requests],
          ["errors", t.errors],
          ["tokens", t.total_tokens],
          ["latency p95 ms", num(t.latency_ms_p95)],
          ["TTFT p50 ms", num(t.ttft_ms_p50)],
          [`cost ${cost.currency}`, num(cost.totals.cost)],
        ].map(([k, v]) => h("div", { class: "counter" }, h("strong", String(v ?? "")), h("span", k))),
      ),
      h(
        "div",
        { class: "grid2" },
        barChart("Requests per day", series("requests")),
        barChart("Tokens per day", series("total_tokens")),
        barChart("Errors per day", series("errors")),
        lineChart(
          "Latency (ms)",
          [
            { name: "p95 latency", points: series("latency_ms_p95") },
            { name: "p50 time to first token", points: series("ttft_ms_p50") },
          ],
          { unit: " ms" },
        ),
      ),
      section(
        "By deployment",
        barChart("Requests by deployment", byDeployment.data.map((r) => ({ label: (r.deployment || short(r.deployment_id)).slice(0, 12), value: r.requests }))),
        usageTable(byDeployment.data, { title: "Deployment", render: (r) => r.deployment || short(r.deployment_id) }),
      ),
      section("By key", usageTable(byKey.data, { title: "Key", render: (r) => (r.key_id ? short(r.key_id) : "no key") })),
      section(
        "Measured cost",
        table(
          [
            { title: "Deployment", render: (r) => r.deployment || short(r.deployment_id) },
            { title: "Replica hours", render: (r) => num(r.replica_hours) },
            { title: `Cost (${cost.currency})`, render: (r) => num(r.cost) },
            { title: "Requests", render: (r) => String(r.requests) },
            { title: "Per million tokens", render: (r) => num(r.cost_per_million_tokens) },
          ],
          cost.data,
          { empty: "No replica time measured in this window." },
        ),
      ),
      section(
        "Recommendations",
        table(
          [
            { title: "Deployment", key: "deployment" },
            { title: "Advice", key: "kind" },
            { title: "Why", key: "why" },
            { title: `Saves per month (${advice.currency})`, render: (r) => num(r.monthly_savings) },
          ],
          advice.data,
          { empty: "Nothing to recommend." },
        ),
        advice.not_checked.length ? h("ul", { class: "muted" }, advice.not_checked.map((x) => h("li", x))) : null,
      ),
    );
  }

  projectSel.addEventListener("change", () => load().catch((e) => out.replaceChildren(e.message)));
  windowSel.addEventListener("change", () => load().catch((e) => out.replaceChildren(e.message)));
  await load();
  return undefined;
}

function usageTable(rows, first) {
  return table(
    [
      first,
      { title: "Requests", render: (r) => String(r.requests) },
      { title: "Errors", render: (r) => String(r.errors) },
      { title: "Tokens", render: (r) => String(r.total_tokens) },
      { title: "p95 ms", render: (r) => num(r.latency_ms_p95) },
      { title: "TTFT p50 ms", render: (r) => num(r.ttft_ms_p50) },
    ],
    rows,
    { empty: "No requests in this window." },
  );
}
