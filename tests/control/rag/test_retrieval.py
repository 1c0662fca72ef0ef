"""Retrieval and the recall probe on real PostgreSQL/pgvector, with synthetic unit vectors.

Bases are made directly in SQL (a project, the base, its partition, a document and chunks)
inside a transaction that is rolled back, so no embedding server is needed: each test knows
the exact answer from numpy and checks what the exact path, the HNSW path, filters, keyword
and hybrid search return, that two bases never see each other's chunks, and that the plans
touch only the base's own partition (and its HNSW index when it has one).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from support import make_settings

from converge.config import Settings
from converge.control.rag import probe as probe_mod
from converge.control.rag import retrieval
from converge.models import Project
from converge.models.rag import KnowledgeBase
from converge.storage import vectors

DIM = 16


@pytest.fixture
async def session(app: Any) -> AsyncIterator[AsyncSession]:
    """A session whose every write (DDL included) is rolled back after the test."""
    async with app.state.converge.engine.connect() as conn:
        outer = await conn.begin()
        db = AsyncSession(bind=conn, expire_on_commit=False, join_transaction_mode="create_savepoint")
        try:
            yield db
        finally:
            await db.close()
            await outer.rollback()


@pytest.fixture
def rag_settings(pg_url: str, tmp_path: Path) -> Settings:
    """Index at 200 chunks, so the HNSW paths run on small bases."""
    return make_settings(pg_url, tmp_path, rag={"index_threshold": 200, "recall_target": 0.95})


def unit_vectors(n: int, *, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


async def make_base(
    session: AsyncSession,
    vecs: np.ndarray,
    *,
    texts: list[str] | None = None,
    metadata: list[dict[str, Any]] | None = None,
) -> tuple[KnowledgeBase, list[int]]:
    """A base holding one chunk per vector (one document); returns it and the chunk ids in order."""
    project = Project(name=f"p-{uuid.uuid4().hex[:10]}")
    session.add(project)
    await session.flush()
    kb = KnowledgeBase(
        project_id=project.id,
        name="kb",
        dimension=DIM,
        max_tokens=256,
        chunking={},
        retrieval={},
        metadata_keys=[],
        created_by="test",
    )
    session.add(kb)
    await session.flush()
    await vectors.create_partition(session, kb.id)
    return kb, await add_chunks(session, kb, vecs, texts=texts, metadata=metadata)


async def add_chunks(
    session: AsyncSession,
    kb: KnowledgeBase,
    vecs: np.ndarray,
    *,
    texts: list[str] | None = None,
    metadata: list[dict[str, Any]] | None = None,
) -> list[int]:
    """One more document with one chunk per vector; its chunk ids in order."""
    doc = uuid.uuid4()
    await session.execute(
        text(
            "INSERT INTO kb_documents (id, kb_id, project_id, source, title, media_type, content_hash, bytes,"
            " chunk_count, metadata, created_at, updated_at) VALUES (:id, :kb, :p, :source, 'The doc',"
            " 'text/plain', 'x', 1, :n, '{}', now(), now())"
        ),
        {"id": doc, "kb": kb.id, "p": kb.project_id, "source": f"doc-{doc.hex[:6]}.txt", "n": len(vecs)},
    )
    rows = [
        {
            "kb": kb.id,
            "doc": doc,
            "ord": i,
            "text": texts[i] if texts else f"chunk number {i}",
            "meta": json.dumps(metadata[i] if metadata else {}),
            "emb": retrieval.vector_literal(v.tolist()),
        }
        for i, v in enumerate(vecs)
    ]
    await session.execute(
        text(
            "INSERT INTO kb_chunks (kb_id, document_id, ordinal, text, tokens, heading_path, page, metadata, embedding)"
            " VALUES (:kb, :doc, :ord, :text, 3, ARRAY['Intro', 'Part'], 2, CAST(:meta AS jsonb), CAST(:emb AS vector))"
        ),
        rows,
    )
    found = await session.scalars(
        text("SELECT id FROM kb_chunks WHERE kb_id = :kb AND document_id = :doc ORDER BY ordinal"),
        {"kb": kb.id, "doc": doc},
    )
    return list(found.all())


def exact_top(vecs: np.ndarray, query: np.ndarray, k: int, *, among: np.ndarray | None = None) -> list[int]:
    """Positions of the k nearest by cosine (numpy), optionally among some positions only."""
    among = np.arange(len(vecs)) if among is None else among
    sims = vecs[among] @ query
    return [int(among[i]) for i in np.argsort(-sims, kind="stable")[:k]]


async def explain(
    session: AsyncSession, kb: KnowledgeBase, plan: retrieval.Plan, *, filters: dict[str, Any]
) -> str:
    query = retrieval.vector_literal(unit_vectors(1, seed=99)[0].tolist())
    previous = await retrieval.configure(session, plan)
    sql = "EXPLAIN " + retrieval.vector_sql(kb, plan=plan, filtered=bool(filters))
    params: dict[str, Any] = {"kb": kb.id, "q": query, "k": 10, "candidates": 40}
    if filters:
        params["filters"] = json.dumps(filters)
    rows = await session.execute(text(sql), params)
    await retrieval.restore(session, previous)
    return "\n".join(r[0] for r in rows)


async def test_a_small_base_is_searched_exactly(session: AsyncSession) -> None:
    vecs = unit_vectors(150, seed=1)
    kb, ids = await make_base(session, vecs)
    query = unit_vectors(1, seed=2)[0]
    result = await retrieval.search(
        session, kb, vector=query.tolist(), query="", k=5, mode="vector", filters={}
    )
    assert result.exact and result.ef_search is None
    assert [h.chunk_id for h in result.hits] == [ids[i] for i in exact_top(vecs, query, 5)]
    top = result.hits[0]
    assert top.score == pytest.approx(float(vecs[exact_top(vecs, query, 1)[0]] @ query), abs=1e-5)
    assert (top.title, top.heading_path, top.page) == ("The doc", ["Intro", "Part"], 2)
    assert top.source.startswith("doc-") and top.text.startswith("chunk number")


async def test_after_ingest_indexes_a_base_at_the_threshold_and_probes_it(
    session: AsyncSession, rag_settings: Settings
) -> None:
    small, _ = await make_base(session, unit_vectors(150, seed=3))
    await retrieval.after_ingest(session, small, rag_settings)
    assert small.index_state == "exact" and not await vectors.has_hnsw_index(session, small.id)

    vecs = unit_vectors(600, seed=4)
    kb, ids = await make_base(session, vecs)
    await retrieval.after_ingest(session, kb, rag_settings)
    assert kb.index_state == "indexed" and await vectors.has_hnsw_index(session, kb.id)
    assert kb.probe is not None and kb.probe["exact"] is False and kb.probe["chunks"] == 600
    assert kb.probe["recall"] >= 0.95 and kb.probe["target_met"]
    assert kb.ef_search == kb.probe["ef_search"] in [step["ef_search"] for step in kb.probe["ladder"]]
    assert {"p50_ms", "p95_ms"} <= set(kb.probe["latency"]["approximate"]) | set(kb.probe["latency"]["exact"])

    found = wanted = 0
    for q in unit_vectors(20, seed=5):
        result = await retrieval.search(
            session, kb, vector=q.tolist(), query="", k=10, mode="vector", filters={}
        )
        assert not result.exact and result.ef_search is not None and result.ef_search >= 40
        found += len({h.chunk_id for h in result.hits} & {ids[i] for i in exact_top(vecs, q, 10)})
        wanted += 10
        assert [h.score for h in result.hits] == sorted((h.score for h in result.hits), reverse=True)
    assert found / wanted >= 0.95


async def test_after_ingest_probes_again_once_the_base_has_grown_by_a_quarter(
    session: AsyncSession, rag_settings: Settings
) -> None:
    kb, _ = await make_base(session, unit_vectors(240, seed=20))
    await retrieval.after_ingest(session, kb, rag_settings)
    assert kb.probe is not None and kb.probe["chunks"] == 240
    first = kb.probe["probed_at"]
    await add_chunks(session, kb, unit_vectors(20, seed=21))  # +8%: the last probe still stands
    await retrieval.after_ingest(session, kb, rag_settings)
    assert kb.probe["probed_at"] == first
    await add_chunks(session, kb, unit_vectors(60, seed=22))  # 320 chunks: +33% since the probe
    await retrieval.after_ingest(session, kb, rag_settings)
    assert kb.probe["chunks"] == 320 and kb.probe["probed_at"] != first


async def test_plans_read_only_the_base_partition_and_its_hnsw_index(
    session: AsyncSession, rag_settings: Settings
) -> None:
    other, _ = await make_base(session, unit_vectors(300, seed=6))
    kb, _ = await make_base(session, unit_vectors(300, seed=7))
    await retrieval.after_ingest(session, kb, rag_settings)
    await retrieval.after_ingest(session, other, rag_settings)
    mine, theirs = vectors.partition_name(kb.id), vectors.partition_name(other.id)

    approx = await retrieval.plan_vector(session, kb, k=10, filters={})
    plan = await explain(session, kb, approx, filters={})
    assert vectors.index_name(kb.id) in plan and "hnsw" not in plan.replace(vectors.index_name(kb.id), "")
    assert theirs not in plan

    exact = await explain(session, kb, retrieval.Plan(exact=True), filters={})
    assert mine in exact and theirs not in exact and vectors.index_name(kb.id) not in exact

    iterative = retrieval.Plan(exact=False, ef_search=40, candidates=40, iterative=True)
    filtered = await explain(session, kb, iterative, filters={"shard": 1})
    assert vectors.index_name(kb.id) in filtered and theirs not in filtered
    assert (await session.scalar(text("SHOW enable_seqscan"))) == "on"  # restored after the statement

    params = {"kb": kb.id, "query": "chunk number", "k": 10, "filters": '{"shard": 1}'}
    rows = await session.execute(text("EXPLAIN " + retrieval.keyword_sql(filtered=True)), params)
    keyword = "\n".join(r[0] for r in rows)
    assert mine in keyword and theirs not in keyword


async def test_a_selective_filter_is_answered_exactly_in_an_indexed_base(
    session: AsyncSession, rag_settings: Settings
) -> None:
    vecs = unit_vectors(1000, seed=8)
    meta = [{"shard": i % 100, "lang": "en"} for i in range(1000)]  # shard 7: 1% of the base
    kb, ids = await make_base(session, vecs, metadata=meta)
    await retrieval.after_ingest(session, kb, rag_settings)
    among = np.array([i for i in range(1000) if i % 100 == 7])
    q = unit_vectors(1, seed=9)[0]
    result = await retrieval.search(
        session, kb, vector=q.tolist(), query="", k=10, mode="vector", filters={"shard": 7}
    )
    assert result.exact
    assert [h.chunk_id for h in result.hits] == [ids[i] for i in exact_top(vecs, q, 10, among=among)]
    assert all(h.metadata["shard"] == 7 for h in result.hits)


async def test_a_filter_through_the_index_scans_iteratively(
    session: AsyncSession, rag_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the exact shortcut off, a 1% filter walks the graph with relaxed_order: k rows
    that pass, not the one or two that were among the first ef_search."""
    monkeypatch.setattr(retrieval, "EXACT_FILTER_ROWS", 1)
    vecs = unit_vectors(2000, seed=10)
    meta = [{"shard": i % 100} for i in range(2000)]
    kb, ids = await make_base(session, vecs, metadata=meta)
    await retrieval.after_ingest(session, kb, rag_settings)
    among = np.array([i for i in range(2000) if i % 100 == 3])
    found = 0
    for q in unit_vectors(10, seed=11):
        result = await retrieval.search(
            session, kb, vector=q.tolist(), query="", k=10, mode="vector", filters={"shard": 3}
        )
        assert not result.exact and len(result.hits) == 10
        assert all(h.metadata["shard"] == 3 for h in result.hits)
        found += len(
            {h.chunk_id for h in result.hits} & {ids[i] for i in exact_top(vecs, q, 10, among=among)}
        )
    assert found / 100 >= 0.9

    plain = retrieval.Plan(exact=False, ef_search=40, candidates=40, iterative=False)
    literal = retrieval.vector_literal(unit_vectors(1, seed=12)[0].tolist())
    without = await retrieval.vector_ids(session, kb, literal=literal, k=10, filters={"shard": 3}, plan=plain)
    assert len(without) < 10  # what pgvector before 0.8 returned


