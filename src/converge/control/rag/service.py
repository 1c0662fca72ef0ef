"""Knowledge bases: binding an embedding deployment, documents, ingestion jobs, search and probe.

The ingestion worker (workers/ingestion.py) does the parsing, chunking and embedding; this
module queues its jobs and answers for what is stored. Services flush, never commit.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

from converge.config import Settings
from converge.control.deployments.service import current_spec
from converge.control.events.service import record
from converge.control.projects.principal import Principal
from converge.control.projects.service import visible_project
from converge.control.rag import probe as recall_probe
from converge.control.rag import repository, retrieval, tokens
from converge.control.rag.embedder import Embedder, EmbeddingFailed
from converge.control.rag.schemas import (
    DEFAULT_OVERLAP,
    DEFAULT_TOKENS,
    FINAL_JOB_STATES,
    ChunkingIn,
    HitRead,
    JobState,
    KbIndex,
    KbStats,
    KnowledgeBaseCreate,
    KnowledgeBaseRead,
    KnowledgeBaseUpdate,
    ProbeIn,
    RetrievalIn,
    SearchIn,
    SearchMode,
    SearchRead,
)
from converge.errors import AppError, Conflict, Forbidden, NotFound, Unprocessable
from converge.gateway.api import Gateway
from converge.kit.unique import flush_or_conflict
from converge.models import Deployment, IngestionJob, KbDocument, KnowledgeBase, Project
from converge.observability import tracing
from converge.runtime.base import ServerKind
from converge.storage.artifacts import ArtifactStore

DEFAULT_K, DEFAULT_MODE = 5, "hybrid"
PROBE_TEXT = "What is the dimension of this embedding?"  # any text: only its vector's length counts


class EmbeddingUnavailable(AppError):
    status_code, type, title = 503, "embedding-unavailable", "Embedding deployment unavailable"


class EmbeddingRateLimited(AppError):
    status_code, type, title = 429, "rate-limited", "Over the embedding limits"


class ChunksBusy(AppError):
    status_code, type, title = 503, "busy", "Knowledge bases busy"


def invalid(field: str, message: str, **extra: Any) -> Unprocessable:
    """A 422 naming the field, shaped like a request-validation error."""
    return Unprocessable(
        f"{field}: {message}",
        extra={
            "field": field,
            "errors": [{"field": field, "message": message, "type": "value_error"}],
            **extra,
        },
    )


def embedder_for(gateway: Gateway | None) -> Embedder:
    if gateway is None:
        raise EmbeddingUnavailable(
            "This server runs without the gateway (gateway.enabled=false), and knowledge bases "
            "embed through it; enable the gateway"
        )
    return Embedder(gateway)


# -- reading -----------------------------------------------------------------------------------


async def visible_kb(
    session: AsyncSession, principal: Principal, *, kb_id: uuid.UUID, permission: str, lock: bool = False
) -> KnowledgeBase:
    """The base if the caller sees its project (else 404, exactly like a missing one) and holds
    `permission` there (else 403)."""
    kb = await repository.get(session, kb_id, lock=lock)
    if kb is None or not principal.sees(kb.project_id):
        raise NotFound(f"Knowledge base {kb_id} not found")
    await visible_project(session, principal, kb.project_id, permission=permission)
    return kb


async def read_many(session: AsyncSession, kbs: list[KnowledgeBase]) -> list[KnowledgeBaseRead]:
    """Each base with its counts and its deployment's name, in two queries for the lot."""
    counts = await repository.stats(session, [kb.id for kb in kbs])
    names = await repository.deployment_names(
        session, [kb.embedding_deployment_id for kb in kbs if kb.embedding_deployment_id]
    )
    out = []
    for kb in kbs:
        fields = {name: getattr(kb, name) for name in KnowledgeBaseRead.model_fields if hasattr(kb, name)}
        bound = kb.embedding_deployment_id
        fields |= {
            "embedding_deployment": names.get(bound) if bound else None,
            "stats": KbStats(**counts.get(kb.id, {})),
            "index": KbIndex(state=kb.index_state, ef_search=kb.ef_search),
        }
        out.append(KnowledgeBaseRead.model_validate(fields))
    return out


async def read_one(session: AsyncSession, kb: KnowledgeBase) -> KnowledgeBaseRead:
    return (await read_many(session, [kb]))[0]


