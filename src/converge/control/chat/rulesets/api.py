"""HTTP for rulesets: versioned system instructions and guardrails, and attaching one as a
deployment's default (the gateway then holds every request to it to the ruleset)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response

from converge.control.chat import refs
from converge.control.chat.rulesets import repository, service
from converge.control.chat.rulesets.schemas import (
    AttachmentRead,
    RulesetCreate,
    RulesetRead,
    RulesetUpdate,
    RulesetVersionRead,
)
from converge.control.projects.auth import PrincipalDep
from converge.control.projects.service import visible_project
from converge.deps import SessionDep
from converge.errors import PROBLEM_RESPONSES
from converge.kit.pagination import Page, PageDep, encode_cursor, int_after, uuid_after
from converge.models import Ruleset

router = APIRouter(prefix="/rulesets", tags=["rulesets"], responses=PROBLEM_RESPONSES)


@router.post("", response_model=RulesetRead, status_code=201)
async def create_ruleset(
    *,
    body: RulesetCreate,
    session: SessionDep,
    principal: PrincipalDep,
    project: Annotated[uuid.UUID, Query(description="The project that owns the ruleset")],
) -> RulesetRead:
    """Version 1 of a ruleset. Patterns must compile (422 naming the field otherwise)."""
    owner = await visible_project(session, principal, project, permission="rulesets:write")
    ruleset = await service.create(session, principal, project=owner, body=body)
    return (await service.read_many(session, [ruleset]))[0]


@router.get("", response_model=Page[RulesetRead])
async def list_rulesets(
    *,
    session: SessionDep,
    principal: PrincipalDep,
    page: PageDep,
    project: Annotated[uuid.UUID | None, Query(description="Only this project's rulesets")] = None,
) -> Page[RulesetRead]:
    if project is not None:
        await visible_project(session, principal, project, permission="rulesets:read")
    rows = await refs.list_for_project(
        session,
        Ruleset,
        project_id=project,
        visible=principal.visible_projects,
        after=uuid_after(page),
        limit=page.limit,
    )
    shown = rows[: page.limit]
    return Page(
        items=await service.read_many(session, shown),
        next_cursor=encode_cursor(shown[-1].id) if len(rows) > page.limit else None,
    )


@router.get("/{ruleset_id}", response_model=RulesetRead)
async def get_ruleset(*, ruleset_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> RulesetRead:
    ruleset = await service.visible_ruleset(
        session, principal, ruleset_id=ruleset_id, permission="rulesets:read"
    )
    return (await service.read_many(session, [ruleset]))[0]


@router.patch("/{ruleset_id}", response_model=RulesetRead)
async def update_ruleset(
    *, ruleset_id: uuid.UUID, body: RulesetUpdate, session: SessionDep, principal: PrincipalDep
) -> RulesetRead:
    """A new spec is a new version (the gateway applies it from its next snapshot, within a
    second); the previous versions stay readable under /versions."""
    ruleset = await service.update(session, principal, ruleset_id=ruleset_id, body=body)
    return (await service.read_many(session, [ruleset]))[0]


@router.delete("/{ruleset_id}", status_code=204, response_class=Response)
async def delete_ruleset(*, ruleset_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> Response:
    """409 naming the deployments (and RAG models, agents) that still use it."""
    await service.delete(session, principal, ruleset_id=ruleset_id)
    return Response(status_code=204)


@router.get("/{ruleset_id}/versions", response_model=Page[RulesetVersionRead])
async def list_versions(
    *, ruleset_id: uuid.UUID, session: SessionDep, principal: PrincipalDep, page: PageDep
) -> Page[RulesetVersionRead]:
    """Every version, newest first."""
    await service.visible_ruleset(session, principal, ruleset_id=ruleset_id, permission="rulesets:read")
    rows = await repository.versions(session, ruleset_id, after=int_after(page), limit=page.limit)
    shown = rows[: page.limit]
    return Page(
        items=[RulesetVersionRead.model_validate(v) for v in shown],
        next_cursor=encode_cursor(shown[-1].version) if len(rows) > page.limit else None,
    )


@router.get("/{ruleset_id}/deployments", response_model=list[AttachmentRead])
async def list_attachments(
    *, ruleset_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> list[AttachmentRead]:
    """The deployments this ruleset is the default of."""
    await service.visible_ruleset(session, principal, ruleset_id=ruleset_id, permission="rulesets:read")
    return [
        AttachmentRead(
            ruleset_id=row.ruleset_id,
            deployment_id=row.deployment_id,
            deployment=name,
            created_by=row.created_by,
            created_at=row.created_at,
        )
        for row, name in await repository.attachments(session, [ruleset_id])
    ]


@router.put("/{ruleset_id}/deployments/{deployment_id}", response_model=AttachmentRead)
async def attach_ruleset(
    *, ruleset_id: uuid.UUID, deployment_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> AttachmentRead:
    """Make the ruleset the deployment's default, replacing the one it had. The deployment must
    be in the ruleset's project (another project's answers 404)."""
    return await service.attach(session, principal, ruleset_id=ruleset_id, deployment_id=deployment_id)


@router.delete("/{ruleset_id}/deployments/{deployment_id}", status_code=204, response_class=Response)
async def detach_ruleset(
    *, ruleset_id: uuid.UUID, deployment_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> Response:
    await service.detach(session, principal, ruleset_id=ruleset_id, deployment_id=deployment_id)
    return Response(status_code=204)
