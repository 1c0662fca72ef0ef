// Model Library: models (filters, pagination), a model's versions, and a version page with the
// facts read from its files, the scan findings, the policy decision rule by rule, its approvals,
// and the governance actions the caller may take (the API decides; the page only offers).
import { get, post } from "../api.js";
import { act, badge, button, clear, h, kv, problem, section, short, table, when } from "../dom.js";

const STATES = ["", "registered", "scanning", "pending_approval", "approved", "rejected", "deprecated", "revoked"];

export async function render(root, ctx, args) {
  const [modelId, versionId] = args;
  if (modelId && versionId) return versionPage(root, ctx, modelId, versionId);
  if (modelId) return modelPage(root, ctx, modelId);
  return listPage(root, ctx);
}

function listPage(root) {
  const name = h("input", { id: "lib-name", type: "search", placeholder: "name contains" });
  const tag = h("input", { id: "lib-tag", type: "search", placeholder: "tag" });
  const format = h("input", { id: "lib-format", type: "search", placeholder: "format, e.g. gguf", size: 12 });
  const state = h("select", { id: "lib-state" }, STATES.map((s) => h("option", { value: s }, s || "any state")));
  const out = h("div", { id: "lib-models" });
  const more = h("div", { class: "pager" });
  const cursors = [];
  let cursor;

  async function load(reset) {
    if (reset) {
      cursors.length = 0;
      cursor = undefined;
    }
    const page = await get("/models", { name: name.value, tag: tag.value, format: format.value, state: state.value, cursor, limit: 25 });
    clear(out).append(
      table(
        [
          { title: "Model", render: (m) => h("a", { href: `#/library/${m.id}`, class: "model-name" }, m.name) },
          { title: "Description", render: (m) => m.description.slice(0, 120) },
          { title: "Tags", render: (m) => m.tags.map((t) => badge(t, "plain")) },
          { title: "Visibility", key: "visibility" },
          { title: "Created", render: (m) => when(m.created_at) },
        ],
        page.items,
        { empty: "No models match." },
      ),
    );
    clear(more);
    if (cursors.length) {
      more.append(button("Previous", () => {
        cursor = cursors.pop();
        load(false);
      }));
    }
    if (page.next_cursor) {
      more.append(button("Next", () => {
        cursors.push(cursor);
        cursor = page.next_cursor;
        load(false);
      }));
    }
  }

  const form = h("form", { class: "toolbar" }, name, tag, format, state, h("button", { type: "submit" }, "Filter"));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    load(true);
  });
  root.append(h("h1", "Model Library"), form, out, more);
  return load(true).then(() => undefined);
}

async function modelPage(root, ctx, modelId) {
  const model = await get(`/models/${modelId}`);
  root.append(
    h("p", h("a", { href: "#/library" }, "← Library")),
    h("h1", { class: "model-name" }, model.name),
    h("p", model.description),
    kv([
      ["Tags", model.tags.join(", ")],
      ["Visibility", model.visibility],
      ["Submitted by project", model.submitting_project_id ? projectName(ctx, model.submitting_project_id) : "the organisation"],
      ["Created by", model.created_by],
    ]),
    section(
      "Versions",
      table(
        [
          { title: "Version", render: (v) => h("a", { href: `#/library/${model.id}/${v.id}` }, v.version) },
          { title: "State", render: (v) => badge(v.state) },
          { title: "Format", key: "format" },
          { title: "Submitted by", key: "submitted_by" },
          { title: "Created", render: (v) => when(v.created_at) },
        ],
        model.versions,
      ),
    ),
  );
}

function projectName(ctx, id) {
  return ctx.projects.find((p) => p.id === id)?.name || short(id);
}

function decisionTable(decision) {
  if (!decision || !decision.outcomes) return h("p", { class: "muted" }, "No policy decision recorded.");
  return h(
    "div",
    h("p", "Allowed: ", badge(String(decision.allowed)), " · approved by policy: ", badge(String(Boolean(decision.approve)), "plain")),
    table(
      [
        { title: "Rule", key: "rule" },
        { title: "Effect", key: "effect" },
        { title: "Outcome", render: (o) => badge(o.outcome) },
        { title: "Message", key: "message" },
      ],
      decision.outcomes,
      { empty: "No rules apply to this scope." },
    ),
  );
}

function scanSection(scan) {
  const findings = scan.findings || [];
  const facts = Object.entries(scan).filter(([k]) => k !== "findings").map(([k, v]) => [k, typeof v === "object" ? JSON.stringify(v) : String(v)]);
  return section(
    "Scan",
    kv(facts),
    table(
      [
        { title: "Severity", render: (f) => badge(f.severity, f.severity === "dangerous" || f.severity === "error" ? "bad" : "warn") },
        { title: "File", key: "file" },
        { title: "Global", key: "global" },
        { title: "Message", key: "message" },
      ],
      findings,
      { empty: "No findings." },
    ),
  );
}

function factsSection(inspection) {
  const scalar = [];
  const nested = [];
  for (const [k, v] of Object.entries(inspection || {})) {
    if (v === null || v === undefined) continue; // not read from this format
    if (typeof v === "object") nested.push([k, v]);
    else scalar.push([k, String(v)]);
  }
  return section(
    "Facts read from the files",
    kv(scalar),
    nested.map(([k, v]) => h("details", h("summary", k), h("pre", JSON.stringify(v, null, 2)))),
  );
}

