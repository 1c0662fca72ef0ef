// Chat playground: pick a deployment, a RAG model or an agent (what GET /v1/models lists for the
// project), and chat over the gateway's /v1/chat/completions, streamed as server-sent events.
// Citations (RAG models) and tool calls (agents, or a model's own) are shown inline.
import { get, post, storedKey, stream } from "../api.js";
import { act, button, clear, h, problem, when } from "../dom.js";

function projectHeader(ctx, projectId) {
  // An organisation key (or the bootstrap token) names the project; a project key's own wins.
  const project = ctx.projects.find((p) => p.id === projectId);
  return project ? { "X-Converge-Project": project.name } : {};
}

function citationList(citations) {
  return h(
    "ol",
    { class: "citations" },
    citations.map((c) => h("li", { "data-n": c.n }, h("strong", c.title || c.source || "source"), c.page ? ` p. ${c.page}` : "", c.score !== undefined ? ` (score ${Number(c.score).toFixed(3)})` : "")),
  );
}

function toolList(steps) {
  return h(
    "ul",
    { class: "tools" },
    steps.map((t) => h("li", h("code", t.name || t.function?.name || "tool"), " ", h("span", { class: "mono" }, JSON.stringify(t.arguments ?? t.function?.arguments ?? t.input ?? {}).slice(0, 200)), t.output !== undefined ? h("div", { class: "muted" }, `→ ${String(typeof t.output === "string" ? t.output : JSON.stringify(t.output)).slice(0, 300)}`) : "")),
  );
}