async def test_keyword_search_ranks_full_text_matches_and_filters(session: AsyncSession) -> None:
    texts = [
        "Configuring the PostgreSQL connection pool size and timeouts",
        "The quick brown fox jumps over the lazy dog",
        "Rotating API keys for a project without downtime",
        "PostgreSQL partitions keep each knowledge base apart",
        "Notes about gardening and tomatoes",
    ]
    meta = [{"team": "db"}, {"team": "zoo"}, {"team": "sec"}, {"team": "rag"}, {"team": "zoo"}]
    kb, ids = await make_base(session, unit_vectors(5, seed=13), texts=texts, metadata=meta)

    result = await retrieval.search(
        session, kb, vector=None, query="postgresql partitions", k=5, mode="keyword", filters={}
    )
    assert [h.chunk_id for h in result.hits] == [ids[3], ids[0]]  # every word first, then any word
    result = await retrieval.search(
        session, kb, vector=None, query="PostgreSQL", k=5, mode="keyword", filters={}
    )
    assert {h.chunk_id for h in result.hits} == {ids[0], ids[3]} and result.hits[0].score > 0
    result = await retrieval.search(
        session, kb, vector=None, query="PostgreSQL", k=5, mode="keyword", filters={"team": "db"}
    )
    assert [h.chunk_id for h in result.hits] == [ids[0]]
    result = await retrieval.search(
        session, kb, vector=None, query="rotate keys -downtime", k=5, mode="keyword", filters={}
    )
    assert result.hits == []  # websearch syntax: "-downtime" excludes the one match
    result = await retrieval.search(
        session, kb, vector=None, query="how do I rotate my secret keys?", k=5, mode="keyword", filters={}
    )
    assert [h.chunk_id for h in result.hits] == [ids[2]]  # no chunk has every word ("secret")
    result = await retrieval.search(
        session, kb, vector=None, query='"lazy fox"', k=5, mode="keyword", filters={}
    )
    assert result.hits == []  # a phrase means the phrase
    result = await retrieval.search(
        session, kb, vector=None, query="the and of", k=5, mode="keyword", filters={}
    )
    assert result.hits == []  # stop words only


