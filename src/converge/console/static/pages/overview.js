// Overview: a live diagram of this installation. Health from /readiness (public), deployments and
// their replicas from /deployments, zones from the runtime; every element links to its page.
import { all, get } from "../api.js";
import { badge, clear, h, s, section, table } from "../dom.js";

const REFRESH_MS = 3000;
const MAX_DRAWN = 200;
const W = 960;

// Which readiness checks make up each box of the diagram.
const COMPONENTS = [
  { id: "api", label: "API", checks: ["database", "migrations", "event-broadcaster"], href: "#/admin", x: 40, y: 20 },
  { id: "gateway", label: "Gateway /v1 /v2", prefix: "gateway", href: "#/usage", x: 260, y: 20 },
  { id: "controller", label: "Controller", checks: ["controller", "cluster-sync"], href: "#/deployments", x: 480, y: 20 },
  {
    id: "workers",
    label: "Workers",
    checks: ["build-runner", "kube-build-runner", "ingestion-runner", "registry-sync", "catalogue", "cost-meter", "default-deployments"],
    href: "#/builds",
    x: 700,
    y: 20,
  },
  { id: "database", label: "PostgreSQL", checks: ["database", "migrations", "embedded_postgres"], href: "#/trust", x: 150, y: 130 },
  { id: "store", label: "Object store", checks: [], href: "#/library", x: 370, y: 130 },
  { id: "runtime", label: "Runtime backend", checks: [], href: "#/deployments", x: 590, y: 130 },
];

async function readiness() {
  // 503 is an answer here (a check failed), not an error: read the body either way.
  const resp = await fetch("/readiness", { headers: { Accept: "application/json" } });
  return resp.json();
}

function health(component, checks) {
  const names = component.prefix
    ? Object.keys(checks).filter((n) => n.startsWith(component.prefix))
    : component.checks.filter((n) => n in checks);
  if (!names.length) return { state: component.checks.length || component.prefix ? "absent" : "ok", names };
  return { state: names.every((n) => checks[n].ok) ? "ok" : "down", names };
}

function box(component, checks, extra) {
  const { state, names } = health(component, checks);
  const leader = names.find((n) => checks[n]?.leader !== undefined);
  const sub = leader ? (checks[leader].leader ? "leader" : "standby") : extra || (state === "absent" ? "not in this process" : names.join(", "));
  return s(
    "a",
    { href: component.href, class: `node ${state}`, "data-node": component.id },
    s("rect", { x: component.x, y: component.y, width: 200, height: 64, rx: 8 }),
    s("text", { x: component.x + 12, y: component.y + 26, class: "node-title" }, component.label),
    s("text", { x: component.x + 12, y: component.y + 48, class: "node-sub" }, fit(sub)),
    s("title", {}, `${component.label}: ${state}${names.length ? ` (${names.join(", ")})` : ""}`),
  );
}

// Who talks to whom: [from, to] by component id, drawn bottom-centre to top-centre.
const EDGES = [
  ["api", "database"],
  ["api", "store"],
  ["gateway", "database"],
  ["controller", "database"],
  ["controller", "runtime"],
  ["workers", "store"],
  ["workers", "database"],
];

function edges() {
  const at = Object.fromEntries(COMPONENTS.map((c) => [c.id, c]));
  const lines = EDGES.map(([from, to]) =>
    s("line", { x1: at[from].x + 100, y1: at[from].y + 64, x2: at[to].x + 100, y2: at[to].y, class: "edge" }),
  );
  // The runtime runs the deployments' replicas; the gateway routes to them.
  lines.push(s("line", { x1: at.runtime.x + 100, y1: at.runtime.y + 64, x2: at.runtime.x + 100, y2: 228, class: "edge" }));
  return lines;
}

function fit(text, chars = 28) {
  return text.length > chars ? `${text.slice(0, chars - 1)}…` : text;
}

