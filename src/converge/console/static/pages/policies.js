// Policies: the CEL rules the Library and deployments are decided by, with an editor, a dry run
// of a draft against existing versions, and the revisions. Writing is organisation-level
// (`policies:write`, admins); everyone else reads.
import { all, get, patch, post } from "../api.js";
import { act, badge, button, clear, h, kv, section, table, when } from "../dom.js";

export async function render(root, ctx, args) {
  if (args[0]) return editor(root, ctx, args[0]);
  const policies = await all("/policies");
  root.append(
    h("h1", "Policies"),
    table(
      [
        { title: "Policy", render: (p) => h("a", { href: `#/policies/${p.id}` }, p.name) },
        { title: "Scope", key: "scope" },
        { title: "Effect", render: (p) => badge(p.effect, "plain") },
        { title: "Enabled", render: (p) => badge(String(p.enabled)) },
        { title: "Revision", render: (p) => String(p.revision) },
        { title: "Message", key: "message" },
      ],
      policies,
      { empty: "No policies." },
    ),
  );
  return undefined;
}

async function editor(root, ctx, id) {
  const [policy, revisions, facts] = await Promise.all([get(`/policies/${id}`), get(`/policies/${id}/revisions`), get("/policies/facts")]);
  const writer = ctx.me.is_admin;
  const expression = h("textarea", { id: "policy-expression", rows: 5, cols: 90, disabled: !writer }, policy.expression);
  const message = h("input", { id: "policy-message", size: 80, value: policy.message, disabled: !writer });
  const effect = h("select", { id: "policy-effect", disabled: !writer }, ["deny", "warn", "approve"].map((e) => h("option", { value: e, selected: e === policy.effect }, e)));
  const enabled = h("input", { type: "checkbox", id: "policy-enabled", checked: policy.enabled, disabled: !writer });
  const out = h("div");
  const results = h("div", { id: "dry-run" });
  const actions = h("div", { class: "actions" });
  if (writer) {
    const dry = button("Dry run the draft", () =>
      act(dry, out, async () => {
        const r = await post(`/policies/${id}/dry-run`, { expression: expression.value, message: message.value, effect: effect.value });
        clear(results).append(
          h("p", `${r.evaluated} versions: ${r.passed} pass, ${r.failed} fail, ${r.errors} errors`),
          table(
            [
              { title: "Model", key: "model" },
              { title: "Version", key: "version" },
              { title: "State", render: (x) => badge(x.state) },
              { title: "Outcome", render: (x) => badge(x.outcome) },
              { title: "Message", render: (x) => x.message || "" },
            ],
            r.results,
          ),
        );
      }),
    );
    const save = button("Save as a new revision", () =>
      act(save, out, async () => {
        const updated = await patch(`/policies/${id}`, { expression: expression.value, message: message.value, effect: effect.value, enabled: enabled.checked });
        out.append(h("p", { class: "notice good" }, `Saved: revision ${updated.revision}`));
      }),
      { kind: "primary" },
    );
    actions.append(dry, save);
  } else {
    actions.append(h("p", { class: "notice warn why-not" }, "Changing or dry-running a policy needs 'policies:write' (an organisation admin)."));
  }
  root.append(
    h("p", h("a", { href: "#/policies" }, "← Policies")),
    h("h1", policy.name),
    kv([
      ["Scope", policy.scope],
      ["Built in", String(policy.builtin)],
      ["Revision", String(policy.revision)],
      ["Updated by", policy.updated_by],
    ]),
    section("Rule", h("label", "Expression (CEL)"), expression, h("label", "Message "), message, h("div", { class: "toolbar" }, h("label", "Effect ", effect), h("label", enabled, " enabled")), actions, out, results),
    section("Facts an expression can read", h("details", h("summary", "Reference"), h("pre", JSON.stringify(facts, null, 2)))),
    section(
      "Revisions",
      table(
        [
          { title: "Revision", render: (r) => String(r.revision) },
          { title: "Expression", render: (r) => h("code", r.expression) },
          { title: "Effect", key: "effect" },
          { title: "Enabled", render: (r) => String(r.enabled) },
          { title: "Author", key: "author" },
          { title: "At", render: (r) => when(r.created_at) },
        ],
        revisions,
      ),
    ),
  );
  return undefined;
}
