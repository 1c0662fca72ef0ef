"""Search in one knowledge base: vector (pgvector, cosine), keyword (full text), hybrid (RRF).

Every query reads the base's own partition of `kb_chunks` (`WHERE kb_id = :kb`; the engine
forces custom plans, so PostgreSQL prunes to that partition at planning time), never a shared
index, so one base's size costs another nothing. How a vector query runs depends on the base:

- a base below `settings.rag.index_threshold` chunks has no index and is scanned exactly,
  ordered by the full-precision `embedding <=> q`: recall 1.0, and cheap at that size;
- an indexed base walks its HNSW index on `embedding::halfvec(dim)` with the base's
  `ef_search` (chosen by the recall probe), takes a wider candidate set than asked for and
  re-ranks it exactly with the full-precision vectors, which undoes halfvec's rounding at the
  edge of the top k;
- a metadata filter on an indexed base is first counted (through the GIN index, stopping at
  `EXACT_FILTER_ROWS`): a selective filter is answered exactly from the rows it matches (the
  graph walk would have to pass through ~N/matches tuples per result), a broad one by the index
  with `hnsw.iterative_scan = relaxed_order`, which keeps walking until enough rows pass the
  filter instead of returning the few that happened to be among the first `ef_search`.

SQL is text with bound parameters; the only values written into it are the base's dimension
(an int from the database) and fixed constants.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from converge.config import Settings
from converge.errors import Unprocessable
from converge.models.rag import KnowledgeBase
from converge.storage import vectors

MODES = ("vector", "keyword", "hybrid")
RRF_K = 60  # reciprocal rank fusion: score = sum over the lists of 1 / (RRF_K + rank)
HYBRID_DEPTH = 40  # each list fused in hybrid mode is at least this long (else k * 2)
# The index is asked for this many times k candidates, re-ranked exactly (at least ef_search
# is walked anyway; re-ranking what it found costs a few heap reads).
RERANK_FACTOR = 4
# A filter matching fewer rows than this in an indexed base is answered by an exact scan of
# those rows (a few ms through the GIN index) instead of an iterative walk of the graph.
EXACT_FILTER_ROWS = 10_000
# HNSW build memory: the graph of 100k 384-d halfvecs is ~100 MB; a build that outgrows
# maintenance_work_mem goes on on disk, several times slower.
BUILD_MEMORY = "1GB"
PROBE_QUERIES = 100  # after_ingest's probe (an API probe chooses its own)
PROBE_GROWTH = 1.25  # re-probe once a base grew by this much since its last probe


@dataclass(frozen=True, slots=True)
class Hit:
    chunk_id: int
    document_id: uuid.UUID
    text: str
    score: float
    title: str
    source: str
    heading_path: list[str]
    page: int | None
    metadata: dict[str, Any]


@dataclass(frozen=True, slots=True)
class SearchResult:
    hits: list[Hit]
    exact: bool  # the vector part was an exact scan (recall 1.0), not an index walk
    ef_search: int | None  # the ef_search the index walk used; None when it was exact or keyword
    mode: str = "vector"
    candidates: int | None = None  # how many index candidates were re-ranked


@dataclass(frozen=True, slots=True)
class Plan:
    """How a vector query runs: exactly, or through the index with these settings."""

    exact: bool
    ef_search: int | None = None
    candidates: int | None = None
    iterative: bool = False


@dataclass(slots=True)
class _Row:
    hit: Hit
    ranks: dict[str, int] = field(default_factory=dict)


def vector_literal(vector: list[float]) -> str:
    """pgvector's text form; sent as a bound parameter and cast in SQL."""
    return "[" + ",".join(repr(float(x)) for x in vector) + "]"