async def test_keyword_fallback_goes_down_coordination_levels_to_half_the_words(
    session: AsyncSession,
) -> None:
    texts = [
        "replica health probes restart a crashed server",  # 3 of the 4 words
        "the probes of a replica",  # 2 of 4
        "a server in the rack",  # 1 of 4: below half, never matched
        "replica replica replica",  # 1 of 4, however often
    ]
    kb, ids = await make_base(session, unit_vectors(4, seed=23), texts=texts)
    result = await retrieval.search(
        session,
        kb,
        vector=None,
        query="why do replica probes restart the gateway",
        k=5,
        mode="keyword",
        filters={},
    )
    assert [h.chunk_id for h in result.hits] == [ids[0], ids[1]]


def test_level_tsquery_is_every_subset_of_the_words_quoted() -> None:
    assert retrieval.level_tsquery(["a", "b", "c"], 2) == "('a' & 'b') | ('a' & 'c') | ('b' & 'c')"
    assert retrieval.level_tsquery(["o'neil", "x"], 1) == "('o''neil') | ('x')"


def test_probe_recall_bound_is_below_the_mean_when_queries_disagree() -> None:
    mean, lower = probe_mod._recall([1.0] * 19 + [0.0])
    assert mean == pytest.approx(0.95) and lower < 0.92  # one query that misses everything
    assert probe_mod._recall([1.0] * 20) == (1.0, 1.0)
    assert probe_mod._recall([]) == (1.0, 1.0)


