"""What a RAG model sends its chat deployment: the question's chunks from its knowledge bases
(embedded and searched as the caller, through the gateway), those below `min_score` dropped, the
rest numbered into the prompt template; and the citations and retrieval report that go back in
the answer's `converge` field.

Scores: in vector mode a hit's score is the cosine similarity of chunk and question (0..1); in
hybrid mode the order is reciprocal rank fusion of the vector and keyword lists, and `min_score`
is held against the chunk's cosine similarity (a chunk found by keywords only, outside the
vector candidates, has none and passes only when `min_score` is 0); in keyword mode it is the
full-text rank. Several knowledge bases are searched each for `k` and merged by score.
A base whose embedding deployment was deleted is searched by keywords only.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from converge.control.chat.ragmodels import repository
from converge.control.chat.ragmodels.schemas import CONTEXT, QUESTION
from converge.control.rag import retrieval
from converge.control.rag.embedder import Embedder, EmbeddingFailed
from converge.gateway.api import Caller, Gateway, GatewayError
from converge.models import KnowledgeBase

HYBRID_DEPTH = retrieval.HYBRID_DEPTH
NO_SOURCES = "(no relevant sources were found)"


@dataclass(frozen=True, slots=True)
class Source:
    """One retrieved chunk, as numbered in the prompt (`n`, from 1)."""

    n: int
    kb_id: uuid.UUID
    hit: retrieval.Hit
    score: float  # the mode's score (what the hits were ordered by)
    similarity: float | None  # cosine similarity to the question, when the vector list had it

    def citation(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "knowledge_base_id": str(self.kb_id),
            "document_id": str(self.hit.document_id),
            "chunk_id": self.hit.chunk_id,
            "title": self.hit.title,
            "source": self.hit.source,
            "page": self.hit.page,
            "score": round(self.score, 6),
        }


@dataclass(slots=True)
class Grounding:
    sources: list[Source] = field(default_factory=list)
    reason: str = ""  # why nothing was used, when nothing was

    @property
    def used(self) -> bool:
        return bool(self.sources)

    def report(self) -> dict[str, Any]:
        """The `citations` and `retrieval` parts of the answer's `converge` field."""
        out: dict[str, Any] = {"used": self.used}
        if self.reason:
            out["reason"] = self.reason
        return {"citations": [s.citation() for s in self.sources], "retrieval": out}

    def trace(self) -> list[dict[str, Any]]:
        """Chunk ids and scores, for the turn's trace."""
        return [
            {
                "n": s.n,
                "chunk_id": s.hit.chunk_id,
                "knowledge_base_id": str(s.kb_id),
                "document_id": str(s.hit.document_id),
                "score": round(s.score, 6),
                "similarity": None if s.similarity is None else round(s.similarity, 6),
            }
            for s in self.sources
        ]


def question_of(messages: list[dict[str, Any]]) -> tuple[int, str]:
    """The index and text of the last user message (the question), or a 400."""
    for i in range(len(messages) - 1, -1, -1):
        message = messages[i]
        if message.get("role") == "user":
            return i, text_of(message.get("content"))
    raise GatewayError(
        400, "A RAG model answers the last user message; 'messages' has none", param="messages"
    )


