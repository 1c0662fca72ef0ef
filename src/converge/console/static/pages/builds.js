// Builds: the list, and a build's page with its results (benchmark figures) and live logs.
import { ApiError, followText, get, post } from "../api.js";
import { act, badge, button, clear, h, kv, section, short, table, when } from "../dom.js";

const REFRESH_MS = 3000;
const RUNNING = ["queued", "running"];

export async function render(root, ctx, args) {
  if (args[0]) return detail(root, ctx, args[0]);
  const out = h("div", { id: "builds-list" });
  root.append(h("h1", "Builds"), out);
  async function refresh() {
    const page = await get("/ai-converge/builds", { limit: 100 });
    clear(out).append(
      table(
        [
          { title: "Build", render: (b) => h("a", { href: `#/builds/${b.id}` }, short(b.id)) },
          { title: "State", render: (b) => badge(b.state) },
          { title: "Server", key: "server" },
          { title: "Profile", key: "profile" },
          { title: "Version", render: (b) => short(b.model_version_id) },
          { title: "By", key: "created_by" },
          { title: "Created", render: (b) => when(b.created_at) },
        ],
        page.items,
        { empty: "No builds yet." },
      ),
    );
  }
  await refresh();
  const timer = setInterval(() => refresh().catch(() => {}), REFRESH_MS);
  return () => clearInterval(timer);
}

function figures(results) {
  const rows = [];
  const walk = (prefix, value) => {
    if (value !== null && typeof value === "object" && !Array.isArray(value)) {
      for (const [k, v] of Object.entries(value)) walk(prefix ? `${prefix}.${k}` : k, v);
    } else rows.push({ name: prefix, value: Array.isArray(value) ? JSON.stringify(value) : String(value) });
  };
  walk("", results || {});
  return table([{ title: "Result", key: "name" }, { title: "Value", key: "value" }], rows, { empty: "No results yet." });
}

async function detail(root, ctx, id) {
  const head = h("div");
  const logs = h("pre", { class: "logs", id: "build-logs" });
  const out = h("div");
  root.append(h("p", h("a", { href: "#/builds" }, "← Builds")), head, section("Logs", logs));
  let build;
  const abort = new AbortController();

  async function drawHead() {
    build = await get(`/ai-converge/builds/${id}`);
    const cancel = RUNNING.includes(build.state) && ctx.me.atLeast(build.project_id, "developer")
      ? button("Cancel", (ev) => act(ev.target, out, async () => post(`/ai-converge/builds/${id}/cancel`)), { kind: "danger" })
      : null;
    clear(head).append(
      h("h1", `Build ${short(build.id)} `, badge(build.state)),
      kv([
        ["Server", build.server],
        ["Profile", build.profile],
        ["Reason", build.reason],
        ["Started", when(build.started_at)],
        ["Finished", when(build.finished_at)],
      ]),
      cancel,
      out,
      section("Results and benchmark figures", figures(build.results)),
    );
  }

  async function followLogs() {
    // A plain-text stream that ends with the build; read it as it arrives.
    try {
      await followText(`/ai-converge/builds/${id}/logs`, logs, {
        query: { follow: RUNNING.includes(build.state) },
        signal: abort.signal,
      });
    } catch (err) {
      if (err instanceof ApiError) logs.textContent = `Logs unavailable (${err.status})`;
      return;
    }
    if (!logs.textContent) logs.textContent = "(no log lines)";
  }

  await drawHead();
  followLogs().catch(() => {});
  const timer = setInterval(() => {
    if (RUNNING.includes(build.state)) drawHead().catch(() => {});
  }, REFRESH_MS);
  return () => {
    clearInterval(timer);
    abort.abort();
  };
}