# -- binding an embedding deployment -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Binding:
    deployment: Deployment
    dimension: int
    max_tokens: int


async def _bind(
    session: AsyncSession,
    principal: Principal,
    *,
    project: Project,
    ref: str,
    embedder: Embedder,
    store: ArtifactStore,
) -> Binding:
    """The deployment `ref` names in the project, checked to answer /v1/embeddings, with the
    dimension its model really returns (one probe text through the gateway) and the most
    tokens it reads (its own tokenizer's configuration)."""
    field = "embedding_deployment"
    try:
        as_id: uuid.UUID | None = uuid.UUID(ref)
    except ValueError:
        as_id = None
    deployment = await repository.deployment_in_project(session, project.id, deployment_id=as_id, name=ref)
    if deployment is None:
        raise invalid(field, f"project '{project.name}' has no deployment '{ref}' (by id or name)")
    server = (await current_spec(session, deployment)).get("server")
    if server != ServerKind.EMBEDDINGS:
        raise invalid(
            field,
            f"deployment '{deployment.name}' runs the '{server}' server, which does not answer "
            f"/v1/embeddings; bind a deployment whose server is '{ServerKind.EMBEDDINGS}'",
        )
    tokenizer = await tokens.model_tokenizer(session, store, deployment_id=deployment.id)
    try:
        vectors = await embedder.embed(
            [PROBE_TEXT], deployment_id=deployment.id, project_id=project.id, key_id=principal.key_id
        )
    except EmbeddingFailed as exc:
        raise _embedding_problem(exc, deployment.name) from exc
    return Binding(deployment=deployment, dimension=len(vectors[0]), max_tokens=tokenizer.max_tokens)


def _embedding_problem(exc: EmbeddingFailed, deployment: str) -> AppError:
    if exc.status == 429:
        return EmbeddingRateLimited(
            f"Embedding deployment '{deployment}' is over a limit: {exc.message}; retry later"
        )
    if exc.retryable:
        return EmbeddingUnavailable(
            f"Embedding deployment '{deployment}' is not ready to embed ({exc.message}); retry once its "
            "phase is Ready (starting, scaled to zero or failing replicas answer nothing yet)"
        )
    if exc.status in (401, 403):
        return Forbidden(f"Embedding deployment '{deployment}': {exc.message}")
    return Unprocessable(
        f"embedding_deployment: deployment '{deployment}' refused to embed: {exc.message}",
        extra={"field": "embedding_deployment"},
    )