async def test_hybrid_fuses_vector_and_keyword_ranks(session: AsyncSession) -> None:
    vecs = unit_vectors(50, seed=14)
    q = unit_vectors(1, seed=15)[0]
    order = exact_top(vecs, q, 50)
    texts = [f"filler text {i}" for i in range(50)]
    texts[order[1]] = "retrieval augmented generation with pgvector"  # 2nd by vector, only keyword match
    kb, ids = await make_base(session, vecs, texts=texts)

    result = await retrieval.search(
        session, kb, vector=q.tolist(), query="pgvector", k=5, mode="hybrid", filters={}
    )
    assert result.mode == "hybrid" and result.exact
    assert result.hits[0].chunk_id == ids[order[1]]
    assert result.hits[0].score == pytest.approx(1 / 62 + 1 / 61)
    assert result.hits[1].chunk_id == ids[order[0]] and result.hits[1].score == pytest.approx(1 / 61)


def test_fuse_is_reciprocal_rank_fusion() -> None:
    def hit(i: int) -> retrieval.Hit:
        return retrieval.Hit(i, uuid.uuid4(), "", 0.0, "", "", [], None, {})

    a, b, c, d = hit(1), hit(2), hit(3), hit(4)
    fused = retrieval.fuse({"vector": [a, b, c], "keyword": [c, d]}, k=3)
    assert [h.chunk_id for h in fused] == [
        3,
        1,
        2,
    ]  # 1/63 + 1/61 > 1/61 > 1/62 (tie with 4: vector rank wins)
    assert fused[0].score == pytest.approx(1 / 63 + 1 / 61)


