"""The recall probe: how much of the exact top k does the base's index search find?

Queries come from the base's own chunks (a Bernoulli sample of its partition), but a chunk's
own vector is a poor query for an HNSW graph: it is a node of the graph, linked at insertion
to its nearest neighbours, so the walk that reaches it finds them all and the recall looks
better than any real question gets (measured on real text: 0.997 for chunk vectors where
held-out texts of the same corpus got 0.986). So each sampled vector is moved off the graph,
in a random direction, by its own distance to its nearest neighbour: a new point of that
neighbourhood, like a text the base has not seen, with the chunk itself as one of its
neighbours. For each such query the exact top k (a scan ordered by the full-precision
distance, which the halfvec index cannot serve) is compared with the top k of the index walk
exactly as `retrieval.search` runs it (same candidate set, same re-ranking), at each
`ef_search` of a ladder until recall@k meets `settings.rag.recall_target` with 95% confidence
(the one-sided lower bound of the mean, from the spread between queries); that `ef_search`
becomes the base's.

An unindexed base is searched exactly, so its recall is 1.0 by construction: the result says
`"exact": true` and only the exact latency is measured.
"""

from __future__ import annotations

import json
import math
import random
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from converge.config import Settings
from converge.control.rag import retrieval
from converge.models.rag import KnowledgeBase

EF_LADDER = (40, 80, 160, 320, 640, 1000)
MIN_OFFSET = 0.01  # cosine distance a query moves at least (a chunk with a duplicate has 0)
Z_95 = 1.645  # one-sided 95%: the ef_search chosen meets the target with that confidence


async def sample(
    session: AsyncSession, kb: KnowledgeBase, *, n: int, count: int
) -> list[tuple[int, list[float]]]:
    """Up to `n` random chunks of the base: (id, vector)."""
    if count <= 0 or n <= 0:
        return []
    percent = min(100.0, 100.0 * 3 * n / count)  # 3x: a Bernoulli sample's size varies
    rows = await session.execute(
        text(
            "SELECT id, embedding::text FROM kb_chunks TABLESAMPLE BERNOULLI (:percent)"
            " WHERE kb_id = :kb ORDER BY random() LIMIT :n"
        ),
        {"percent": percent, "kb": kb.id, "n": n},
    )
    return [(int(i), [float(x) for x in json.loads(v)]) for i, v in rows.all()]


def off_graph(vector: list[float], *, distance: float, rng: random.Random) -> list[float]:
    """A unit vector at cosine distance `distance` from `vector` (a unit vector), in a random
    direction: cos = 1 - distance, the rest orthogonal."""
    noise = [rng.gauss(0.0, 1.0) for _ in vector]
    along = sum(a * b for a, b in zip(noise, vector, strict=True))
    ortho = [n - along * v for n, v in zip(noise, vector, strict=True)]
    norm = math.sqrt(sum(x * x for x in ortho)) or 1.0
    cos = max(-1.0, min(1.0, 1.0 - distance))
    sin = math.sqrt(max(0.0, 1.0 - cos * cos))
    return [cos * v + sin * o / norm for v, o in zip(vector, ortho, strict=True)]


def _recall(per_query: list[float]) -> tuple[float, float]:
    """Mean recall over the queries and its one-sided 95% lower bound (from the spread between
    queries: a few hard queries, not independent misses, are what a small sample gets wrong)."""
    if not per_query:
        return 1.0, 1.0
    n = len(per_query)
    mean = sum(per_query) / n
    spread = math.sqrt(sum((r - mean) ** 2 for r in per_query) / (n - 1)) if n > 1 else 0.0
    return mean, mean - Z_95 * spread / math.sqrt(n)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _latency(samples_ms: list[float]) -> dict[str, float]:
    if not samples_ms:
        return {}
    return {"p50_ms": round(percentile(samples_ms, 50), 2), "p95_ms": round(percentile(samples_ms, 95), 2)}


