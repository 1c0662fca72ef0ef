"""HTTP for knowledge bases: bases, documents, ingestions (uploads or an S3 prefix), search, probe."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, BackgroundTasks, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from converge.control.projects.auth import DetachedPrincipalDep, PrincipalDep
from converge.control.projects.principal import Principal
from converge.control.projects.service import visible_project
from converge.control.rag import parsing, repository, service, uploads
from converge.control.rag.embedder import Embedder
from converge.control.rag.schemas import (
    DocumentRead,
    IngestFromUrl,
    IngestionJobRead,
    KnowledgeBaseCreate,
    KnowledgeBaseRead,
    KnowledgeBaseUpdate,
    ProbeIn,
    SearchIn,
    SearchRead,
)
from converge.deps import SessionDep, StateDep, unit_of_work
from converge.errors import PROBLEM_RESPONSES, PayloadTooLarge
from converge.kit.pagination import Page, PageDep, encode_cursor, page_of, uuid_after
from converge.state import State

log = structlog.get_logger(__name__)
router = APIRouter(prefix="/knowledge-bases", tags=["knowledge-bases"], responses=PROBLEM_RESPONSES)
# Exempt from the server's body limit (uploads stream to the store under rag.max_file_bytes);
# the JSON form of the same route is capped here instead.
INGEST_PATH_SUFFIX = "/ingestions"
MAX_JSON_BYTES = 64 << 10
KbId = uuid.UUID
_PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
# Routes that embed through the gateway (create and rebind read the dimension; search the query).
EMBEDS: dict[int | str, dict[str, Any]] = {
    429: {"description": "Over the project's or key's embedding limits", "content": _PROBLEM},
    503: {
        "description": "The embedding deployment is not ready (or the chunk table is busy)",
        "content": _PROBLEM,
    },
}


def _embedder(state: State) -> Embedder:
    return service.embedder_for(state.gateway)


@router.post("", response_model=KnowledgeBaseRead, status_code=201, responses=EMBEDS)
async def create_knowledge_base(
    *,
    body: KnowledgeBaseCreate,
    session: SessionDep,
    principal: PrincipalDep,
    state: StateDep,
    project: Annotated[uuid.UUID, Query(description="The project that owns the knowledge base")],
) -> KnowledgeBaseRead:
    """Make a base bound to an embedding deployment of the project: its dimension is read from
    the model (one text embedded through the gateway), its maximum sequence length from the
    model's tokenizer configuration."""
    owner = await visible_project(session, principal, project, permission="knowledge-bases:write")
    kb = await service.create(
        session, principal, project=owner, body=body, embedder=_embedder(state), store=state.artifacts
    )
    return await service.read_one(session, kb)


@router.get("", response_model=Page[KnowledgeBaseRead])
async def list_knowledge_bases(
    *,
    session: SessionDep,
    principal: PrincipalDep,
    page: PageDep,
    project: Annotated[uuid.UUID | None, Query(description="Only this project's knowledge bases")] = None,
) -> Page[KnowledgeBaseRead]:
    if project is not None:
        await visible_project(session, principal, project, permission="knowledge-bases:read")
    rows = await repository.list_for_project(
        session, project, visible=principal.visible_projects, after=uuid_after(page), limit=page.limit
    )
    shown = rows[: page.limit]
    return Page(
        items=await service.read_many(session, shown),
        next_cursor=encode_cursor(shown[-1].id) if len(rows) > page.limit else None,
    )


@router.get("/{kb_id}", response_model=KnowledgeBaseRead)
async def get_knowledge_base(
    *, kb_id: KbId, session: SessionDep, principal: PrincipalDep
) -> KnowledgeBaseRead:
    """The base with its document, chunk and byte counts, index state, last probe and the
    metadata fields its chunks carry (what search filters may name)."""
    kb = await service.visible_kb(session, principal, kb_id=kb_id, permission="knowledge-bases:read")
    return await service.read_one(session, kb)


