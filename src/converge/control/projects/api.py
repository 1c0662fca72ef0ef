"""HTTP for projects, members and API keys."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response

from converge.control.projects import repository, service
from converge.control.projects.auth import PrincipalDep, require
from converge.control.projects.principal import Principal
from converge.control.projects.schemas import (
    KeyCreate,
    KeyCreated,
    KeyRead,
    KeyUpdate,
    MemberCreate,
    MemberRead,
    MemberUpdate,
    OrgKeyCreate,
    ProjectCreate,
    ProjectRead,
    ProjectUpdate,
    WhoAmI,
)
from converge.deps import SessionDep, StateDep
from converge.errors import PROBLEM_RESPONSES
from converge.kit.pagination import Page, PageDep, page_of, uuid_after
from converge.models import Project

router = APIRouter(responses=PROBLEM_RESPONSES)


def _project_read(project: Project, principal: Principal) -> ProjectRead:
    read = ProjectRead.model_validate(project)
    read.your_role = principal.role_in(read.id)
    return read


@router.get("/auth/whoami", response_model=WhoAmI, tags=["auth"])
async def whoami(principal: PrincipalDep) -> WhoAmI:
    return WhoAmI(
        subject=principal.subject,
        kind=principal.kind,
        is_admin=principal.is_admin,
        roles={str(k): v for k, v in principal.roles.items()},
        org_roles=sorted(principal.org_roles),
    )


@router.post("/projects", response_model=ProjectRead, status_code=201, tags=["projects"])
async def create_project(
    body: ProjectCreate,
    session: SessionDep,
    principal=require("projects:create"),  # noqa: B008
) -> ProjectRead:
    project = await service.create_project(session, principal, body=body)
    return _project_read(project, principal)


@router.get("/projects", response_model=Page[ProjectRead], tags=["projects"])
async def list_projects(session: SessionDep, principal: PrincipalDep, page: PageDep) -> Page[ProjectRead]:
    rows = await repository.list_projects(
        session, visible=principal.visible_projects, after=uuid_after(page), limit=page.limit
    )
    result = page_of(rows, limit=page.limit, schema=ProjectRead)
    for item in result.items:
        item.your_role = principal.role_in(item.id)
    return result


@router.get("/projects/{project_id}", response_model=ProjectRead, tags=["projects"])
async def get_project(project_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> ProjectRead:
    project = await service.visible_project(session, principal, project_id, permission="project:read")
    return _project_read(project, principal)


@router.patch("/projects/{project_id}", response_model=ProjectRead, tags=["projects"])
async def update_project(
    project_id: uuid.UUID, body: ProjectUpdate, session: SessionDep, principal: PrincipalDep
) -> ProjectRead:
    project = await service.update_project(session, principal, project_id=project_id, body=body)
    return _project_read(project, principal)


@router.delete("/projects/{project_id}", status_code=204, tags=["projects"])
async def delete_project(project_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> Response:
    await service.delete_project(session, principal, project_id=project_id)
    return Response(status_code=204)


@router.get("/projects/{project_id}/members", response_model=Page[MemberRead], tags=["members"])
async def list_members(
    project_id: uuid.UUID, session: SessionDep, principal: PrincipalDep, page: PageDep
) -> Page[MemberRead]:
    await service.visible_project(session, principal, project_id, permission="members:read")
    rows = await repository.list_members(session, project_id, after=uuid_after(page), limit=page.limit)
    return page_of(rows, limit=page.limit, schema=MemberRead)


@router.post("/projects/{project_id}/members", response_model=MemberRead, status_code=201, tags=["members"])
async def add_member(
    project_id: uuid.UUID, body: MemberCreate, session: SessionDep, principal: PrincipalDep
) -> MemberRead:
    member = await service.add_member(session, principal, project_id=project_id, body=body)
    return MemberRead.model_validate(member)


@router.patch("/projects/{project_id}/members/{member_id}", response_model=MemberRead, tags=["members"])
async def update_member(
    project_id: uuid.UUID,
    member_id: uuid.UUID,
    body: MemberUpdate,
    session: SessionDep,
    principal: PrincipalDep,
) -> MemberRead:
    member = await service.change_member_role(
        session, principal, project_id=project_id, member_id=member_id, role=body.role
    )
    return MemberRead.model_validate(member)


@router.delete("/projects/{project_id}/members/{member_id}", status_code=204, tags=["members"])
async def remove_member(
    project_id: uuid.UUID, member_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> Response:
    await service.remove_member(session, principal, project_id=project_id, member_id=member_id)
    return Response(status_code=204)


@router.get("/projects/{project_id}/keys", response_model=Page[KeyRead], tags=["keys"])
async def list_keys(
    project_id: uuid.UUID, session: SessionDep, principal: PrincipalDep, page: PageDep
) -> Page[KeyRead]:
    await service.visible_project(session, principal, project_id, permission="keys:read")
    rows = await repository.list_keys(
        session, project_id=project_id, after=uuid_after(page), limit=page.limit
    )
    return page_of(rows, limit=page.limit, schema=KeyRead)


@router.post("/projects/{project_id}/keys", response_model=KeyCreated, status_code=201, tags=["keys"])
async def create_key(
    project_id: uuid.UUID, body: KeyCreate, session: SessionDep, principal: PrincipalDep, state: StateDep
) -> KeyCreated:
    pepper = state.settings.auth.secret_key.get_secret_value()
    key, token = await service.create_key(session, principal, project_id=project_id, body=body, pepper=pepper)
    return KeyCreated.model_validate({**KeyRead.model_validate(key).model_dump(), "token": token})


@router.patch("/projects/{project_id}/keys/{key_id}", response_model=KeyRead, tags=["keys"])
async def update_key(
    project_id: uuid.UUID, key_id: uuid.UUID, body: KeyUpdate, session: SessionDep, principal: PrincipalDep
) -> KeyRead:
    """Rename a key or change its gateway limits; the key itself stays valid and unchanged."""
    key = await service.update_key(session, principal, key_id=key_id, project_id=project_id, body=body)
    return KeyRead.model_validate(key)


@router.delete("/projects/{project_id}/keys/{key_id}", response_model=KeyRead, tags=["keys"])
async def revoke_key(
    project_id: uuid.UUID, key_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> KeyRead:
    key = await service.revoke_key(session, principal, key_id=key_id, project_id=project_id)
    return KeyRead.model_validate(key)


@router.get("/keys", response_model=Page[KeyRead], tags=["keys"])
async def list_org_keys(
    session: SessionDep,
    page: PageDep,
    principal=require("keys:admin"),  # noqa: B008
) -> Page[KeyRead]:
    rows = await repository.list_keys(session, project_id=None, after=uuid_after(page), limit=page.limit)
    return page_of(rows, limit=page.limit, schema=KeyRead)


@router.post("/keys", response_model=KeyCreated, status_code=201, tags=["keys"])
async def create_org_key(
    body: OrgKeyCreate,
    session: SessionDep,
    state: StateDep,
    principal=require("keys:admin"),  # noqa: B008
) -> KeyCreated:
    pepper = state.settings.auth.secret_key.get_secret_value()
    key, token = await service.create_org_key(session, principal, body=body, pepper=pepper)
    return KeyCreated.model_validate({**KeyRead.model_validate(key).model_dump(), "token": token})


@router.patch("/keys/{key_id}", response_model=KeyRead, tags=["keys"])
async def update_org_key(
    key_id: uuid.UUID,
    body: KeyUpdate,
    session: SessionDep,
    principal=require("keys:admin"),  # noqa: B008
) -> KeyRead:
    key = await service.update_key(session, principal, key_id=key_id, project_id=None, body=body)
    return KeyRead.model_validate(key)


@router.delete("/keys/{key_id}", response_model=KeyRead, tags=["keys"])
async def revoke_org_key(
    key_id: uuid.UUID,
    session: SessionDep,
    principal=require("keys:admin"),  # noqa: B008
) -> KeyRead:
    key = await service.revoke_key(session, principal, key_id=key_id, project_id=None)
    return KeyRead.model_validate(key)