async def _top(
    session: AsyncSession, kb: KnowledgeBase, *, literal: str, k: int, plan: retrieval.Plan
) -> tuple[list[tuple[int, float]], float]:
    """The top k (id, distance) under `plan`, and the milliseconds it took."""
    start = time.perf_counter()
    found = await retrieval.vector_ids(session, kb, literal=literal, k=k, filters={}, plan=plan)
    return found, (time.perf_counter() - start) * 1000


async def queries_for(
    session: AsyncSession, kb: KnowledgeBase, *, picked: list[tuple[int, list[float]]], seed: int
) -> list[str]:
    """The probe's query vectors (pgvector text form): off the graph for an indexed base."""
    if kb.index_state != "indexed":
        return [retrieval.vector_literal(v) for _, v in picked]
    rng = random.Random(seed)
    plan = await retrieval.plan_vector(session, kb, k=2, filters={})
    out = []
    for own, vector in picked:
        near, _ = await _top(session, kb, literal=retrieval.vector_literal(vector), k=2, plan=plan)
        nearest = next((d for i, d in near if i != own), MIN_OFFSET)
        out.append(retrieval.vector_literal(off_graph(vector, distance=max(nearest, MIN_OFFSET), rng=rng)))
    return out


async def probe(
    session: AsyncSession, kb: KnowledgeBase, *, queries: int, k: int, settings: Settings
) -> dict[str, Any]:
    """Measure recall@k and latency, choose `ef_search`, and store both on `kb` (the caller
    commits). Returns what it stored as `kb.probe`."""
    count = await retrieval.chunk_count(session, kb)
    picked = await sample(session, kb, n=queries, count=count)
    literals = await queries_for(session, kb, picked=picked, seed=kb.id.int & 0xFFFFFFFF)
    target = settings.rag.recall_target
    truth: list[set[int]] = []
    exact_ms: list[float] = []
    for literal in literals:
        found, took = await _top(session, kb, literal=literal, k=k, plan=retrieval.Plan(exact=True))
        truth.append({i for i, _ in found})
        exact_ms.append(took)
    result: dict[str, Any] = {
        "exact": kb.index_state != "indexed",
        "k": k,
        "queries": len(literals),
        "chunks": count,
        "target": target,
        "latency": {"exact": _latency(exact_ms)},
        "probed_at": datetime.now(UTC).isoformat(),
    }
    if result["exact"]:
        result |= {"recall": 1.0, "target_met": True, "ef_search": None, "ladder": []}
    else:
        climbed = await climb(session, kb, literals=literals, truth=truth, k=k, target=target)
        result |= climbed | {"latency": result["latency"] | climbed["latency"]}
        kb.ef_search = result["ef_search"]
    kb.probe = result
    return result


async def climb(
    session: AsyncSession,
    kb: KnowledgeBase,
    *,
    literals: list[str],
    truth: list[set[int]],
    k: int,
    target: float,
    ladder_steps: tuple[int, ...] = EF_LADDER,
) -> dict[str, Any]:
    """Walk the ladder up until the recall meets the target (or the ladder ends)."""
    ladder: list[dict[str, Any]] = []
    plan = retrieval.Plan(exact=True)
    for ef in ladder_steps:
        plan = await retrieval.plan_vector(session, kb, k=k, filters={}, ef_search=ef)
        per_query, took_ms = [], []
        for literal, expected in zip(literals, truth, strict=True):
            ids, took = await _top(session, kb, literal=literal, k=k, plan=plan)
            if expected:
                per_query.append(len({i for i, _ in ids} & expected) / len(expected))
            took_ms.append(took)
        recall, lower = _recall(per_query)
        ladder.append(
            {
                "ef_search": plan.ef_search,
                "recall": round(recall, 4),
                "recall_lower": round(lower, 4),
                **_latency(took_ms),
            }
        )
        if lower >= target:
            break
    best = ladder[-1]
    return {
        "recall": best["recall"],
        "recall_lower": best["recall_lower"],
        "target_met": best["recall_lower"] >= target,
        "ef_search": best["ef_search"],
        "candidates": plan.candidates,
        "latency": {"approximate": {key: v for key, v in best.items() if key.endswith("_ms")}},
        "ladder": ladder,
    }
