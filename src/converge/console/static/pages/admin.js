// Administration: projects, their members and roles, API keys (a new key's secret is shown once)
// and limits. What is offered follows the caller's role; the API refuses the rest regardless.
import { all, del, get, patch, post } from "../api.js";
import { act, badge, button, clear, h, kv, problem, section, table, when } from "../dom.js";

const LIMITS = ["rpm", "tpm", "concurrency", "monthly_tokens"];
const PROJECT_ROLES = ["viewer", "developer", "owner"];

export async function render(root, ctx, args) {
  if (args[0]) return projectPage(root, ctx, args[0]);
  await ctx.refreshProjects();
  const out = h("div");
  root.append(
    h("h1", "Administration"),
    section(
      "Projects",
      table(
        [
          { title: "Project", render: (p) => h("a", { href: `#/admin/${p.id}` }, p.name) },
          { title: "Your role", render: (p) => badge(ctx.me.roleIn(p.id) || "none", "plain") },
          { title: "Description", key: "description" },
          { title: "Limits", render: (p) => limitsText(p.limits) },
          { title: "Created", render: (p) => when(p.created_at) },
        ],
        ctx.projects,
        { empty: "No projects you can see." },
      ),
      ctx.me.is_admin ? createProject(ctx, out) : null,
      out,
    ),
    ctx.me.is_admin ? await orgKeys() : null,
  );
  return undefined;
}

function limitsText(limits) {
  const set = Object.entries(limits || {});
  return set.length ? set.map(([k, v]) => `${k} ${v}`).join(", ") : "unlimited";
}

function createProject(ctx, out) {
  const name = h("input", { id: "new-project", placeholder: "new project name", pattern: "[a-z0-9]([a-z0-9\\-]*[a-z0-9])?", required: true });
  const form = h("form", { class: "toolbar" }, name, h("button", { type: "submit" }, "Create project"));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clear(out);
    try {
      const p = await post("/projects", { name: name.value });
      await ctx.refreshProjects();
      location.hash = `#/admin/${p.id}`;
    } catch (err) {
      out.append(problem(err));
    }
  });
  return form;
}

// The secret of a new key, shown once with the reminder; nothing keeps it.
function secretOnce(created) {
  const code = h("code", { class: "secret", id: "new-key-secret" }, created.token);
  return h("div", { class: "notice good", role: "status" }, h("p", `Key '${created.name}' created. Copy it now: it is shown only once.`), code);
}

function keyTable(keys, { onRevoke }) {
  return table(
    [
      { title: "Name", key: "name" },
      { title: "Prefix", render: (k) => h("code", k.prefix) },
      { title: "Role", render: (k) => badge(k.role, "plain") },
      { title: "Limits", render: (k) => limitsText(k.limits) },
      { title: "Expires", render: (k) => when(k.expires_at) || "never" },
      { title: "Last used", render: (k) => when(k.last_used_at) },
      { title: "State", render: (k) => (k.revoked_at ? badge("revoked") : badge("active", "good")) },
      { title: "", render: (k) => (onRevoke && !k.revoked_at ? button("Revoke", (ev) => onRevoke(k, ev.target), { kind: "danger" }) : "") },
    ],
    keys,
    { empty: "No keys." },
  );
}

async function orgKeys() {
  const box = h("div");
  const out = h("div");
  async function draw() {
    const keys = await all("/keys");
    clear(box).append(
      keyTable(keys, {
        onRevoke: (k, b) =>
          act(b, out, async () => {
            await del(`/keys/${k.id}`);
            await draw();
          }),
      }),
    );
  }
  const name = h("input", { placeholder: "key name", required: true, id: "org-key-name" });
  const role = h("select", { id: "org-key-role" }, ["admin", "library-approver"].map((r) => h("option", { value: r }, r)));
  const form = h("form", { class: "toolbar" }, name, role, h("button", { type: "submit" }, "Create organisation key"));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clear(out);
    try {
      const created = await post("/keys", { name: name.value, role: role.value });
      out.append(secretOnce(created));
      await draw();
    } catch (err) {
      out.append(problem(err));
    }
  });
  await draw();
  return section("Organisation keys", box, form, out);
}