@router.patch("/{kb_id}", response_model=KnowledgeBaseRead, responses=EMBEDS)
async def update_knowledge_base(
    *, kb_id: KbId, body: KnowledgeBaseUpdate, session: SessionDep, principal: PrincipalDep, state: StateDep
) -> KnowledgeBaseRead:
    """Change the description, chunking (for what is ingested next) or retrieval defaults, or
    rebind to another embedding deployment of the same dimension (409 otherwise)."""
    kb = await service.update(
        session, principal, kb_id=kb_id, body=body, embedder=_embedder(state), store=state.artifacts
    )
    return await service.read_one(session, kb)


@router.delete(
    "/{kb_id}",
    status_code=204,
    response_class=Response,
    responses={503: {"description": "The chunk table is busy; retry", "content": _PROBLEM}},
)
async def delete_knowledge_base(
    *, kb_id: KbId, session: SessionDep, principal: PrincipalDep, state: StateDep, background: BackgroundTasks
) -> Response:
    """Remove the base with its documents, chunks and jobs in one transaction; the files its
    jobs uploaded are removed from the store after that commits."""
    digests = await service.delete(session, principal, kb_id=kb_id)
    background.add_task(_remove_uploads, state, digests)  # runs once the response (and commit) is out
    return Response(status_code=204)


async def _remove_uploads(state: State, digests: set[str]) -> None:
    """Best effort: bytes nothing else stores are removed; a failure only leaves garbage."""
    if not digests:
        return
    try:
        async with unit_of_work(state) as session:
            unused = await service.unused_uploads(session, digests)
        for digest in unused:
            await state.artifacts.delete(digest)
    except Exception:  # never fail a request that has already succeeded
        log.warning("kb_upload_cleanup_failed", digests=len(digests), exc_info=True)


# -- documents ---------------------------------------------------------------------------------


@router.get("/{kb_id}/documents", response_model=Page[DocumentRead])
async def list_documents(
    *, kb_id: KbId, session: SessionDep, principal: PrincipalDep, page: PageDep
) -> Page[DocumentRead]:
    kb = await service.visible_kb(session, principal, kb_id=kb_id, permission="knowledge-bases:read")
    rows = await repository.list_documents(session, kb.id, after=uuid_after(page), limit=page.limit)
    return page_of(rows, limit=page.limit, schema=DocumentRead)


@router.get("/{kb_id}/documents/{document_id}", response_model=DocumentRead)
async def get_document(
    *, kb_id: KbId, document_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> DocumentRead:
    _, document = await service.visible_document(
        session, principal, kb_id=kb_id, document_id=document_id, permission="knowledge-bases:read"
    )
    return DocumentRead.model_validate(document)


@router.delete("/{kb_id}/documents/{document_id}", status_code=204, response_class=Response)
async def delete_document(
    *, kb_id: KbId, document_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> Response:
    """Remove the document and its chunks (in one transaction: searches see all or none)."""
    await service.delete_document(session, principal, kb_id=kb_id, document_id=document_id)
    return Response(status_code=204)


# -- ingestions --------------------------------------------------------------------------------

_INGEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                    "required": ["files"],
                }
            },
            "application/json": {"schema": IngestFromUrl.model_json_schema()},
        },
    }
}


@router.post(
    "/{kb_id}" + INGEST_PATH_SUFFIX,
    response_model=IngestionJobRead,
    status_code=202,
    openapi_extra=_INGEST_BODY,
    responses={
        413: {
            "description": "A file over rag.max_file_bytes, or more than rag.max_files files",
            "content": _PROBLEM,
        },
        415: {"description": "A file of a type ingestion does not read", "content": _PROBLEM},
    },
)
async def ingest(*, kb_id: KbId, request: Request, principal: DetachedPrincipalDep, state: StateDep) -> Any:
    """Queue an ingestion: files uploaded as multipart/form-data (field `files`, one or many:
    .txt, .md, .html, .pdf, .jsonl), or JSON `{"url": "s3://bucket/prefix"}`. The files are
    checked and stored as they stream in; no transaction is open meanwhile."""
    async with unit_of_work(state) as session:
        await service.ingestible_kb(session, principal, kb_id=kb_id)
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() == "application/json":
        source = {"kind": "s3", "url": (await _url_body(request)).url}
        return await _queue(state, principal, kb_id=kb_id, source=source)
    boundary = uploads.boundary_of(content_type)
    if boundary is None:
        raise uploads.UnsupportedMediaType(
            f'Send the files as multipart/form-data (field \'files\') or JSON {{"url": "s3://bucket/prefix"}}; '
            f"got content-type '{content_type or 'none'}'"
        )
    stored: list[uploads.Uploaded] = []
    limits = uploads.Limits(
        max_file_bytes=state.settings.rag.max_file_bytes,
        max_files=state.settings.rag.max_files,
        suffixes=parsing.supported_extensions(),
    )
    try:
        files = await uploads.receive(
            request, state.artifacts, boundary=boundary, limits=limits, stored=stored.append
        )
        return await _queue(
            state, principal, kb_id=kb_id, source={"kind": "upload", "files": [f.source() for f in files]}
        )
    except BaseException:
        # Shielded: a client that went away must not stop the cleanup half way.
        created = {f.sha256 for f in stored if f.created}
        with contextlib.suppress(Exception):
            await asyncio.shield(_remove_uploads(state, created))
        raise


