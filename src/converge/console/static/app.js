// The shell: sign-in, navigation, and a hash router (#/page/arg...) that renders one page at a time.
import { ApiError, all, forgetKey, storeKey, storedKey, whoami } from "./api.js";
import { button, clear, h, problem } from "./dom.js";
import { beginSignIn, completeSignIn, ssoConfig } from "./sso.js";

const PAGES = [
  ["overview", "Overview", () => import("./pages/overview.js")],
  ["trust", "Trust", () => import("./pages/trust.js")],
  ["library", "Library", () => import("./pages/library.js")],
  ["policies", "Policies", () => import("./pages/policies.js")],
  ["deployments", "Deployments", () => import("./pages/deployments.js")],
  ["builds", "Builds", () => import("./pages/builds.js")],
  ["usage", "Usage", () => import("./pages/usage.js")],
  ["knowledge", "Knowledge", () => import("./pages/knowledge.js")],
  ["chat", "Playground", () => import("./pages/chat.js")],
  ["admin", "Admin", () => import("./pages/admin.js")],
];

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const who = document.getElementById("who");
let ctx = null;
let cleanup = null;
let generation = 0;

function route() {
  const [name = "overview", ...args] = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  return { name: name || "overview", args };
}

function drawNav(current) {
  clear(nav);
  for (const [name, title] of PAGES) {
    nav.append(h("a", { href: `#/${name}`, class: name === current ? "active" : "" }, title));
  }
}

function drawWho() {
  clear(who);
  if (!ctx) return;
  const roles = ctx.me.is_admin ? ["admin"] : [...ctx.me.orgRoles, ...new Set(Object.values(ctx.me.roles))];
  who.append(
    h("span", { class: "subject", title: ctx.me.kind }, ctx.me.subject),
    h("span", { class: "muted" }, ` (${roles.join(", ") || "no roles"}) `),
    button("Sign out", () => {
      forgetKey();
      ctx = null;
      location.hash = "#/overview";
      start();
    }),
  );
}

function signIn(error) {
  clear(main);
  clear(nav);
  clear(who);
  const input = h("input", {
    type: "password",
    id: "key",
    name: "key",
    autocomplete: "off",
    placeholder: "cvg_... or the bootstrap token",
    required: true,
    size: 48,
  });
  const form = h(
    "form",
    { class: "card signin", id: "signin" },
    h("h1", "Sign in"),
    h("p", "Paste an API key. It is kept in this tab's session storage only, and sent as a bearer token."),
    h("label", { for: "key" }, "API key"),
    input,
    h("button", { type: "submit", class: "primary" }, "Sign in"),
    error ? problem(error) : null,
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    storeKey(input.value.trim());
    await start();
  });
  main.append(form);
  input.focus();
  ssoConfig().then((sso) => {
    if (!sso.enabled || !form.isConnected) return;
    const other = h("div", { class: "sso" }, h("p", { class: "muted" }, `Or sign in with ${sso.issuer}:`));
    other.append(
      button(
        "Sign in with single sign-on",
        async () => {
          try {
            await beginSignIn(sso);
          } catch (err) {
            other.append(problem(err));
          }
        },
        { id: "sso" },
      ),
    );
    form.append(other);
  });
}

async function show() {
  if (!ctx) return;
  const mine = ++generation;
  delete document.body.dataset.rendered;
  cleanup?.();
  cleanup = null;
  const { name, args } = route();
  const page = PAGES.find((p) => p[0] === name) || PAGES[0];
  drawNav(page[0]);
  clear(main);
  const root = h("div", { class: "page", id: `page-${page[0]}` });
  main.append(root);
  try {
    const module = await page[2]();
    if (mine !== generation) return;
    const done = await module.render(root, ctx, args);
    if (mine !== generation) done?.();
    else {
      cleanup = done || null;
      document.body.dataset.rendered = location.hash || "#/overview"; // what the browser tests wait for
    }
  } catch (err) {
    if (mine !== generation) return;
    if (err instanceof ApiError && err.status === 401) {
      forgetKey();
      signIn(err);
      return;
    }
    root.append(problem(err));
  }
}

async function refreshProjects() {
  ctx.projects = await all("/projects");
}

async function start() {
  try {
    const token = await completeSignIn(); // back from the identity provider, if this load is that
    if (token) storeKey(token);
  } catch (err) {
    forgetKey();
    signIn(err);
    return;
  }
  if (!storedKey()) {
    signIn();
    return;
  }
  try {
    const me = await whoami();
    ctx = { me, projects: [], refreshProjects: null };
    ctx.refreshProjects = refreshProjects;
    await refreshProjects();
  } catch (err) {
    forgetKey();
    signIn(err);
    return;
  }
  drawWho();
  await show();
}

window.addEventListener("hashchange", show);
start();
