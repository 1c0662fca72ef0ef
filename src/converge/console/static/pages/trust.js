// Trust dashboard: the live event stream (SSE over fetch, resumed with Last-Event-ID after a
// reconnect), filtered by project and kind, with counters per kind for the last 24 hours.
import { get, stream } from "../api.js";
import { badge, clear, h, short, when } from "../dom.js";

// The kinds a person governing the platform watches; `""` is every kind.
export const TRUST_KINDS = [
  ["model_version.approved", "Approvals"],
  ["model_version.approval_added", "Approval votes"],
  ["model_version.rejected", "Rejections"],
  ["model_version.revoked", "Revocations"],
  ["deployment.model_version_revoked", "Deployments stopped by a revocation"],
  ["deployment.status", "Deployment status (policy denials at deploy time)"],
  ["key.created", "Keys created"],
  ["key.revoked", "Keys revoked"],
  ["guardrail.hit", "Guardrail hits"],
  ["budget.alert", "Budget alerts"],
];
const MAX_SHOWN = 200;
const RETRY_MS = 1000;

function summary(ev) {
  const d = ev.data || {};
  const changes = d.changes || d;
  const bits = [];
  if (d.actor) bits.push(`by ${d.actor}`);
  if (changes.phase) bits.push(`phase ${changes.phase}`);
  const denied = (changes.conditions || []).find((c) => c.type === "Admitted" && !c.status);
  if (denied) bits.push(`policy denied: ${denied.message}`);
  if (changes.reason) bits.push(`reason: ${changes.reason}`);
  if (changes.note) bits.push(`note: ${changes.note}`);
  const failing = (changes.decision?.outcomes || []).filter((o) => o.outcome !== "pass");
  if (failing.length) bits.push(`failing rules: ${failing.map((o) => o.rule).join(", ")}`);
  if (changes.rule || changes.ruleset) bits.push(`rule ${changes.rule || changes.ruleset}`);
  return bits.join(" · ") || JSON.stringify(changes).slice(0, 160);
}

function row(ev, projectName) {
  return h(
    "tr",
    { "data-event-id": ev.id, "data-kind": ev.kind },
    h("td", String(ev.id)),
    h("td", when(ev.at)),
    h("td", badge(ev.kind, ev.kind.includes("revoked") || ev.kind.includes("rejected") || ev.kind.includes("alert") ? "bad" : undefined)),
    h("td", ev.project_id ? projectName(ev.project_id) : "organisation"),
    h("td", { class: "mono", title: ev.object_id }, short(ev.object_id)),
    h("td", summary(ev)),
  );
}

async function counts(filter) {
  const since = new Date(Date.now() - 24 * 3600 * 1000).toISOString();
  const tally = new Map();
  tally.newest = 0; // the newest event counted: the stream's replay must not count it again
  let cursor;
  let pages = 0;
  do {
    const page = await get("/events", { since, project: filter.project, kind: filter.kind || TRUST_KINDS.map((k) => k[0]), limit: 500, cursor });
    for (const ev of page.items) {
      tally.set(ev.kind, (tally.get(ev.kind) || 0) + 1);
      tally.newest = Math.max(tally.newest, ev.id);
    }
    cursor = page.next_cursor;
    pages += 1;
  } while (cursor && pages < 20);
  return tally;
}

export async function render(root, ctx) {
  const names = new Map(ctx.projects.map((p) => [p.id, p.name]));
  const projectName = (id) => names.get(id) || short(id);
  const projectSel = h("select", { id: "trust-project" }, h("option", { value: "" }, "All projects"), ctx.projects.map((p) => h("option", { value: p.id }, p.name)));
  const kindSel = h("select", { id: "trust-kind" }, h("option", { value: "" }, "Trust events"), h("option", { value: "*" }, "Every kind"), TRUST_KINDS.map(([k, t]) => h("option", { value: k }, t)));
  const state = h("span", { id: "trust-state", class: "badge warn" }, "connecting");
  const counters = h("div", { class: "counters", id: "trust-counters" });
  const body = h("tbody", { id: "trust-events" });
  root.append(
    h("h1", "Trust dashboard"),
    h("div", { class: "toolbar" }, h("label", "Project ", projectSel), h("label", "Kind ", kindSel), state),
    h("h2", "Last 24 hours"),
    counters,
    h("h2", "Live events"),
    h("table", h("thead", h("tr", ["Id", "At", "Kind", "Project", "Object", "What"].map((t) => h("th", t)))), body),
  );

  let abort = null;
  let lastId = null;
  let retry = null;
  let tally = Object.assign(new Map(), { newest: 0 });

  const filter = () => {
    const kind = kindSel.value === "*" ? [] : kindSel.value ? [kindSel.value] : TRUST_KINDS.map((k) => k[0]);
    return { project: projectSel.value || undefined, kind };
  };

  function drawCounters() {
    clear(counters);
    const shown = kindSel.value && kindSel.value !== "*" ? TRUST_KINDS.filter((k) => k[0] === kindSel.value) : TRUST_KINDS;
    for (const [kind, title] of shown) {
      counters.append(h("div", { class: "counter", "data-kind": kind }, h("strong", String(tally.get(kind) || 0)), h("span", title)));
    }
  }

  function onEvent(msg) {
    let ev;
    try {
      ev = JSON.parse(msg.data);
    } catch {
      return;
    }
    ev.id = ev.id ?? Number(msg.id);
    ev.kind = ev.kind || msg.event;
    lastId = msg.id || lastId;
    body.prepend(row(ev, projectName));
    while (body.children.length > MAX_SHOWN) body.lastElementChild.remove();
    if (ev.id > tally.newest) {
      tally.set(ev.kind, (tally.get(ev.kind) || 0) + 1);
      drawCounters();
    }
  }

  function connect() {
    const f = filter();
    abort = stream("/sse/stream", {
      query: { project: f.project, kind: f.kind },
      lastEventId: lastId,
      onEvent,
      onOpen: () => {
        state.className = "badge good";
        state.textContent = "live";
      },
      onError: (err) => {
        state.className = "badge bad";
        state.textContent = err ? `disconnected: ${err.message}` : "disconnected";
        retry = setTimeout(connect, RETRY_MS); // resumes after lastId: nothing is missed
      },
    });
  }

  async function restart() {
    abort?.abort();
    clearTimeout(retry);
    clear(body);
    lastId = null;
    const f = filter();
    tally = await counts(f);
    drawCounters();
    // Start with the day's events, then follow live from the newest one shown.
    const since = new Date(Date.now() - 24 * 3600 * 1000).toISOString();
    const recent = await get("/events", { since, project: f.project, kind: f.kind, limit: 500 });
    for (const ev of recent.items.slice(-50)) {
      body.prepend(row(ev, projectName));
      lastId = String(ev.id);
    }
    connect();
  }

  projectSel.addEventListener("change", restart);
  kindSel.addEventListener("change", restart);
  await restart();
  return () => {
    abort?.abort();
    clearTimeout(retry);
  };
}