async def search(
    session: AsyncSession,
    kb: KnowledgeBase,
    *,
    vector: list[float] | None,
    query: str,
    k: int,
    mode: str,
    filters: dict[str, Any],
) -> SearchResult:
    """The top `k` chunks of `kb` for the query, best first (see the module for how)."""
    if mode not in MODES:
        raise Unprocessable(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if k < 1:
        raise Unprocessable(f"k must be at least 1, not {k}")
    if mode == "keyword":
        hits = await keyword_hits(session, kb, query=query, k=k, filters=filters)
        return SearchResult(hits=hits, exact=True, ef_search=None, mode=mode)
    if vector is None:
        raise Unprocessable(f"mode {mode!r} needs the query's vector")
    if len(vector) != kb.dimension:
        raise Unprocessable(
            f"the query vector has {len(vector)} dimensions; the knowledge base has {kb.dimension}"
        )
    literal = vector_literal(vector)
    depth = k if mode == "vector" else max(HYBRID_DEPTH, 2 * k)
    plan = await plan_vector(session, kb, k=depth, filters=filters)
    vector_list = await vector_hits(session, kb, literal=literal, k=depth, filters=filters, plan=plan)
    if mode == "vector":
        hits = vector_list
    else:
        keyword_list = await keyword_hits(session, kb, query=query, k=depth, filters=filters)
        hits = fuse({"vector": vector_list, "keyword": keyword_list}, k=k)
    return SearchResult(
        hits=hits, exact=plan.exact, ef_search=plan.ef_search, mode=mode, candidates=plan.candidates
    )


async def plan_vector(
    session: AsyncSession, kb: KnowledgeBase, *, k: int, filters: dict[str, Any], ef_search: int | None = None
) -> Plan:
    """Exact for an unindexed base or a selective filter; else the index, re-ranked."""
    if kb.index_state != "indexed":
        return Plan(exact=True)
    if (
        filters
        and await filtered_rows(session, kb, filters=filters, limit=EXACT_FILTER_ROWS) < EXACT_FILTER_ROWS
    ):
        return Plan(exact=True)
    candidates = k * RERANK_FACTOR
    ef = max(ef_search or kb.ef_search, candidates)
    return Plan(exact=False, ef_search=min(ef, 1000), candidates=candidates, iterative=bool(filters))


async def filtered_rows(
    session: AsyncSession, kb: KnowledgeBase, *, filters: dict[str, Any], limit: int
) -> int:
    """How many chunks of the base match the filter, counting no further than `limit`."""
    found = await session.scalar(
        text(
            "SELECT count(*) FROM (SELECT 1 FROM kb_chunks WHERE kb_id = :kb"
            " AND metadata @> CAST(:filters AS jsonb) LIMIT :limit) matching"
        ),
        {"kb": kb.id, "filters": json.dumps(filters), "limit": limit},
    )
    return int(found or 0)


def _with_details(ranked: str, *, order: str) -> str:
    """`ranked` (chunk ids and a score) joined to the chunks and their documents: the columns
    a hit carries are read for the k results only, never for every row a scan passes."""
    return (
        f"SELECT r.*, c.document_id, c.text, c.heading_path, c.page, c.metadata, d.title, d.source FROM ({ranked}) r"
        " JOIN kb_chunks c ON c.kb_id = :kb AND c.id = r.id JOIN kb_documents d ON d.id = c.document_id"
        f" ORDER BY {order}, r.id"
    )


def vector_sql(kb: KnowledgeBase, *, plan: Plan, filtered: bool, details: bool = True) -> str:
    """The SQL of a vector query under `plan`: `distance` is always the exact cosine distance."""
    dim = int(kb.dimension)
    where = "kb_id = :kb" + (" AND metadata @> CAST(:filters AS jsonb)" if filtered else "")
    exact_distance = f"embedding <=> CAST(:q AS vector({dim}))"
    if plan.exact:
        ranked = (
            f"SELECT id, {exact_distance} AS distance FROM kb_chunks WHERE {where} ORDER BY distance LIMIT :k"
        )
    else:
        # The inner ORDER BY is the indexed expression (the planner walks the HNSW index);
        # the outer one re-ranks the candidates by the full-precision distance.
        approx = f"{vectors.halfvec_expr(dim)} <=> CAST(:q AS halfvec({dim}))"
        candidates = f"SELECT id, embedding FROM kb_chunks WHERE {where} ORDER BY {approx} LIMIT :candidates"
        ranked = (
            f"SELECT id, {exact_distance} AS distance FROM ({candidates}) cand ORDER BY distance LIMIT :k"
        )
    if not details:
        return ranked
    return _with_details(ranked, order="r.distance")


_PLANNER = ("enable_seqscan", "enable_bitmapscan", "enable_sort")


async def configure(session: AsyncSession, plan: Plan) -> dict[str, str]:
    """The index walk's settings, for this transaction only (SET LOCAL, via set_config); returns
    the planner settings it changed, as they were, for `restore`.

    Other scans, and sorting the candidates, are switched off for the statement (the sorts the
    query needs anyway, of the candidates and the result, are in every plan): once the base is
    indexed, `search` has decided to walk the graph, and the planner would otherwise sort a
    small partition instead (fine for speed, but then the probe measures something else), or
    answer a broad jsonb filter from the GIN index and a sort of all its matches (it cannot tell
    a broad jsonb filter from a selective one)."""
    if plan.exact:
        return {}
    # PostgreSQL evaluates a select list left to right: the old values are read before the new set.
    row = await session.execute(
        text(
            "SELECT current_setting('enable_seqscan'), current_setting('enable_bitmapscan'),"
            " current_setting('enable_sort'), set_config('hnsw.ef_search', :ef, true),"
            " set_config('hnsw.iterative_scan', :scan, true), set_config('enable_seqscan', 'off', true),"
            " set_config('enable_bitmapscan', 'off', true), set_config('enable_sort', 'off', true)"
        ),
        {"ef": str(plan.ef_search), "scan": "relaxed_order" if plan.iterative else "off"},
    )
    return dict(zip(_PLANNER, row.one()[:3], strict=True))


async def restore(session: AsyncSession, previous: dict[str, str]) -> None:
    """Later statements in this transaction plan as usual again."""
    if previous:
        await session.execute(
            text(
                "SELECT set_config('enable_seqscan', :enable_seqscan, true),"
                " set_config('enable_bitmapscan', :enable_bitmapscan, true),"
                " set_config('enable_sort', :enable_sort, true)"
            ),
            previous,
        )


def _params(
    kb: KnowledgeBase, *, literal: str, k: int, filters: dict[str, Any], plan: Plan
) -> dict[str, Any]:
    params: dict[str, Any] = {"kb": kb.id, "q": literal, "k": k}
    if filters:
        params["filters"] = json.dumps(filters)
    if not plan.exact:
        params["candidates"] = max(plan.candidates or k, k)
    return params


async def vector_ids(
    session: AsyncSession, kb: KnowledgeBase, *, literal: str, k: int, filters: dict[str, Any], plan: Plan
) -> list[tuple[int, float]]:
    """(chunk id, exact distance) of the top k under `plan`: what the probe compares."""
    previous = await configure(session, plan)
    sql = vector_sql(kb, plan=plan, filtered=bool(filters), details=False)
    rows = await session.execute(text(sql), _params(kb, literal=literal, k=k, filters=filters, plan=plan))
    await restore(session, previous)
    return [(int(i), float(d)) for i, d in rows.all()]


async def vector_hits(
    session: AsyncSession, kb: KnowledgeBase, *, literal: str, k: int, filters: dict[str, Any], plan: Plan
) -> list[Hit]:
    previous = await configure(session, plan)
    sql = vector_sql(kb, plan=plan, filtered=bool(filters))
    rows = await session.execute(text(sql), _params(kb, literal=literal, k=k, filters=filters, plan=plan))
    await restore(session, previous)
    return [_hit(row, score=1.0 - float(row.distance)) for row in rows]


# A query written with websearch operators ("phrase", -word, or) means exactly what it says.
_OPERATORS = re.compile(r'"|(^|\s)-\w|\bor\b', re.IGNORECASE)
MAX_TERMS = 8  # words of a plain query that the fallback levels combine (C(8, 4) = 70 at most)


def keyword_sql(*, filtered: bool, levelled: bool = False) -> str:
    """Full-text matches ranked by cover density, through the partition's GIN index on `tsv`:
    of `:query` in websearch syntax (every word, "phrases", -not, or), or of `:tsquery`."""
    where = "kb_id = :kb AND tsv @@ query" + (" AND metadata @> CAST(:filters AS jsonb)" if filtered else "")
    tsquery = "CAST(:tsquery AS tsquery)" if levelled else "websearch_to_tsquery('english', :query)"
    ranked = (
        f"SELECT id, ts_rank_cd(tsv, query) AS rank FROM kb_chunks, {tsquery} query"
        f" WHERE {where} ORDER BY rank DESC, id LIMIT :k"
    )
    return _with_details(ranked, order="r.rank DESC")


def level_tsquery(lexemes: list[str], words: int) -> str:
    """A tsquery matching chunks that hold at least `words` of the lexemes: the OR of every
    `words`-subset's AND. Lexemes are quoted as tsquery input wants (no parser runs on them)."""
    quoted = ["'" + lexeme.replace("\\", "\\\\").replace("'", "''") + "'" for lexeme in lexemes]
    return " | ".join("(" + " & ".join(subset) + ")" for subset in itertools.combinations(quoted, words))


async def keyword_hits(
    session: AsyncSession, kb: KnowledgeBase, *, query: str, k: int, filters: dict[str, Any]
) -> list[Hit]:
    """The top k full-text matches. Chunks with every word of the query come first; when there
    are fewer than k of those and the query is plain words (a question, not websearch syntax),
    then chunks with all words but one, all but two, ... down to half of them (coordination
    levels): a question rarely has every one of its words in one chunk, and "any word" would
    rank tens of thousands of chunks of a large base for every common word. A query of stop
    words only matches nothing."""
    params: dict[str, Any] = {"kb": kb.id, "query": query, "k": k}
    if filters:
        params["filters"] = json.dumps(filters)
    rows = await session.execute(text(keyword_sql(filtered=bool(filters))), params)
    hits = [_hit(row, score=float(row.rank)) for row in rows]
    if len(hits) >= k or _OPERATORS.search(query):
        return hits
    found = await session.scalars(
        text("SELECT lexeme FROM unnest(to_tsvector('english', :query)) ORDER BY positions[1]"),
        {"query": query},
    )
    lexemes = list(found.all())[:MAX_TERMS]
    for words in range(len(lexemes) - 1, max(1, math.ceil(len(lexemes) / 2)) - 1, -1):
        seen = {h.chunk_id for h in hits}
        params |= {"tsquery": level_tsquery(lexemes, words), "k": k + len(seen)}  # a level holds those above
        rows = await session.execute(text(keyword_sql(filtered=bool(filters), levelled=True)), params)
        hits += [_hit(row, score=float(row.rank)) for row in rows if int(row.id) not in seen][: k - len(hits)]
        if len(hits) >= k:
            break
    return hits


def fuse(lists: dict[str, list[Hit]], *, k: int) -> list[Hit]:
    """Reciprocal rank fusion: a chunk's score is the sum of 1 / (RRF_K + rank) over the lists
    it is in (rank from 1); ties go to the better vector rank, then the chunk id."""
    rows: dict[int, _Row] = {}
    for name, hits in lists.items():
        for rank, hit in enumerate(hits, start=1):
            rows.setdefault(hit.chunk_id, _Row(hit)).ranks[name] = rank
    scored = [
        (sum(1.0 / (RRF_K + r) for r in row.ranks.values()), row.ranks.get("vector", 1 << 30), chunk_id, row)
        for chunk_id, row in rows.items()
    ]
    scored.sort(key=lambda item: (-item[0], item[1], item[2]))
    return [_with_score(row.hit, score) for score, _, _, row in scored[:k]]


def _with_score(hit: Hit, score: float) -> Hit:
    return Hit(
        chunk_id=hit.chunk_id,
        document_id=hit.document_id,
        text=hit.text,
        score=score,
        title=hit.title,
        source=hit.source,
        heading_path=hit.heading_path,
        page=hit.page,
        metadata=hit.metadata,
    )


def _hit(row: Any, *, score: float) -> Hit:
    return Hit(
        chunk_id=int(row.id),
        document_id=row.document_id,
        text=row.text,
        score=score,
        title=row.title,
        source=row.source,
        heading_path=list(row.heading_path or []),
        page=row.page,
        metadata=dict(row.metadata or {}),
    )


async def chunk_count(session: AsyncSession, kb: KnowledgeBase) -> int:
    return int(
        await session.scalar(text("SELECT count(*) FROM kb_chunks WHERE kb_id = :kb"), {"kb": kb.id}) or 0
    )


async def after_ingest(session: AsyncSession, kb: KnowledgeBase, settings: Settings) -> None:  # noqa: PLR0917
    """Index the base once it reaches `settings.rag.index_threshold` chunks, and keep its
    `ef_search` measured: probe after the index is built and whenever the base has grown by a
    quarter since the last probe. Runs in the caller's transaction (the build blocks writers of
    this base only)."""
    from converge.control.rag.probe import probe  # probe imports this module

    count = await chunk_count(session, kb)
    if kb.index_state != "indexed":
        if count < settings.rag.index_threshold:
            return
        await session.execute(
            text("SELECT set_config('maintenance_work_mem', :mem, true)"), {"mem": BUILD_MEMORY}
        )
        await vectors.create_hnsw_index(session, kb.id, dimension=kb.dimension)
        kb.index_state = "indexed"
        await session.execute(text(f"ANALYZE {vectors.partition_name(kb.id)}"))
        await probe(session, kb, queries=PROBE_QUERIES, k=10, settings=settings)
    elif kb.probe is None or count >= PROBE_GROWTH * int(kb.probe.get("chunks") or 0):
        await session.execute(text(f"ANALYZE {vectors.partition_name(kb.id)}"))
        await probe(session, kb, queries=PROBE_QUERIES, k=10, settings=settings)
    await session.flush()