async def _queue(
    state: State, principal: Principal, *, kb_id: uuid.UUID, source: dict[str, Any]
) -> IngestionJobRead:
    async with unit_of_work(state) as session:
        job = await service.queue_job(session, principal, kb_id=kb_id, source=source)
        return IngestionJobRead.model_validate(job)


async def _url_body(request: Request) -> IngestFromUrl:
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_JSON_BYTES:
            raise PayloadTooLarge(f"The request body exceeds the limit of {MAX_JSON_BYTES} bytes")
    try:
        return IngestFromUrl.model_validate_json(bytes(raw))
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


@router.get("/{kb_id}" + INGEST_PATH_SUFFIX, response_model=Page[IngestionJobRead])
async def list_ingestions(
    *, kb_id: KbId, session: SessionDep, principal: PrincipalDep, page: PageDep
) -> Page[IngestionJobRead]:
    """Newest first."""
    kb = await service.visible_kb(session, principal, kb_id=kb_id, permission="knowledge-bases:read")
    rows = await repository.list_jobs(session, kb.id, after=uuid_after(page), limit=page.limit)
    return page_of(rows, limit=page.limit, schema=IngestionJobRead)


@router.get("/{kb_id}/ingestions/{job_id}", response_model=IngestionJobRead)
async def get_ingestion(
    *, kb_id: KbId, job_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> IngestionJobRead:
    _, job = await service.visible_job(
        session, principal, kb_id=kb_id, job_id=job_id, permission="knowledge-bases:read"
    )
    return IngestionJobRead.model_validate(job)


@router.post("/{kb_id}/ingestions/{job_id}/cancel", response_model=IngestionJobRead)
async def cancel_ingestion(
    *, kb_id: KbId, job_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> IngestionJobRead:
    """A queued ingestion is cancelled at once; a running one stops before its next document
    (documents already ingested stay). 409 for one that has finished."""
    job = await service.cancel_job(session, principal, kb_id=kb_id, job_id=job_id)
    return IngestionJobRead.model_validate(job)


# -- search and probe --------------------------------------------------------------------------


@router.post("/{kb_id}/search", response_model=SearchRead, responses=EMBEDS)
async def search(
    *, kb_id: KbId, body: SearchIn, session: SessionDep, principal: PrincipalDep, state: StateDep
) -> SearchRead:
    """Vector (HNSW or exact cosine), keyword (PostgreSQL full text) or hybrid (reciprocal rank
    fusion) search, with metadata equality filters; the query is embedded through the gateway."""
    embedder = Embedder(state.gateway) if state.gateway is not None else None
    return await service.search(
        session, principal, kb_id=kb_id, body=body, embedder=embedder, store=state.artifacts
    )


@router.post("/{kb_id}/probe", response_model=dict[str, Any])
async def probe(
    *, kb_id: KbId, session: SessionDep, principal: PrincipalDep, state: StateDep, body: ProbeIn | None = None
) -> dict[str, Any]:
    """Measure recall@k of the approximate search against exact search on queries sampled from
    the base's own chunks, with latency, and choose the ef_search that meets rag.recall_target
    (the base keeps it, and the result)."""
    return await service.probe(
        session, principal, kb_id=kb_id, body=body or ProbeIn(), settings=state.settings
    )