def _chunking(given: ChunkingIn, *, current: dict[str, Any] | None, max_tokens: int) -> dict[str, int]:
    """The chunking to store: the given fields over the current ones (or the defaults), checked
    against the model's maximum sequence length."""
    current = current or {}
    tokens_ = given.tokens or current.get("tokens") or min(DEFAULT_TOKENS, max_tokens)
    if tokens_ > max_tokens:
        why = "the embedding model reads at most"
        raise invalid(
            "chunking.tokens",
            f"{tokens_} is more than {why} {max_tokens} tokens (max_tokens)",
            limit=max_tokens,
        )
    overlap = given.overlap if given.overlap is not None else current.get("overlap")
    if overlap is None:
        overlap = min(DEFAULT_OVERLAP, tokens_ // 4)
    if overlap >= tokens_:
        raise invalid(
            "chunking.overlap", f"{overlap} must be fewer than chunking.tokens ({tokens_})", limit=tokens_ - 1
        )
    return {"tokens": tokens_, "overlap": overlap}


def _retrieval(given: RetrievalIn, *, current: dict[str, Any] | None) -> dict[str, Any]:
    current = current or {}
    return {
        "k": given.k or current.get("k") or DEFAULT_K,
        "mode": given.mode or current.get("mode") or DEFAULT_MODE,
    }


async def _make_partition(session: AsyncSession, kb_id: uuid.UUID, *, drop: bool = False) -> None:
    try:
        async with session.begin_nested():
            await (repository.drop_partition if drop else repository.create_partition)(session, kb_id)
    except OperationalError as exc:
        if not isinstance(exc.orig, psycopg.errors.LockNotAvailable):
            raise
        raise ChunksBusy(
            "Knowledge bases are busy: a long transaction (an ingestion or a search) holds the chunk "
            "table; nothing was changed, retry in a moment",
            extra={"retry_after_s": 5},
        ) from exc


# -- create, update, delete --------------------------------------------------------------------


async def create(
    session: AsyncSession,
    principal: Principal,
    *,
    project: Project,
    body: KnowledgeBaseCreate,
    embedder: Embedder,
    store: ArtifactStore,
) -> KnowledgeBase:
    bound = await _bind(
        session, principal, project=project, ref=body.embedding_deployment, embedder=embedder, store=store
    )
    kb = KnowledgeBase(
        project_id=project.id,
        name=body.name,
        description=body.description,
        embedding_deployment_id=bound.deployment.id,
        dimension=bound.dimension,
        max_tokens=bound.max_tokens,
        chunking=_chunking(body.chunking, current=None, max_tokens=bound.max_tokens),
        retrieval=_retrieval(body.retrieval, current=None),
        metadata_keys=[],
        created_by=principal.subject,
    )
    session.add(kb)
    await flush_or_conflict(
        session, f"Project '{project.name}' already has a knowledge base named '{body.name}'"
    )
    # Last: the partition's DDL locks the chunk table until this transaction commits.
    await _make_partition(session, kb.id)
    await record(
        session,
        principal,
        action="knowledge_base.created",
        project_id=project.id,
        object_type="knowledge_base",
        object_id=kb.id,
        changes={"name": kb.name, "embedding_deployment": bound.deployment.name, "dimension": kb.dimension},
    )
    return kb


async def update(
    session: AsyncSession,
    principal: Principal,
    *,
    kb_id: uuid.UUID,
    body: KnowledgeBaseUpdate,
    embedder: Embedder,
    store: ArtifactStore,
) -> KnowledgeBase:
    kb = await visible_kb(session, principal, kb_id=kb_id, permission="knowledge-bases:write", lock=True)
    project = await visible_project(session, principal, kb.project_id, permission="knowledge-bases:write")
    changes: dict[str, Any] = {}
    max_tokens = kb.max_tokens
    if body.embedding_deployment is not None:
        bound = await _bind(
            session, principal, project=project, ref=body.embedding_deployment, embedder=embedder, store=store
        )
        if bound.dimension != kb.dimension:
            raise Conflict(
                f"embedding_deployment: deployment '{bound.deployment.name}' embeds in {bound.dimension} "
                f"dimensions, but the vectors of knowledge base '{kb.name}' have {kb.dimension}; bind a model "
                "of the same dimension, or make a new knowledge base",
                extra={
                    "field": "embedding_deployment",
                    "dimension": kb.dimension,
                    "deployment_dimension": bound.dimension,
                },
            )
        kb.embedding_deployment_id, kb.max_tokens = bound.deployment.id, bound.max_tokens
        max_tokens = bound.max_tokens
        changes["embedding_deployment"] = bound.deployment.name
    if body.embedding_deployment is not None or body.chunking is not None:
        # A new model may read fewer tokens: the stored chunking is checked against it too.
        chunking = _chunking(body.chunking or ChunkingIn(), current=kb.chunking, max_tokens=max_tokens)
        if chunking != kb.chunking:
            kb.chunking = changes["chunking"] = chunking
    if body.retrieval is not None:
        kb.retrieval = changes["retrieval"] = _retrieval(body.retrieval, current=kb.retrieval)
    if body.description is not None and body.description != kb.description:
        kb.description = changes["description"] = body.description
    await session.flush()
    if changes:
        await record(
            session,
            principal,
            action="knowledge_base.updated",
            project_id=kb.project_id,
            object_type="knowledge_base",
            object_id=kb.id,
            changes=changes,
        )
    return kb


async def delete(session: AsyncSession, principal: Principal, *, kb_id: uuid.UUID) -> set[str]:
    """Documents, chunks (the base's partition) and jobs, in this transaction. Returns the
    digests of the files its jobs uploaded, for the caller to remove once this commits."""
    kb = await visible_kb(session, principal, kb_id=kb_id, permission="knowledge-bases:write", lock=True)
    uploads = await repository.uploads_of(session, kb.id)
    name, project_id = kb.name, kb.project_id
    await repository.delete_base(session, kb)
    await _make_partition(session, kb_id, drop=True)
    await record(
        session,
        principal,
        action="knowledge_base.deleted",
        project_id=project_id,
        object_type="knowledge_base",
        object_id=kb_id,
        changes={"name": name},
    )
    return uploads


async def unused_uploads(session: AsyncSession, digests: set[str]) -> list[str]:
    """Of these uploaded files, those nothing else stores (identical bytes are stored once)."""
    return [d for d in sorted(digests) if not await repository.blob_in_use(session, d)]


# -- documents ---------------------------------------------------------------------------------


async def visible_document(
    session: AsyncSession, principal: Principal, *, kb_id: uuid.UUID, document_id: uuid.UUID, permission: str
) -> tuple[KnowledgeBase, KbDocument]:
    kb = await visible_kb(session, principal, kb_id=kb_id, permission=permission)
    document = await repository.get_document(session, kb_id=kb.id, document_id=document_id)
    if document is None:
        raise NotFound(f"Knowledge base '{kb.name}' has no document {document_id}")
    return kb, document


async def delete_document(
    session: AsyncSession, principal: Principal, *, kb_id: uuid.UUID, document_id: uuid.UUID
) -> None:
    kb, document = await visible_document(
        session, principal, kb_id=kb_id, document_id=document_id, permission="knowledge-bases:write"
    )
    source = document.source
    await repository.delete_document(session, document)
    await record(
        session,
        principal,
        action="document.deleted",
        project_id=kb.project_id,
        object_type="document",
        object_id=document_id,
        changes={"knowledge_base": kb.name, "kb_id": str(kb.id), "source": source},
    )


# -- ingestion jobs ----------------------------------------------------------------------------


async def ingestible_kb(session: AsyncSession, principal: Principal, *, kb_id: uuid.UUID) -> KnowledgeBase:
    """The base, if the caller may ingest into it and it has an embedding deployment to use."""
    kb = await visible_kb(session, principal, kb_id=kb_id, permission="knowledge-bases:write")
    if kb.embedding_deployment_id is None:
        raise Conflict(
            f"Knowledge base '{kb.name}' has no embedding deployment (it was deleted); bind one with "
            'PATCH /knowledge-bases/{id} {"embedding_deployment": ...} first'
        )
    return kb


async def queue_job(
    session: AsyncSession, principal: Principal, *, kb_id: uuid.UUID, source: dict[str, Any]
) -> IngestionJob:
    kb = await ingestible_kb(session, principal, kb_id=kb_id)
    job = IngestionJob(
        kb_id=kb.id,
        project_id=kb.project_id,
        state=JobState.QUEUED,
        source=source,
        progress={},
        errors=[],
        key_id=principal.key_id,
        created_by=principal.subject,
    )
    session.add(job)
    await session.flush()
    described = [f["name"] for f in source.get("files", [])] if source["kind"] == "upload" else source["url"]
    await record(
        session,
        principal,
        action="ingestion.queued",
        project_id=kb.project_id,
        object_type="ingestion",
        object_id=job.id,
        changes={"kb_id": str(kb.id), "knowledge_base": kb.name, "kind": source["kind"], "source": described},
    )
    return job


async def visible_job(
    session: AsyncSession,
    principal: Principal,
    *,
    kb_id: uuid.UUID,
    job_id: uuid.UUID,
    permission: str,
    lock: bool = False,
) -> tuple[KnowledgeBase, IngestionJob]:
    kb = await visible_kb(session, principal, kb_id=kb_id, permission=permission)
    job = await repository.get_job(session, kb_id=kb.id, job_id=job_id, lock=lock)
    if job is None:
        raise NotFound(f"Knowledge base '{kb.name}' has no ingestion {job_id}")
    return kb, job


async def cancel_job(
    session: AsyncSession, principal: Principal, *, kb_id: uuid.UUID, job_id: uuid.UUID
) -> IngestionJob:
    """A queued job is cancelled now; a running one stops at its next document (the worker
    sees `cancel_requested`; what it already committed stays)."""
    kb, job = await visible_job(
        session, principal, kb_id=kb_id, job_id=job_id, permission="knowledge-bases:write", lock=True
    )
    if job.state in FINAL_JOB_STATES:
        raise Conflict(f"Ingestion {job.id} already {job.state}; there is nothing to cancel")
    job.cancel_requested = True
    action = "ingestion.cancel_requested"
    if job.state == JobState.QUEUED:
        job.state, job.finished_at = JobState.CANCELLED, datetime.now(UTC)
        job.reason = f"cancelled by {principal.subject} before it started"
        action = "ingestion.cancelled"
    await session.flush()
    await record(
        session,
        principal,
        action=action,
        project_id=kb.project_id,
        object_type="ingestion",
        object_id=job.id,
        changes={"kb_id": str(kb.id), "knowledge_base": kb.name, "state": job.state},
    )
    return job


# -- search and probe --------------------------------------------------------------------------


async def search(
    session: AsyncSession,
    principal: Principal,
    *,
    kb_id: uuid.UUID,
    body: SearchIn,
    embedder: Embedder | None,
    store: ArtifactStore,
) -> SearchRead:
    started = time.perf_counter()
    kb = await visible_kb(session, principal, kb_id=kb_id, permission="knowledge-bases:read")
    k = body.k or kb.retrieval.get("k") or DEFAULT_K
    mode: SearchMode = body.mode or kb.retrieval.get("mode") or DEFAULT_MODE  # type: ignore[assignment]
    unknown = sorted(set(body.filters) - set(kb.metadata_keys))
    if unknown:
        known = ", ".join(sorted(kb.metadata_keys)) or "none yet"
        raise invalid(
            f"filters.{unknown[0]}",
            f"no chunk of knowledge base '{kb.name}' has a metadata field '{unknown[0]}'; known fields: {known}",
            known=sorted(kb.metadata_keys),
        )
    vector = None
    with tracing.span("rag.search", kb_id=str(kb.id), mode=mode, k=k, filters=len(body.filters)) as span:
        if mode != "keyword":
            with tracing.span("rag.embed_query"):  # the gateway's spans of the embedding call nest here
                vector = await _query_vector(
                    session, principal, kb=kb, query=body.query, embedder=embedder, store=store
                )
        with tracing.span("rag.retrieve", mode=mode, k=k):
            found = await retrieval.search(
                session, kb, vector=vector, query=body.query, k=k, mode=mode, filters=body.filters
            )
        if span is not None:
            span.set_attributes({"hits": len(found.hits), "exact": found.exact})
    return SearchRead(
        results=[HitRead.model_validate(hit) for hit in found.hits],
        mode=mode,
        exact=found.exact,
        ef_search=found.ef_search,
        took_ms=round((time.perf_counter() - started) * 1000, 2),
    )


async def _query_vector(
    session: AsyncSession,
    principal: Principal,
    *,
    kb: KnowledgeBase,
    query: str,
    embedder: Embedder | None,
    store: ArtifactStore,
) -> list[float]:
    if kb.embedding_deployment_id is None:
        raise Conflict(
            f"Knowledge base '{kb.name}' has no embedding deployment (it was deleted), so it cannot embed "
            "the query; search with mode 'keyword', or bind a deployment of the same model"
        )
    if embedder is None:
        embedder = embedder_for(None)
    tokenizer = await tokens.model_tokenizer(session, store, deployment_id=kb.embedding_deployment_id)
    counted = tokenizer.count(query)
    if counted > kb.max_tokens:
        raise invalid(
            "query",
            f"the query is {counted} tokens; the embedding model reads at most {kb.max_tokens} (max_tokens)",
            limit=kb.max_tokens,
        )
    name = (await repository.deployment_names(session, [kb.embedding_deployment_id])).get(
        kb.embedding_deployment_id, str(kb.embedding_deployment_id)
    )
    try:
        vectors = await embedder.embed(
            [query],
            deployment_id=kb.embedding_deployment_id,
            project_id=kb.project_id,
            key_id=principal.key_id,
        )
    except EmbeddingFailed as exc:
        raise _embedding_problem(exc, name) from exc
    return vectors[0]


async def probe(
    session: AsyncSession, principal: Principal, *, kb_id: uuid.UUID, body: ProbeIn, settings: Settings
) -> dict[str, Any]:
    """Measure the base's recall (approximate against exact); it sets the base's ef_search."""
    kb = await visible_kb(session, principal, kb_id=kb_id, permission="knowledge-bases:write", lock=True)
    result = await recall_probe.probe(session, kb, queries=body.queries, k=body.k, settings=settings)
    await session.flush()
    await record(
        session,
        principal,
        action="knowledge_base.updated",
        project_id=kb.project_id,
        object_type="knowledge_base",
        object_id=kb.id,
        changes={"ef_search": kb.ef_search, "probe": result},
    )
    return result
