"""HTTP for deployments: create, change (new revision), redeploy, promote, rollback, zones, logs."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from converge.control.deployments import repository, service
from converge.control.deployments.schemas import (
    DeploymentCreate,
    DeploymentRead,
    DeploymentUpdate,
    RevisionRead,
    RollbackIn,
    ZoneRead,
)
from converge.control.projects.auth import PrincipalDep
from converge.control.projects.service import visible_project
from converge.deps import SessionDep, StateDep
from converge.errors import PROBLEM_RESPONSES, NotFound
from converge.kit.pagination import Page, PageDep, page_of, uuid_after
from converge.models import Deployment

router = APIRouter(prefix="/deployments", tags=["deployments"], responses=PROBLEM_RESPONSES)


async def _read(session: SessionDep, deployment: Deployment) -> DeploymentRead:
    read = DeploymentRead.model_validate(deployment)
    read.spec = await service.current_spec(session, deployment)
    return read


@router.get("/zones", response_model=list[ZoneRead])
async def zones(state: StateDep, principal: PrincipalDep) -> list[ZoneRead]:
    """Where replicas can run, with each zone's capacity."""
    return [ZoneRead.model_validate(z.model_dump()) for z in await state.runtime.zones()]


@router.post("", response_model=DeploymentRead, status_code=201)
async def create_deployment(
    body: DeploymentCreate,
    session: SessionDep,
    principal: PrincipalDep,
    state: StateDep,
    project: Annotated[uuid.UUID, Query(description="The project that owns the deployment")],
) -> DeploymentRead:
    owner = await visible_project(session, principal, project, permission="deployments:write")
    deployment = await service.create(
        session,
        principal,
        project=owner,
        body=body,
        zones=await state.runtime.zones(),
        settings=state.settings,
    )
    return await _read(session, deployment)


@router.get("", response_model=Page[DeploymentRead])
async def list_deployments(
    session: SessionDep,
    principal: PrincipalDep,
    page: PageDep,
    project: Annotated[uuid.UUID | None, Query(description="Only this project's deployments")] = None,
) -> Page[DeploymentRead]:
    if project is not None:
        await visible_project(session, principal, project, permission="deployments:read")
    rows = await repository.list_for_project(
        session, project, visible=principal.visible_projects, after=uuid_after(page), limit=page.limit
    )
    result = page_of(rows, limit=page.limit, schema=DeploymentRead)
    specs = await repository.specs_of(session, rows[: page.limit])
    for item in result.items:
        item.spec = specs.get(item.id, {})
    return result


@router.get("/{deployment_id}", response_model=DeploymentRead)
async def get_deployment(
    deployment_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> DeploymentRead:
    _, deployment = await service.visible_deployment(
        session, principal, deployment_id, permission="deployments:read"
    )
    return await _read(session, deployment)


@router.patch("/{deployment_id}", response_model=DeploymentRead)
async def update_deployment(
    deployment_id: uuid.UUID,
    body: DeploymentUpdate,
    session: SessionDep,
    principal: PrincipalDep,
    state: StateDep,
) -> DeploymentRead:
    """Change the spec: admission runs again and a new revision rolls out."""
    deployment = await service.update(
        session,
        principal,
        deployment_id=deployment_id,
        body=body,
        zones=await state.runtime.zones(),
        settings=state.settings,
    )
    return await _read(session, deployment)


@router.post("/{deployment_id}/redeploy", response_model=DeploymentRead)
async def redeploy(deployment_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> DeploymentRead:
    """Restart the current revision's replicas one at a time."""
    return await _read(session, await service.redeploy(session, principal, deployment_id=deployment_id))


@router.post("/{deployment_id}/promote", response_model=DeploymentRead)
async def promote(deployment_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> DeploymentRead:
    """Promote the current revision's canary: the rollout continues to every replica (409 if the
    revision has no canary weight)."""
    return await _read(session, await service.promote(session, principal, deployment_id=deployment_id))


@router.post("/{deployment_id}/wake", response_model=DeploymentRead)
async def wake(deployment_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> DeploymentRead:
    """Bring a deployment that scaled to zero back up; anyone who may use it may wake it."""
    return await _read(session, await service.wake(session, principal, deployment_id=deployment_id))


@router.post("/{deployment_id}/rollback", response_model=DeploymentRead)
async def rollback(
    deployment_id: uuid.UUID, body: RollbackIn, session: SessionDep, principal: PrincipalDep, state: StateDep
) -> DeploymentRead:
    """Roll back: an earlier revision's spec becomes a new revision."""
    deployment = await service.rollback(
        session,
        principal,
        deployment_id=deployment_id,
        revision=body.revision,
        zones=await state.runtime.zones(),
        settings=state.settings,
    )
    return await _read(session, deployment)


@router.get("/{deployment_id}/revisions", response_model=list[RevisionRead])
async def revisions(
    deployment_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> list[RevisionRead]:
    _, deployment = await service.visible_deployment(
        session, principal, deployment_id, permission="deployments:read"
    )
    return [RevisionRead.model_validate(r) for r in await repository.revisions(session, deployment.id)]


@router.delete("/{deployment_id}", response_model=DeploymentRead, status_code=202)
async def delete_deployment(
    deployment_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> DeploymentRead:
    """Stop serving and remove; the controller finishes the job."""
    return await _read(session, await service.delete(session, principal, deployment_id=deployment_id))


@router.get("/{deployment_id}/logs", response_class=StreamingResponse)
async def logs(
    deployment_id: uuid.UUID,
    session: SessionDep,
    principal: PrincipalDep,
    state: StateDep,
    replica: Annotated[str | None, Query(description="Replica id; default: the first replica")] = None,
    tail: Annotated[int, Query(ge=0, le=10000)] = 100,
    follow: bool = False,
) -> StreamingResponse:
    _, deployment = await service.visible_deployment(
        session, principal, deployment_id, permission="deployments:read"
    )
    observed = await state.runtime.observe(deployment_id=deployment.id)
    ids = [r.id for r in observed.replicas]
    chosen = replica or (ids[0] if ids else None)
    if chosen is None or chosen not in ids:
        raise NotFound(f"Deployment '{deployment.name}' has no replica {replica or ''}".rstrip())

    async def lines() -> AsyncIterator[bytes]:
        async for line in state.runtime.logs(replica_id=chosen, tail=tail, follow=follow):
            yield (line.rstrip("\n") + "\n").encode()

    return StreamingResponse(lines(), media_type="text/plain")
