"""HTTP for RAG models (`/rag/models`, the seed's RAG Manager): create, list (model discovery),
get, update (a new revision per change), revisions, delete."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response

from converge.control.chat import refs
from converge.control.chat.ragmodels import repository, service
from converge.control.chat.ragmodels.schemas import (
    RagModelCreate,
    RagModelRead,
    RagModelRevisionRead,
    RagModelUpdate,
)
from converge.control.projects.auth import PrincipalDep
from converge.control.projects.service import visible_project
from converge.deps import SessionDep
from converge.errors import PROBLEM_RESPONSES
from converge.kit.pagination import Page, PageDep, encode_cursor, uuid_after
from converge.models import RagModel

router = APIRouter(prefix="/rag/models", tags=["rag-models"], responses=PROBLEM_RESPONSES)


@router.post("", response_model=RagModelRead, status_code=201)
async def create_rag_model(
    *,
    body: RagModelCreate,
    session: SessionDep,
    principal: PrincipalDep,
    project: Annotated[uuid.UUID, Query(description="The project that owns the RAG model")],
) -> RagModelRead:
    """A named bundle of a chat deployment, knowledge bases, a ruleset, retrieval parameters and
    a prompt template; it appears in the project's `GET /v1/models` and answers
    `/v1/chat/completions` with citations. 409 when a deployment, alias or agent of the project
    already answers to the name."""
    owner = await visible_project(session, principal, project, permission="rag-models:write")
    return service.read(await service.create(session, principal, project=owner, body=body))


@router.get("", response_model=Page[RagModelRead])
async def list_rag_models(
    *,
    session: SessionDep,
    principal: PrincipalDep,
    page: PageDep,
    project: Annotated[uuid.UUID | None, Query(description="Only this project's RAG models")] = None,
) -> Page[RagModelRead]:
    if project is not None:
        await visible_project(session, principal, project, permission="rag-models:read")
    rows = await refs.list_for_project(
        session,
        RagModel,
        project_id=project,
        visible=principal.visible_projects,
        after=uuid_after(page),
        limit=page.limit,
    )
    rows = [r for r in rows if principal.can("rag-models:read", r.project_id)]
    shown = rows[: page.limit]
    return Page(
        items=[service.read(r) for r in shown],
        next_cursor=encode_cursor(shown[-1].id) if len(rows) > page.limit else None,
    )


@router.get("/{rag_model_id}", response_model=RagModelRead)
async def get_rag_model(
    *, rag_model_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> RagModelRead:
    row = await service.visible_rag_model(
        session, principal, rag_model_id=rag_model_id, permission="rag-models:read"
    )
    return service.read(row)


@router.patch("/{rag_model_id}", response_model=RagModelRead)
async def update_rag_model(
    *, rag_model_id: uuid.UUID, body: RagModelUpdate, session: SessionDep, principal: PrincipalDep
) -> RagModelRead:
    """Each change of the spec is a new revision (a recorded chat turn names the one that
    answered it); a description alone changes no revision."""
    return service.read(await service.update(session, principal, rag_model_id=rag_model_id, body=body))


@router.get("/{rag_model_id}/revisions", response_model=list[RagModelRevisionRead])
async def list_revisions(
    *, rag_model_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> list[RagModelRevisionRead]:
    """Newest first."""
    row = await service.visible_rag_model(
        session, principal, rag_model_id=rag_model_id, permission="rag-models:read"
    )
    return [service.read_revision(r) for r in await repository.revisions(session, row.id)]


@router.delete("/{rag_model_id}", status_code=204, response_class=Response)
async def delete_rag_model(
    *, rag_model_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> Response:
    """The RAG model and its revisions; recorded chat turns keep naming it in their traces."""
    await service.delete(session, principal, rag_model_id=rag_model_id)
    return Response(status_code=204)