async def test_two_bases_never_see_each_others_chunks(session: AsyncSession, rag_settings: Settings) -> None:
    vecs = unit_vectors(300, seed=16)
    first, first_ids = await make_base(session, vecs, texts=[f"shared words {i}" for i in range(300)])
    second, second_ids = await make_base(session, vecs, texts=[f"shared words {i}" for i in range(300)])
    await retrieval.after_ingest(session, first, rag_settings)  # one indexed, one exact
    for mode in ("vector", "keyword", "hybrid"):
        for kb, mine in ((first, set(first_ids)), (second, set(second_ids))):
            result = await retrieval.search(
                session, kb, vector=vecs[0].tolist(), query="shared words", k=20, mode=mode, filters={}
            )
            assert result.hits and {h.chunk_id for h in result.hits} <= mine
    probed = await probe_mod.probe(session, second, queries=20, k=5, settings=rag_settings)
    assert probed["chunks"] == 300 and probed["exact"] is True


def test_probe_queries_are_moved_off_the_graph_by_the_given_distance() -> None:
    import random

    v = unit_vectors(1, seed=19)[0].tolist()
    moved = probe_mod.off_graph(v, distance=0.2, rng=random.Random(1))
    assert float(np.linalg.norm(moved)) == pytest.approx(1.0, abs=1e-6)
    assert float(np.dot(moved, v)) == pytest.approx(0.8, abs=1e-6)


async def test_probe_of_an_exact_base_says_so(session: AsyncSession, rag_settings: Settings) -> None:
    kb, _ = await make_base(session, unit_vectors(100, seed=17))
    result = await probe_mod.probe(session, kb, queries=10, k=5, settings=rag_settings)
    assert result["exact"] is True and result["recall"] == 1.0 and result["ef_search"] is None
    assert result["queries"] == 10 and "p95_ms" in result["latency"]["exact"]
    assert kb.probe == result and kb.ef_search == 40


async def test_bad_requests_name_the_problem(session: AsyncSession) -> None:
    kb, _ = await make_base(session, unit_vectors(5, seed=18))
    with pytest.raises(retrieval.Unprocessable, match="dimensions"):
        await retrieval.search(session, kb, vector=[0.1] * 3, query="", k=5, mode="vector", filters={})
    with pytest.raises(retrieval.Unprocessable, match="mode"):
        await retrieval.search(session, kb, vector=None, query="x", k=5, mode="fuzzy", filters={})
    with pytest.raises(retrieval.Unprocessable, match="vector"):
        await retrieval.search(session, kb, vector=None, query="x", k=5, mode="hybrid", filters={})
