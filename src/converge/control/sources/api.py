"""HTTP for registry sources (organisation-level: admins manage them)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Response

from converge.control.projects.auth import PrincipalDep, require
from converge.control.projects.principal import Principal
from converge.control.sources import repository, service
from converge.control.sources.schemas import SourceCreate, SourceRead, SourceUpdate, SyncResult
from converge.deps import SessionDep, StateDep
from converge.errors import PROBLEM_RESPONSES
from converge.kit.pagination import Page, PageDep, page_of, uuid_after

router = APIRouter(prefix="/sources", tags=["sources"], responses=PROBLEM_RESPONSES)
SourcesWrite = Annotated[Principal, require("sources:write")]


@router.post("", response_model=SourceRead, status_code=201)
async def create_source(body: SourceCreate, session: SessionDep, principal: SourcesWrite) -> SourceRead:
    return SourceRead.model_validate(await service.create(session, principal, body=body))


@router.get("", response_model=Page[SourceRead])
async def list_sources(session: SessionDep, principal: PrincipalDep, page: PageDep) -> Page[SourceRead]:
    rows = await repository.list_sources(session, after=uuid_after(page), limit=page.limit)
    return page_of(rows, limit=page.limit, schema=SourceRead)


@router.get("/{source_id}", response_model=SourceRead)
async def get_source(source_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> SourceRead:
    return SourceRead.model_validate(await service.get(session, source_id))


@router.patch("/{source_id}", response_model=SourceRead)
async def update_source(
    source_id: uuid.UUID, body: SourceUpdate, session: SessionDep, principal: SourcesWrite
) -> SourceRead:
    return SourceRead.model_validate(await service.update(session, principal, source_id=source_id, body=body))


@router.delete("/{source_id}", status_code=204)
async def delete_source(source_id: uuid.UUID, session: SessionDep, principal: SourcesWrite) -> Response:
    await service.delete(session, principal, source_id=source_id)
    return Response(status_code=204)


@router.post("/{source_id}/sync", response_model=SyncResult)
async def sync_source(
    source_id: uuid.UUID, session: SessionDep, state: StateDep, principal: SourcesWrite
) -> SyncResult:
    """Sync now instead of waiting for the next interval (in its own transactions)."""
    await service.get(session, source_id)
    source, created = await service.sync(
        state.sessions, source_id=source_id, settings=state.settings, store=state.artifacts
    )
    return SyncResult(source=SourceRead.model_validate(source), new_versions=created)