// What the caller may do with this version, with the reason when an action is not offered.
export function governance(ctx, model, version) {
  const me = ctx.me;
  const submitter = version.submitted_by === me.subject;
  const ownProject = model.submitting_project_id && me.atLeast(model.submitting_project_id, "developer");
  const offers = [];
  const reasons = [];
  if (version.state === "pending_approval") {
    if (!me.governsLibrary) reasons.push("Approving needs the 'library:approve' permission (a library approver or an admin).");
    else if (submitter) reasons.push("Separation of duties: you submitted this version, so someone else must approve it.");
    else offers.push("approve");
    if (me.governsLibrary || ownProject) offers.push("reject");
  }
  if (["approved", "deprecated"].includes(version.state) && (me.governsLibrary || ownProject)) offers.push("revoke");
  if (version.state === "approved" && (me.governsLibrary || ownProject)) offers.push("deprecate");
  return { offers, reasons };
}

async function versionPage(root, ctx, modelId, versionId) {
  const [model, version] = await Promise.all([get(`/models/${modelId}`), get(`/models/${modelId}/versions/${versionId}`)]);
  const actions = h("div", { class: "actions", id: "version-actions" });
  const out = h("div");
  const stateLine = h("p", { id: "version-state" });

  function draw(v) {
    stateLine.replaceChildren("State ", badge(v.state), v.state_reason ? ` — ${v.state_reason}` : "");
    clear(actions);
    const { offers, reasons } = governance(ctx, model, v);
    const note = h("input", { id: "verdict-note", placeholder: "note or reason", size: 40 });
    if (offers.length) actions.append(note);
    for (const action of offers) {
      const b = button(action[0].toUpperCase() + action.slice(1), () =>
        act(b, out, async () => {
          const body = action === "revoke" ? { reason: note.value } : { note: note.value };
          const updated = await post(`/models/${modelId}/versions/${versionId}/${action}`, body);
          draw(updated);
          out.append(h("p", { class: "notice good" }, `${action} done: the version is ${updated.state}`));
        }),
      { kind: action === "approve" ? "primary" : "danger" });
      b.id = `action-${action}`;
      actions.append(b);
    }
    for (const r of reasons) actions.append(h("p", { class: "notice warn why-not" }, r));
    if (["approved", "deprecated"].includes(v.state)) actions.append(deployForm(ctx, v));
  }

  root.append(
    h("p", h("a", { href: `#/library/${model.id}` }, `← ${model.name}`)),
    h("h1", h("span", { class: "model-name" }, model.name), ` ${version.version}`),
    stateLine,
    kv([
      ["Format", version.format],
      ["SHA-256", version.artifact_sha256],
      ["Source", version.source?.uri],
      ["Submitted by", version.submitted_by],
      ["Created", when(version.created_at)],
    ]),
    section("Governance", actions, out),
    factsSection(version.inspection),
    scanSection(version.scan || {}),
    section("Policy decision", decisionTable(version.decision)),
    section(
      "Approvals",
      table(
        [
          { title: "By", key: "approver" },
          { title: "Verdict", render: (a) => badge(a.verdict === "approve" ? "approved" : a.verdict) },
          { title: "Note", key: "note" },
          { title: "At", render: (a) => when(a.created_at) },
        ],
        version.approvals,
        { empty: "No approvals yet." },
      ),
    ),
  );
  draw(version);
}

function deployForm(ctx, version) {
  const projects = ctx.projects.filter((p) => ctx.me.atLeast(p.id, "developer"));
  if (!projects.length) return h("p", { class: "muted" }, "Deploying needs 'deployments:write' in a project.");
  const project = h("select", { id: "deploy-project" }, projects.map((p) => h("option", { value: p.id }, p.name)));
  const name = h("input", { id: "deploy-name", placeholder: "deployment name", required: true, pattern: "[a-z0-9]([a-z0-9\\-]*[a-z0-9])?" });
  const server = h("select", { id: "deploy-server" }, ["", "llama-cpp", "embeddings", "v2"].map((s) => h("option", { value: s }, s || "server: from the format")));
  const cpu = h("input", { id: "deploy-cpu", type: "number", step: "0.1", min: "0.1", value: "1" });
  const replicas = h("input", { id: "deploy-replicas", type: "number", min: "0", max: "64", value: "1" });
  const out = h("div");
  const form = h("form", { class: "card inline", id: "deploy-form" }, h("h3", "Deploy this version"), project, name, server, h("label", "CPU ", cpu), h("label", "Replicas ", replicas), h("button", { type: "submit", class: "primary" }, "Deploy"), out);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clear(out);
    const n = Number(replicas.value);
    const body = {
      name: name.value,
      model_version_id: version.id,
      resources: { cpu: Number(cpu.value), memory_bytes: 1 << 30 },
      replicas: { min: n, max: Math.max(1, n) },
    };
    if (server.value) body.server = server.value;
    try {
      const d = await post("/deployments", body, { project: project.value });
      location.hash = `#/deployments/${d.id}`;
    } catch (err) {
      out.append(problem(err));
    }
  });
  return form;
}