def text_of(content: Any) -> str:
    """A message's text: a string, or the text parts of a content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return "\n".join(str(p) for p in parts)
    return ""


def render(template: str, *, sources: list[Source], question: str) -> str:
    """The template with {context} and {question} replaced literally (other braces stay)."""
    context = "\n\n".join(_numbered(s) for s in sources) if sources else NO_SOURCES
    # {question} first: a chunk's text that happens to hold "{question}" must stay as it is.
    marker = "\x00converge-context\x00"
    return template.replace(CONTEXT, marker).replace(QUESTION, question).replace(marker, context)


def _numbered(source: Source) -> str:
    hit = source.hit
    where = hit.source + (f", page {hit.page}" if hit.page is not None else "")
    return f"[{source.n}] {hit.title} ({where})\n{hit.text.strip()}"


async def ground(
    session: AsyncSession, *, spec: dict[str, Any], question: str, caller: Caller, gateway: Gateway
) -> Grounding:
    settings = spec["retrieval"]
    k, mode, min_score = int(settings["k"]), str(settings["mode"]), float(settings["min_score"])
    filters = dict(settings.get("filters") or {})
    ids = [uuid.UUID(kb["id"]) for kb in spec["knowledge_bases"]]
    bases = await repository.knowledge_bases(session, ids)
    if not bases:
        return Grounding(reason="the RAG model's knowledge bases no longer exist")
    if not question.strip():
        return Grounding(reason="the question is empty")
    vectors: dict[uuid.UUID, list[float]] = {}  # one embedding per embedding deployment
    found: list[tuple[float, float | None, uuid.UUID, retrieval.Hit]] = []
    for kb_id in ids:
        kb = bases.get(kb_id)
        if kb is None:
            continue
        hits = await _search(
            session, kb, question=question, k=k, mode=mode, filters=filters, caller=caller,
            gateway=gateway, vectors=vectors,
        )  # fmt: skip
        found += [(score, similarity, kb.id, hit) for score, similarity, hit in hits]
    if not found:
        return Grounding(reason="the knowledge bases hold no chunk for this question (they may be empty)")
    kept = [f for f in found if _relevant(f[0], f[1], mode=mode, min_score=min_score)]
    if not kept:
        best = max((f[1] if mode != "keyword" else f[0]) or 0.0 for f in found)
        return Grounding(reason=f"no chunk scored above min_score {min_score:g} (the best scored {best:.3f})")
    kept.sort(key=lambda f: -f[0])
    sources = [
        Source(n=i, kb_id=kb_id, hit=hit, score=score, similarity=similarity)
        for i, (score, similarity, kb_id, hit) in enumerate(kept[:k], start=1)
    ]
    return Grounding(sources=sources)


def _relevant(score: float, similarity: float | None, *, mode: str, min_score: float) -> bool:
    if min_score <= 0:
        return True
    if mode == "keyword":
        return score >= min_score
    return similarity is not None and similarity >= min_score


async def _search(
    session: AsyncSession,
    kb: KnowledgeBase,
    *,
    question: str,
    k: int,
    mode: str,
    filters: dict[str, Any],
    caller: Caller,
    gateway: Gateway,
    vectors: dict[uuid.UUID, list[float]],
) -> list[tuple[float, float | None, retrieval.Hit]]:
    """(score, cosine similarity or None, hit), best first."""
    if kb.embedding_deployment_id is None:
        mode = "keyword"
    if mode == "keyword":
        found = await retrieval.search(
            session, kb, vector=None, query=question, k=k, mode=mode, filters=filters
        )
        return [(h.score, None, h) for h in found.hits]
    assert kb.embedding_deployment_id is not None
    vector = vectors.get(kb.embedding_deployment_id)
    if vector is None:
        vector = vectors[kb.embedding_deployment_id] = await _embed(
            kb, question=question, caller=caller, gateway=gateway
        )
    depth = k if mode == "vector" else max(HYBRID_DEPTH, 2 * k)
    by_vector = await retrieval.search(
        session, kb, vector=vector, query=question, k=depth, mode="vector", filters=filters
    )
    similarity = {h.chunk_id: h.score for h in by_vector.hits}
    if mode == "vector":
        return [(h.score, h.score, h) for h in by_vector.hits]
    by_keyword = await retrieval.search(
        session, kb, vector=None, query=question, k=depth, mode="keyword", filters=filters
    )
    fused = retrieval.fuse({"vector": by_vector.hits, "keyword": by_keyword.hits}, k=k)
    return [(h.score, similarity.get(h.chunk_id), h) for h in fused]


async def _embed(kb: KnowledgeBase, *, question: str, caller: Caller, gateway: Gateway) -> list[float]:
    assert kb.embedding_deployment_id is not None
    try:
        vectors = await Embedder(gateway).embed(
            [question],
            deployment_id=kb.embedding_deployment_id,
            project_id=kb.project_id,
            key_id=caller.key.id if caller.key is not None else None,
        )
    except EmbeddingFailed as exc:
        status = exc.status if exc.status in (401, 403, 429, 503, 504) else 502
        raise GatewayError(
            status,
            f"Knowledge base '{kb.name}' could not embed the question: {exc.message}",
            type_="server_error" if status >= 500 else "invalid_request_error",
            code="embedding_failed",
        ) from None
    return vectors[0]
