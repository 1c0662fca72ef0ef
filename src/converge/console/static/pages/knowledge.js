// Knowledge bases: the list, and a base's page with its ingestion jobs (live progress), its
// documents and a search box that shows the chunks retrieved with their scores.
import { all, get, post } from "../api.js";
import { badge, bytes, clear, h, kv, problem, section, short, table, when } from "../dom.js";

const REFRESH_MS = 2000;

export async function render(root, ctx, args) {
  if (args[0]) return detail(root, ctx, args[0]);
  const rows = await all("/knowledge-bases", {}, 500);
  const name = (id) => ctx.projects.find((p) => p.id === id)?.name || short(id);
  root.append(
    h("h1", "Knowledge bases"),
    table(
      [
        { title: "Name", render: (k) => h("a", { href: `#/knowledge/${k.id}` }, k.name) },
        { title: "Project", render: (k) => name(k.project_id) },
        { title: "Documents", render: (k) => String(k.stats.documents) },
        { title: "Chunks", render: (k) => String(k.stats.chunks) },
        { title: "Size", render: (k) => bytes(k.stats.bytes) },
        { title: "Embeddings", render: (k) => k.embedding_deployment || "" },
        { title: "Last ingested", render: (k) => when(k.last_ingested_at) },
      ],
      rows,
      { empty: "No knowledge bases yet (create one with `converge kb create`)." },
    ),
  );
  return undefined;
}

function progressOf(job) {
  const p = job.progress || {};
  const total = p.chunks_total || p.documents_total || 0;
  const done = p.chunks_total ? p.chunks_done : p.documents_done;
  const pct = total ? Math.round((100 * (done || 0)) / total) : job.state === "succeeded" ? 100 : 0;
  const bar = h("div", { class: "progress" }, h("div", { class: "fill" }));
  bar.firstChild.style.width = `${pct}%`;
  return h("div", bar, h("small", `${p.documents_done ?? 0}/${p.documents_total ?? 0} documents, ${p.chunks_done ?? 0}/${p.chunks_total ?? 0} chunks`));
}

async function detail(root, ctx, id) {
  const kb = await get(`/knowledge-bases/${id}`);
  const jobsBox = h("div", { id: "kb-jobs" });
  const docsBox = h("div");
  const query = h("input", { id: "kb-query", type: "search", placeholder: "Ask the base…", size: 50, required: true });
  const k = h("input", { id: "kb-k", type: "number", min: "1", max: "100", value: String(kb.retrieval?.k ?? 5), size: 4 });
  const hits = h("div", { id: "kb-hits" });
  const form = h("form", { class: "toolbar" }, query, h("label", "k ", k), h("button", { type: "submit", class: "primary" }, "Search"));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clear(hits);
    try {
      const answer = await post(`/knowledge-bases/${id}/search`, { query: query.value, k: Number(k.value) });
      hits.append(h("p", { class: "muted" }, `${answer.results.length} chunks, ${answer.mode} search${answer.exact ? " (exact)" : ""}, ${answer.took_ms.toFixed(1)} ms`));
      for (const hit of answer.results) {
        hits.append(
          h(
            "article",
            { class: "hit" },
            h("header", h("strong", hit.title || hit.source), " ", badge(hit.score.toFixed(3), "plain"), hit.page ? ` page ${hit.page}` : "", hit.heading_path.length ? ` · ${hit.heading_path.join(" › ")}` : ""),
            h("p", hit.text),
          ),
        );
      }
    } catch (err) {
      hits.append(problem(err));
    }
  });
  root.append(
    h("p", h("a", { href: "#/knowledge" }, "← Knowledge bases")),
    h("h1", kb.name),
    h("p", kb.description),
    kv([
      ["Documents", String(kb.stats.documents)],
      ["Chunks", String(kb.stats.chunks)],
      ["Size", bytes(kb.stats.bytes)],
      ["Embedding deployment", kb.embedding_deployment],
      ["Dimension", String(kb.dimension)],
      ["Index", `${kb.index.state} (ef_search ${kb.index.ef_search})`],
      ["Retrieval", `${kb.retrieval?.mode ?? ""}, k ${kb.retrieval?.k ?? ""}`],
    ]),
    section("Search", form, hits),
    section("Ingestions", jobsBox),
    section("Documents", docsBox),
  );

  async function refresh() {
    const [jobs, docs] = await Promise.all([get(`/knowledge-bases/${id}/ingestions`, { limit: 20 }), get(`/knowledge-bases/${id}/documents`, { limit: 100 })]);
    clear(jobsBox).append(
      table(
        [
          { title: "Job", render: (j) => short(j.id) },
          { title: "State", render: (j) => badge(j.state) },
          { title: "Progress", render: progressOf },
          { title: "Errors", render: (j) => j.errors.map((e) => `${e.document}: ${e.reason}`).join("; ") },
          { title: "Created", render: (j) => when(j.created_at) },
        ],
        jobs.items,
        { empty: "Nothing ingested yet." },
      ),
    );
    clear(docsBox).append(
      table(
        [
          { title: "Title", render: (d) => d.title || d.source },
          { title: "Source", key: "source" },
          { title: "Chunks", render: (d) => String(d.chunk_count) },
          { title: "Created", render: (d) => when(d.created_at) },
        ],
        docs.items,
        { empty: "No documents." },
      ),
    );
    return jobs.items.some((j) => ["queued", "running"].includes(j.state));
  }

  let active = await refresh();
  const timer = setInterval(async () => {
    if (active) active = await refresh().catch(() => false);
  }, REFRESH_MS);
  return () => clearInterval(timer);
}
