// Deployments: the list, and a page per deployment with its replicas, conditions, revisions, a
// live rollout view, a logs tail and the actions a developer of its project may take.
import { all, api, followText, get, patch, post } from "../api.js";
import { act, badge, button, clear, h, kv, section, short, table, when } from "../dom.js";

const REFRESH_MS = 2000;

export async function render(root, ctx, args) {
  if (args[0]) return detail(root, ctx, args[0]);
  return list(root, ctx);
}

function projectName(ctx, id) {
  return ctx.projects.find((p) => p.id === id)?.name || short(id);
}

async function list(root, ctx) {
  const out = h("div", { id: "deployments-list" });
  root.append(h("h1", "Deployments"), h("p", { class: "muted" }, "Deploy an approved version from its page in the Library."), out);
  async function refresh() {
    const rows = await all("/deployments", {}, 500);
    clear(out).append(
      table(
        [
          { title: "Name", render: (d) => h("a", { href: `#/deployments/${d.id}` }, d.name) },
          { title: "Project", render: (d) => projectName(ctx, d.project_id) },
          { title: "Phase", render: (d) => badge(d.phase) },
          { title: "Ready", render: (d) => `${d.status?.ready_replicas ?? 0}/${d.status?.target_replicas ?? d.desired_replicas}` },
          { title: "Revision", render: (d) => String(d.revision) },
          { title: "Server", render: (d) => d.spec?.server || "" },
          { title: "Updated", render: (d) => when(d.updated_at) },
        ],
        rows,
        { empty: "No deployments yet." },
      ),
    );
  }
  await refresh();
  const timer = setInterval(() => refresh().catch(() => {}), REFRESH_MS * 2);
  return () => clearInterval(timer);
}

// Degraded is bad when true; Progressing is news, not trouble; the rest are good when true.
function conditionTone(c) {
  if (c.type === "Degraded") return c.status ? "bad" : "good";
  if (c.type === "Progressing") return c.status && c.reason !== "RolloutComplete" ? "warn" : "plain";
  return c.status ? "good" : "bad";
}

function rollout(d) {
  const replicas = d.status?.replicas || [];
  const target = d.status?.target_replicas ?? d.desired_replicas;
  const current = replicas.filter((r) => r.revision === d.revision && r.phase === "ready").length;
  const pct = target ? Math.round((100 * Math.min(current, target)) / target) : 100;
  const bar = h("div", { class: "progress" }, h("div", { class: "fill" }));
  bar.firstChild.style.width = `${pct}%`;
  return h("div", { class: "rollout" }, h("p", `Revision ${d.revision}: ${current} of ${target} replicas ready on it (${pct}%)`), bar);
}

