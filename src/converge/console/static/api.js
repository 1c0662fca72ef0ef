// The console's one way to talk to Converge: same origin, the signed-in key as a bearer token.
// The key lives in sessionStorage (gone when the tab closes) and never in a URL: EventSource
// cannot send headers, so server-sent events are read from fetch() streams instead.

const KEY = "converge.key";

export function storedKey() {
  return sessionStorage.getItem(KEY);
}

export function storeKey(token) {
  sessionStorage.setItem(KEY, token);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY);
}

export class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || problem.error?.message || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }

  // Field errors of a 422, as "field: message" lines a person can act on.
  get fields() {
    const errors = this.problem.errors || [];
    return errors.map((e) => `${(e.loc || []).filter((p) => p !== "body").join(".")}: ${e.msg}`);
  }
}

function headers(extra = {}) {
  const h = { Accept: "application/json", ...extra };
  const token = storedKey();
  if (token) h.Authorization = `Bearer ${token}`;
  return h;
}

function withQuery(path, query) {
  if (!query) return path;
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(query)) {
    if (value === undefined || value === null || value === "") continue;
    for (const v of Array.isArray(value) ? value : [value]) params.append(name, String(v));
  }
  const qs = params.toString();
  return qs ? `${path}?${qs}` : path;
}

async function problemOf(resp) {
  try {
    return await resp.json();
  } catch {
    return { detail: `${resp.status} ${resp.statusText}` };
  }
}

// A plain-text stream (a followed log), appended to `box` as it arrives, until it ends or
// `signal` aborts; a non-2xx answer throws ApiError.
export async function followText(path, box, { query, signal } = {}) {
  const resp = await fetch(withQuery(path, query), { headers: headers({ Accept: "text/plain" }), signal });
  if (!resp.ok) throw new ApiError(resp.status, await problemOf(resp));
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    box.append(value);
    box.scrollTop = box.scrollHeight;
  }
}

// JSON in, JSON out; a non-2xx answer throws ApiError with the problem+json body.
export async function api(method, path, { query, body, extraHeaders } = {}) {
  const init = { method, headers: headers(extraHeaders) };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(withQuery(path, query), init);
  if (!resp.ok) throw new ApiError(resp.status, await problemOf(resp));
  if (resp.status === 204) return null;
  const type = resp.headers.get("content-type") || "";
  return type.includes("json") ? resp.json() : resp.text();
}

export const get = (path, query) => api("GET", path, { query });
export const post = (path, body, query) => api("POST", path, { body: body ?? {}, query });
export const patch = (path, body) => api("PATCH", path, { body });
export const del = (path) => api("DELETE", path);

// Every page of a paginated list, up to `max` items (the console never needs more at once).
export async function all(path, query = {}, max = 1000) {
  const items = [];
  let cursor;
  do {
    const page = await get(path, { ...query, limit: 500, cursor });
    items.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor && items.length < max);
  return items;
}

// Server-sent events over fetch. `onEvent({id, event, data})` per event; `lastEventId` resumes
// after a reconnect (the server replays what was missed). Returns an AbortController.
export function stream(path, { query, method = "GET", body, onEvent, onOpen, onError, lastEventId, extraHeaders }) {
  const abort = new AbortController();
  (async () => {
    const h = headers({ Accept: "text/event-stream", ...extraHeaders });
    if (lastEventId) h["Last-Event-ID"] = String(lastEventId);
    const init = { method, headers: h, signal: abort.signal };
    if (body !== undefined) {
      h["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const resp = await fetch(withQuery(path, query), init);
    if (!resp.ok) throw new ApiError(resp.status, await problemOf(resp));
    onOpen?.(resp);
    await readEvents(resp.body, onEvent);
  })().then(
    () => onError?.(null),
    (err) => {
      if (err.name !== "AbortError") onError?.(err);
    },
  );
  return abort;
}

async function readEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const ev = parseBlock(block);
      if (ev) onEvent(ev);
    }
  }
}

function parseBlock(block) {
  const ev = { id: null, event: "message", data: [] };
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const at = line.indexOf(":");
    const field = at < 0 ? line : line.slice(0, at);
    const value = at < 0 ? "" : line.slice(at + 1).replace(/^ /, "");
    if (field === "data") ev.data.push(value);
    else if (field === "id") ev.id = value;
    else if (field === "event") ev.event = value;
  }
  if (!ev.data.length) return null;
  return { ...ev, data: ev.data.join("\n") };
}

// Who is signed in, and what the API says they may do. Permission checks here only decide which
// actions are offered; the API refuses anything the caller may not do regardless.
export class Me {
  constructor(whoami) {
    Object.assign(this, whoami);
    this.orgRoles = new Set(whoami.org_roles || []);
  }

  roleIn(projectId) {
    return this.is_admin ? "admin" : this.roles[projectId] || null;
  }

  get projectIds() {
    return Object.keys(this.roles);
  }

  // Project roles, lowest to highest; admin holds everything.
  atLeast(projectId, role) {
    if (this.is_admin) return true;
    const rank = { viewer: 0, developer: 1, owner: 2 };
    const mine = this.roles[projectId];
    return mine !== undefined && rank[mine] >= rank[role];
  }

  anyProjectAtLeast(role) {
    return this.is_admin || this.projectIds.some((p) => this.atLeast(p, role));
  }

  get governsLibrary() {
    return this.is_admin || this.orgRoles.has("library-approver");
  }
}

export async function whoami() {
  return new Me(await get("/auth/whoami"));
}
