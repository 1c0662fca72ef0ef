"""HTTP for policies: CRUD with revisions, the facts reference, and dry runs."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from converge.control.policies import repository, service
from converge.control.policies.schemas import (
    DryRunRequest,
    DryRunResult,
    PolicyCreate,
    PolicyRead,
    PolicyRevisionRead,
    PolicyUpdate,
)
from converge.control.projects.auth import PrincipalDep, require
from converge.control.projects.principal import Principal
from converge.core.policy import FACTS_DOC, Scope
from converge.deps import SessionDep, StateDep
from converge.errors import PROBLEM_RESPONSES
from converge.kit.pagination import Page, PageDep, page_of, uuid_after

router = APIRouter(prefix="/policies", tags=["policies"], responses=PROBLEM_RESPONSES)
PoliciesWrite = Annotated[Principal, require("policies:write")]


@router.get("/facts")
async def facts_reference(principal: PrincipalDep) -> dict[str, Any]:
    """Every fact a policy expression can read, with its meaning."""
    return FACTS_DOC


@router.post("", response_model=PolicyRead, status_code=201)
async def create_policy(body: PolicyCreate, session: SessionDep, principal: PoliciesWrite) -> PolicyRead:
    return PolicyRead.model_validate(await service.create(session, principal, body=body))


@router.get("", response_model=Page[PolicyRead])
async def list_policies(
    session: SessionDep,
    principal: PrincipalDep,
    page: PageDep,
    scope: Annotated[Scope | None, Query()] = None,
) -> Page[PolicyRead]:
    rows = await repository.list_policies(
        session, scope=scope.value if scope else None, after=uuid_after(page), limit=page.limit
    )
    return page_of(rows, limit=page.limit, schema=PolicyRead)


@router.get("/{policy_id}", response_model=PolicyRead)
async def get_policy(policy_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> PolicyRead:
    return PolicyRead.model_validate(await service.get(session, policy_id))


@router.patch("/{policy_id}", response_model=PolicyRead)
async def update_policy(
    policy_id: uuid.UUID, body: PolicyUpdate, session: SessionDep, principal: PoliciesWrite
) -> PolicyRead:
    """Every change is a new revision; `enabled: false` switches a policy off."""
    return PolicyRead.model_validate(await service.update(session, principal, policy_id=policy_id, body=body))


@router.delete("/{policy_id}", status_code=204)
async def delete_policy(policy_id: uuid.UUID, session: SessionDep, principal: PoliciesWrite) -> Response:
    await service.delete(session, principal, policy_id=policy_id)
    return Response(status_code=204)


@router.get("/{policy_id}/revisions", response_model=list[PolicyRevisionRead])
async def policy_revisions(
    policy_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> list[PolicyRevisionRead]:
    policy = await service.get(session, policy_id)
    return [PolicyRevisionRead.model_validate(r) for r in await repository.revisions(session, policy.id)]


@router.post("/{policy_id}/dry-run", response_model=DryRunResult)
async def dry_run(
    policy_id: uuid.UUID, body: DryRunRequest, session: SessionDep, principal: PoliciesWrite, state: StateDep
) -> DryRunResult:
    """Evaluate the policy, or a draft of it, against existing versions (all of them, restricted
    ones too, so this is for policy authors). Nothing changes."""
    return await service.dry_run(session, policy_id=policy_id, body=body, settings=state.settings)