export async function render(root, ctx) {
  const mine = ctx.projects.filter((p) => ctx.me.atLeast(p.id, "viewer"));
  // A project key has one project; anyone else chooses (the gateway answers for one project).
  const single = !ctx.me.is_admin && mine.length === 1;
  const projectSel = h(
    "select",
    { id: "chat-project" },
    single ? null : h("option", { value: "" }, "choose a project"),
    mine.map((p) => h("option", { value: p.id }, p.name)),
  );
  const modelSel = h("select", { id: "chat-model" });
  const system = h("input", { id: "chat-system", placeholder: "system prompt (optional)", size: 50 });
  const log = h("div", { class: "chat-log", id: "chat-log" });
  const input = h("textarea", { id: "chat-input", rows: 3, cols: 70, placeholder: "Say something…", required: true });
  const send = h("button", { type: "submit", class: "primary", id: "chat-send" }, "Send");
  const stop = h("button", { type: "button", id: "chat-stop", disabled: true }, "Stop");
  const status = h("p", { class: "muted", id: "chat-status" });
  const record = h("input", { type: "checkbox", id: "chat-record" });
  const sessionsBox = h("div", { id: "chat-sessions" });
  let sessionId = null;
  const form = h("form", { class: "chat-form" }, input, send, stop);
  root.append(
    h("h1", "Chat playground"),
    h("div", { class: "toolbar" }, h("label", "Project ", projectSel), h("label", "Model ", modelSel), system, h("label", { title: "POST /chat: the turns are kept, with their traces, and can be replayed" }, record, " record as a session")),
    log,
    form,
    status,
    h("section", { class: "card" }, h("h2", "Recorded sessions"), sessionsBox),
  );
  if (!mine.length) {
    status.textContent = "The playground needs a project: this key has none.";
    send.disabled = true;
    return undefined;
  }

  let history = [];
  let abort = null;

  async function loadModels() {
    clear(modelSel);
    history = [];
    sessionId = null;
    clear(log);
    if (!projectSel.value) {
      status.textContent = "Choose a project to list its deployments, RAG models and agents.";
      return;
    }
    const answer = await fetchModels(projectHeader(ctx, projectSel.value));
    drawSessions().catch((e) => sessionsBox.replaceChildren(problem(e)));
    for (const m of answer.data) modelSel.append(h("option", { value: m.id }, `${m.id}${m.kind ? ` (${m.kind.replace("_", " ")})` : ""}`));
    status.textContent = answer.data.length ? "" : "No deployment, RAG model or agent in this project yet.";
  }

  async function fetchModels(extra) {
    const resp = await fetch("/v1/models", { headers: { Authorization: `Bearer ${storedKey()}`, ...extra } });
    if (!resp.ok) throw new Error((await resp.json()).error?.message || `HTTP ${resp.status}`);
    return resp.json();
  }

  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = input.value.trim();
    if (!text || !modelSel.value) return;
    input.value = "";
    history.push({ role: "user", content: text });
    log.append(h("div", { class: "msg user" }, h("b", "you"), h("p", text)));
    const answer = h("p", { class: "answer" });
    const extras = h("div", { class: "extras" });
    const bubble = h("div", { class: "msg assistant", "data-streaming": "true" }, h("b", modelSel.value), answer, extras);
    log.append(bubble);
    const messages = system.value ? [{ role: "system", content: system.value }, ...history] : [...history];
    const calls = [];
    let chunks = 0;
    send.disabled = true;
    stop.disabled = false;
    status.textContent = "streaming…";
    const started = performance.now();
    let first = null;
    // Recorded: POST /chat sends only this turn's messages (the session holds the rest).
    const recorded = record.checked;
    const turn = sessionId ? [history.at(-1)] : messages;
    const request = recorded
      ? ["/chat", { model: modelSel.value, messages: turn, session_id: sessionId || undefined, stream: true }, { project: projectSel.value }]
      : ["/v1/chat/completions", { model: modelSel.value, messages, stream: true, stream_options: { include_usage: true } }, undefined];
    abort = stream(request[0], {
      method: "POST",
      body: request[1],
      query: request[2],
      extraHeaders: recorded ? {} : projectHeader(ctx, projectSel.value),
      onOpen: (resp) => {
        if (recorded) sessionId = resp.headers.get("x-converge-session-id") || sessionId;
      },
      onEvent: (msg) => {
        if (msg.data === "[DONE]") return;
        const chunk = JSON.parse(msg.data);
        if (chunk.error) {
          extras.append(h("div", { class: "problem" }, chunk.error.message || "the stream failed"));
          return;
        }
        const delta = chunk.choices?.[0]?.delta || {};
        if (delta.content) {
          first ??= performance.now();
          chunks += 1;
          answer.append(delta.content);
          bubble.dataset.chunks = String(chunks);
        }
        for (const call of delta.tool_calls || []) {
          const at = call.index ?? calls.length;
          calls[at] = calls[at] || { name: "", arguments: "" };
          if (call.function?.name) calls[at].name = call.function.name;
          if (call.function?.arguments) calls[at].arguments += call.function.arguments;
        }
        const extra = chunk.converge;
        if (extra?.citations?.length) extras.append(h("p", "Sources"), citationList(extra.citations));
        if (extra?.tools?.length) extras.append(h("p", "Tool calls"), toolList(extra.tools));
        if (chunk.usage) status.textContent = `${chunk.usage.prompt_tokens} prompt + ${chunk.usage.completion_tokens} completion tokens`;
      },
      onError: (err) => {
        bubble.dataset.streaming = "false";
        send.disabled = false;
        stop.disabled = true;
        if (calls.length) extras.append(h("p", "Tool calls"), toolList(calls));
        if (err) {
          extras.append(problem(err));
          history.pop();
          return;
        }
        history.push({ role: "assistant", content: answer.textContent });
        if (recorded) drawSessions().catch(() => {});
        const ttft = first ? ` · first token after ${Math.round(first - started)} ms` : "";
        status.textContent = `${status.textContent === "streaming…" ? "" : `${status.textContent} · `}${chunks} chunks${ttft}`;
      },
    });
  });
  async function drawSessions() {
    clear(sessionsBox);
    if (!ctx.me.atLeast(projectSel.value, "developer")) {
      sessionsBox.append(h("p", { class: "muted why-not" }, "Recorded sessions need 'chat:use' in the project (a developer or an owner)."));
      record.disabled = true;
      return;
    }
    record.disabled = false;
    const page = await get("/chat/sessions", { project: projectSel.value, limit: 50 });
    if (!page.items.length) {
      sessionsBox.append(h("p", { class: "muted" }, "No recorded sessions yet: tick 'record as a session' and chat."));
      return;
    }
    const detail = h("div");
    sessionsBox.append(
      h("ul", page.items.map((s) => h("li", h("a", { href: "#/chat", onclick: (ev) => { ev.preventDefault(); showSession(s, detail); } }, s.title || s.id), ` · ${s.target_kind} · ${when(s.updated_at)}`))),
      detail,
    );
  }

  async function showSession(chat, box) {
    const messages = await get(`/chat/sessions/${chat.id}/messages`, { limit: 200 });
    const out = h("div");
    clear(box).append(
      h("h3", chat.title || chat.id),
      ...messages.items.map((m) => {
        const replay = m.role === "assistant"
          ? button("Replay", (ev) =>
              act(ev.target, out, async () => {
                const r = await post(`/chat/sessions/${chat.id}/replay`, { turn: m.turn });
                out.append(h("div", { class: "grid2" }, h("div", h("b", "recorded"), h("p", r.original.message.content || "")), h("div", h("b", "replayed now"), h("p", r.replay.message.content || ""))));
              }),
            )
          : null;
        return h("div", { class: `msg ${m.role === "user" ? "user" : "assistant"}` }, h("b", `${m.role} #${m.turn}`), h("p", m.content), m.tool_calls?.length ? toolList(m.tool_calls) : null, m.trace?.citations?.length ? citationList(m.trace.citations) : null, replay);
      }),
      out,
    );
  }

  stop.addEventListener("click", () => {
    abort?.abort();
    send.disabled = false;
    stop.disabled = true;
    status.textContent = "stopped";
  });
  projectSel.addEventListener("change", () => loadModels().catch((e) => (status.textContent = e.message)));
  await loadModels().catch((e) => (status.textContent = e.message));
  return () => abort?.abort();
}