async function projectPage(root, ctx, id) {
  const p = ctx.projects.find((x) => x.id === id) || (await get(`/projects/${id}`));
  const me = ctx.me;
  const owner = me.atLeast(id, "owner");
  const developer = me.atLeast(id, "developer");
  const membersBox = h("div");
  const keysBox = h("div", { id: "project-keys" });
  const out = h("div");
  root.append(
    h("p", h("a", { href: "#/admin" }, "← Administration")),
    h("h1", p.name),
    kv([
      ["Your role", me.roleIn(id) || "none"],
      ["Description", p.description],
      ["Quotas", Object.entries(p.quotas || {}).filter(([, v]) => v !== null).map(([k, v]) => `${k} ${v}`).join(", ") || "none"],
    ]),
    out,
    section("Members", membersBox),
    section("API keys", keysBox),
    section("Limits", limitsForm(p, owner, out)),
  );

  async function drawMembers() {
    const members = await all(`/projects/${id}/members`);
    const rows = table(
      [
        { title: "Subject", key: "subject" },
        {
          title: "Role",
          render: (m) => {
            if (!owner) return badge(m.role, "plain");
            const sel = h("select", {}, PROJECT_ROLES.map((r) => h("option", { value: r, selected: r === m.role }, r)));
            sel.addEventListener("change", () => act(sel, out, async () => patch(`/projects/${id}/members/${m.id}`, { role: sel.value })));
            return sel;
          },
        },
        { title: "Added by", key: "added_by" },
        { title: "", render: (m) => (owner ? button("Remove", (ev) => act(ev.target, out, async () => { await del(`/projects/${id}/members/${m.id}`); await drawMembers(); }), { kind: "danger" }) : "") },
      ],
      members,
      { empty: "No members (keys can still act in the project)." },
    );
    clear(membersBox).append(rows);
    if (owner) {
      const subject = h("input", { placeholder: "OIDC subject", required: true });
      const role = h("select", {}, PROJECT_ROLES.map((r) => h("option", { value: r }, r)));
      const form = h("form", { class: "toolbar" }, subject, role, h("button", { type: "submit" }, "Add member"));
      form.addEventListener("submit", async (ev) => {
        ev.preventDefault();
        clear(out);
        try {
          await post(`/projects/${id}/members`, { subject: subject.value, role: role.value });
          await drawMembers();
        } catch (err) {
          out.append(problem(err));
        }
      });
      membersBox.append(form);
    }
  }

  async function drawKeys(created) {
    clear(keysBox);
    if (!developer) {
      keysBox.append(h("p", { class: "notice warn why-not" }, "Listing and creating keys needs 'keys:read' / 'keys:write' in this project (a developer or an owner)."));
      return;
    }
    const keys = await all(`/projects/${id}/keys`);
    if (created) keysBox.append(secretOnce(created));
    keysBox.append(
      keyTable(keys, {
        onRevoke: (k, b) =>
          act(b, out, async () => {
            await del(`/projects/${id}/keys/${k.id}`);
            await drawKeys();
          }),
      }),
    );
    const name = h("input", { placeholder: "key name", required: true, id: "key-name" });
    const mayGrant = PROJECT_ROLES.filter((r) => me.atLeast(id, r));
    const role = h("select", { id: "key-role" }, mayGrant.map((r) => h("option", { value: r, selected: r === "developer" }, r)));
    const days = h("input", { type: "number", min: "1", max: "3650", value: "90", id: "key-days" });
    const form = h("form", { class: "toolbar" }, name, role, h("label", "expires in days ", days), h("button", { type: "submit", id: "key-create" }, "Create key"));
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      clear(out);
      try {
        const made = await post(`/projects/${id}/keys`, { name: name.value, role: role.value, expires_in_days: Number(days.value) || null });
        await drawKeys(made);
      } catch (err) {
        out.append(problem(err));
      }
    });
    keysBox.append(form);
  }

  await Promise.all([drawMembers(), drawKeys()]);
  return undefined;
}

function limitsForm(project, owner, out) {
  const inputs = Object.fromEntries(LIMITS.map((k) => [k, h("input", { type: "number", min: "1", value: project.limits?.[k] ?? "", placeholder: "unlimited", id: `limit-${k}`, disabled: !owner })]));
  const form = h("form", { class: "toolbar" }, LIMITS.map((k) => h("label", `${k} `, inputs[k])), owner ? h("button", { type: "submit" }, "Save limits") : h("span", { class: "muted" }, "Changing limits needs 'project:write' (an owner)."));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clear(out);
    const limits = {};
    for (const k of LIMITS) if (inputs[k].value) limits[k] = Number(inputs[k].value);
    try {
      await patch(`/projects/${project.id}`, { limits });
      out.append(h("p", { class: "notice good" }, `Limits saved: ${limitsText(limits)}`));
    } catch (err) {
      out.append(problem(err));
    }
  });
  return form;
}