async function detail(root, ctx, id) {
  const head = h("div");
  const live = h("div", { id: "deployment-live" });
  const actions = h("div", { class: "actions", id: "deployment-actions" });
  const out = h("div");
  const revisionsBox = h("div");
  const logsBox = h("pre", { class: "logs", id: "deployment-logs" });
  root.append(
    h("p", h("a", { href: "#/deployments" }, "← Deployments")),
    head,
    live,
    section("Actions", actions, out),
    section("Revisions", revisionsBox),
    section(
      "Logs",
      button("Show the last 200 lines", () => loadLogs()),
      button("Follow", () => followLogs(), { id: "follow-logs", title: "The last 200 lines, then each new line as the replica writes it" }),
      button("Stop", () => following?.abort(), { id: "stop-logs" }),
      logsBox,
    ),
  );
  let d = await get(`/deployments/${id}`);
  const mayWrite = ctx.me.atLeast(d.project_id, "developer");

  function drawHead() {
    clear(head).append(
      h("h1", d.name, " ", h("span", { id: "deployment-phase" }, badge(d.phase))),
      kv([
        ["Project", projectName(ctx, d.project_id)],
        ["Model version", short(d.model_version_id)],
        ["Aliases", d.aliases.join(", ")],
        ["Server", d.spec?.server],
        ["Zones", (d.spec?.zones || []).join(", ")],
        ["Replicas (min..max)", `${d.spec?.replicas?.min ?? ""}..${d.spec?.replicas?.max ?? ""}`],
        ["Promoted revision", d.promoted_revision ?? ""],
        ["Created by", d.created_by],
      ]),
    );
    clear(live).append(
      rollout(d),
      h("h2", "Replicas"),
      table(
        [
          { title: "Replica", key: "id" },
          { title: "Phase", render: (r) => badge(r.phase) },
          { title: "Revision", render: (r) => String(r.revision) },
          { title: "Zone", key: "zone" },
          { title: "Restarts", render: (r) => String(r.restarts) },
          { title: "In flight", render: (r) => String(r.in_flight ?? 0) },
          { title: "Last exit", render: (r) => r.last_exit || "" },
        ],
        d.status?.replicas || [],
        { empty: "No replicas yet." },
      ),
      h("h2", "Conditions"),
      table(
        [
          { title: "Type", key: "type" },
          { title: "Status", render: (c) => badge(String(c.status), conditionTone(c)) },
          { title: "Reason", key: "reason" },
          { title: "Message", key: "message" },
        ],
        d.status?.conditions || [],
        { empty: "The controller has not reported yet." },
      ),
    );
  }

  async function loadRevisions() {
    const revisions = await get(`/deployments/${id}/revisions`);
    clear(revisionsBox).append(
      table(
        [
          { title: "Revision", render: (r) => String(r.revision) },
          { title: "Reason", key: "reason" },
          { title: "By", key: "created_by" },
          { title: "At", render: (r) => when(r.created_at) },
          {
            title: "",
            render: (r) =>
              mayWrite && r.revision !== d.revision
                ? button(`Roll back to ${r.revision}`, (ev) =>
                    act(ev.target, out, async () => {
                      d = await post(`/deployments/${id}/rollback`, { revision: r.revision });
                      drawHead();
                      await loadRevisions();
                    }),
                  )
                : "",
          },
        ],
        revisions,
      ),
    );
  }

  async function loadLogs() {
    if (!(d.status?.replicas || []).length) {
      logsBox.textContent = "No replica to read logs from.";
      return;
    }
    try {
      logsBox.textContent = (await api("GET", `/deployments/${id}/logs`, { query: { tail: 200 } })) || "(empty)";
    } catch (err) {
      logsBox.textContent = err.message;
    }
  }

  let following = null;
  async function followLogs() {
    if (!(d.status?.replicas || []).length) {
      logsBox.textContent = "No replica to read logs from.";
      return;
    }
    following?.abort();
    const mine = (following = new AbortController());
    logsBox.textContent = "";
    logsBox.dataset.following = "true";
    try {
      await followText(`/deployments/${id}/logs`, logsBox, { query: { tail: 200, follow: true }, signal: mine.signal });
    } catch (err) {
      if (!mine.signal.aborted) logsBox.append(`\n${err.message}\n`);
    } finally {
      if (following === mine) delete logsBox.dataset.following;
    }
  }

  function drawActions() {
    clear(actions);
    if (!mayWrite) {
      actions.append(h("p", { class: "notice warn why-not" }, "Changing a deployment needs 'deployments:write' in its project (a developer or an owner)."));
      return;
    }
    const count = h("input", { id: "scale-replicas", type: "number", min: "0", max: "64", value: String(d.spec?.replicas?.max ?? 1) });
    const scale = button("Scale", () =>
      act(scale, out, async () => {
        const n = Number(count.value);
        d = await patch(`/deployments/${id}`, { replicas: { min: n, max: Math.max(1, n) } });
        drawHead();
        await loadRevisions();
      }),
    );
    scale.id = "action-scale";
    const redeploy = button("Redeploy", () =>
      act(redeploy, out, async () => {
        d = await post(`/deployments/${id}/redeploy`);
        drawHead();
      }),
    );
    actions.append(h("label", "Replicas ", count), scale, redeploy);
    if (d.spec?.rollout?.canary_weight !== null && d.spec?.rollout?.canary_weight !== undefined) {
      const promote = button("Promote canary", () =>
        act(promote, out, async () => {
          d = await post(`/deployments/${id}/promote`);
          drawHead();
        }),
      );
      actions.append(promote);
    }
  }

  drawHead();
  drawActions();
  await loadRevisions();
  logsBox.textContent = "Show the last 200 lines of the first replica, or follow them as it writes.";
  let busy = false;
  const timer = setInterval(async () => {
    if (busy) return;
    busy = true;
    try {
      d = await get(`/deployments/${id}`);
      drawHead();
    } catch {
      // a deleted deployment stops answering; the page keeps what it last saw
    } finally {
      busy = false;
    }
  }, REFRESH_MS);
  return () => {
    clearInterval(timer);
    following?.abort(); // leaving the page ends the followed stream
  };
}