function replicaDots(d, x, y) {
  const replicas = d.status?.replicas || [];
  return replicas.map((r, i) =>
    s(
      "circle",
      { cx: x + 18 + i * 18, cy: y + 38, r: 6, class: `replica ${String(r.phase).toLowerCase()}` },
      s("title", {}, `${r.id}: ${r.phase} (revision ${r.revision}, zone ${r.zone}, restarts ${r.restarts})`),
    ),
  );
}

function deploymentNodes(deployments) {
  const perRow = 4;
  return deployments.map((d, i) => {
    const x = 40 + (i % perRow) * 225;
    const y = 255 + Math.floor(i / perRow) * 80;
    const ready = `${d.status?.ready_replicas ?? 0}/${d.status?.target_replicas ?? d.desired_replicas} ready`;
    return s(
      "a",
      { href: `#/deployments/${d.id}`, class: `node deployment ${d.phase}`, "data-deployment": d.name },
      s("rect", { x, y, width: 210, height: 64, rx: 8 }),
      s("text", { x: x + 12, y: y + 22, class: "node-title" }, fit(d.name, 22)),
      s("text", { x: x + 12, y: y + 58, class: "node-sub" }, fit(`${d.phase} · ${ready}`, 30)),
      ...replicaDots(d, x, y),
      s("title", {}, `${d.name}: ${d.phase}, ${ready}`),
    );
  });
}

function diagram(ready, deployments, zones) {
  const checks = ready.checks || {};
  const rows = Math.max(1, Math.ceil(deployments.length / 4));
  const zoneText = zones.map((z) => z.name).join(", ") || "no zones";
  const extra = { runtime: `zones: ${zoneText}`, store: "artifacts, content-addressed" };
  const nodes = COMPONENTS.map((c) => box(c, checks, extra[c.id]));
  return s(
    "svg",
    { viewBox: `0 0 ${W} ${255 + rows * 80 + 10}`, class: "diagram", role: "img", "aria-label": "Architecture of this installation" },
    ...edges(),
    ...nodes,
    s("text", { x: 40, y: 240, class: "node-sub" }, deployments.length ? "Deployments and their replicas" : "No deployments yet"),
    ...deploymentNodes(deployments),
  );
}

export async function render(root, ctx) {
  const status = h("p", { class: "muted", id: "overview-status" });
  const picture = h("div", { id: "diagram" });
  const checksBox = h("div");
  const zonesBox = h("div");
  root.append(h("h1", "Overview"), status, picture, h("div", { class: "grid2" }, section("Readiness", checksBox), section("Zones", zonesBox)));

  async function refresh() {
    const [ready, deployments, zones] = await Promise.all([
      readiness(),
      all("/deployments", {}, 1000).then((rows) => rows.slice(-MAX_DRAWN)), // the newest (ids are time-ordered)
      get("/deployments/zones"),
    ]);
    clear(picture).append(diagram(ready, deployments, zones));
    status.replaceChildren("Installation ", badge(ready.status === "ready" ? "ready" : "not ready"), ` · updated ${new Date().toLocaleTimeString()}`);
    const checkRows = Object.entries(ready.checks || {}).map(([name, c]) => ({ name, ...c }));
    clear(checksBox).append(
      table(
        [
          { title: "Check", key: "name" },
          { title: "State", render: (r) => badge(r.ok ? "ready" : "failed", r.ok ? "good" : "bad") },
          { title: "Leader", render: (r) => (r.leader === undefined ? "" : r.leader ? "leader" : "standby") },
        ],
        checkRows,
      ),
    );
    clear(zonesBox).append(
      table(
        [
          { title: "Zone", key: "name" },
          { title: "CPU", key: "cpu" },
          { title: "Memory", render: (z) => `${(z.memory_bytes / 2 ** 30).toFixed(1)} GiB` },
          { title: "GPUs", render: (z) => String((z.gpus || []).length) },
        ],
        zones,
      ),
    );
  }

  await refresh();
  let busy = false;
  const timer = setInterval(async () => {
    if (busy) return;
    busy = true;
    try {
      await refresh();
    } catch (err) {
      status.textContent = `Refresh failed: ${err.message}`;
    } finally {
      busy = false;
    }
  }, REFRESH_MS);
  return () => clearInterval(timer);
}
