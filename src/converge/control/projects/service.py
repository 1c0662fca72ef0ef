"""Projects, members and API keys: the domain rules. Services flush, never commit."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from converge.control.events.service import record
from converge.control.projects import repository
from converge.control.projects.principal import Principal
from converge.control.projects.schemas import (
    KeyCreate,
    KeyUpdate,
    Limits,
    MemberCreate,
    OrgKeyCreate,
    ProjectCreate,
    ProjectUpdate,
)
from converge.core import apikeys as keys
from converge.core.rbac import PROJECT_ROLES, Role, may_grant
from converge.errors import Conflict, Forbidden, NotFound
from converge.kit.unique import flush_or_conflict
from converge.models import ApiKey, Member, Project


async def visible_project(
    session: AsyncSession, principal: Principal, project_id: uuid.UUID, *, permission: str
) -> Project:
    """The project if the caller may see it (else 404, never 403) and holds `permission` (else 403)."""
    project = await repository.get_project(session, project_id)
    if project is None or not principal.sees(project.id):
        raise NotFound(f"Project {project_id} not found")
    if not principal.can(permission, project.id):
        raise Forbidden(f"Your role in project '{project.name}' does not include '{permission}'")
    return project


async def create_project(
    session: AsyncSession, principal: Principal | None, *, body: ProjectCreate
) -> Project:
    project = Project(
        name=body.name,
        description=body.description,
        environment=body.environment,
        quotas=body.quotas.model_dump(),
        limits=body.limits.stored(),
    )
    session.add(project)
    await flush_or_conflict(session, f"A project named '{body.name}' already exists")
    if principal is not None and principal.kind == "oidc":  # a person who creates a project owns it
        subject = principal.subject.removeprefix("oidc:")  # members are stored by the raw claim
        session.add(Member(project_id=project.id, subject=subject, role=Role.OWNER, added_by="system"))
    await record(
        session,
        principal,
        action="project.created",
        project_id=project.id,
        object_type="project",
        object_id=project.id,
        changes={
            "name": project.name,
            "environment": project.environment,
            "quotas": project.quotas,
            "limits": project.limits,
        },
    )
    return project


async def update_project(
    session: AsyncSession, principal: Principal, *, project_id: uuid.UUID, body: ProjectUpdate
) -> Project:
    project = await visible_project(session, principal, project_id, permission="project:write")
    changes: dict[str, object] = {}
    if "description" in body.model_fields_set and body.description is not None:
        project.description = changes["description"] = body.description
    if "environment" in body.model_fields_set and body.environment is not None:
        project.environment = changes["environment"] = body.environment
    if "quotas" in body.model_fields_set and body.quotas is not None:
        project.quotas = changes["quotas"] = body.quotas.model_dump()
    if "limits" in body.model_fields_set and body.limits is not None:
        # The gateway reloads a project's limits when it sees this event.
        project.limits = changes["limits"] = body.limits.stored()
    await session.flush()
    await record(
        session,
        principal,
        action="project.updated",
        project_id=project.id,
        object_type="project",
        object_id=project.id,
        changes=changes,
    )
    return project


async def delete_project(session: AsyncSession, principal: Principal, *, project_id: uuid.UUID) -> None:
    project = await visible_project(session, principal, project_id, permission="project:delete")
    await record(
        session,
        principal,
        action="project.deleted",
        project_id=project.id,
        object_type="project",
        object_id=project.id,
        changes={"name": project.name},
    )
    await session.delete(project)
    await session.flush()


def _project_role_only(role: Role) -> None:
    if role not in PROJECT_ROLES:
        raise Forbidden(
            f"'{role}' is an organisation role, not a project role: organisation keys (POST /keys) "
            "or the OIDC roles claim carry it"
        )


def _check_grant(principal: Principal, project: Project, role: Role) -> None:
    own = principal.role_in(project.id)
    if own is None or not may_grant(own, role):
        raise Forbidden(f"You cannot grant '{role}': it is above your own role in '{project.name}'")


async def add_member(
    session: AsyncSession, principal: Principal, *, project_id: uuid.UUID, body: MemberCreate
) -> Member:
    project = await visible_project(session, principal, project_id, permission="members:write")
    _project_role_only(body.role)
    _check_grant(principal, project, body.role)
    if await repository.member_by_subject(session, project.id, body.subject) is not None:
        raise Conflict(f"'{body.subject}' is already a member of '{project.name}'")
    member = Member(project_id=project.id, subject=body.subject, role=body.role, added_by=principal.subject)
    session.add(member)
    await session.flush()
    await record(
        session,
        principal,
        action="member.added",
        project_id=project.id,
        object_type="member",
        object_id=member.id,
        changes={"subject": member.subject, "role": member.role},
    )
    return member


async def _member(
    session: AsyncSession, principal: Principal, project_id: uuid.UUID, member_id: uuid.UUID
) -> tuple[Project, Member]:
    project = await visible_project(session, principal, project_id, permission="members:write")
    member = await repository.get_member(session, project.id, member_id)
    if member is None:
        raise NotFound(f"Member {member_id} not found in project '{project.name}'")
    return project, member


async def change_member_role(
    session: AsyncSession, principal: Principal, *, project_id: uuid.UUID, member_id: uuid.UUID, role: Role
) -> Member:
    project, member = await _member(session, principal, project_id, member_id)
    _project_role_only(role)
    _check_grant(principal, project, role)
    _check_grant(principal, project, Role(member.role))
    before, member.role = member.role, role
    await session.flush()
    await record(
        session,
        principal,
        action="member.updated",
        project_id=project.id,
        object_type="member",
        object_id=member.id,
        changes={"subject": member.subject, "role": {"from": before, "to": role}},
    )
    return member


async def remove_member(
    session: AsyncSession, principal: Principal, *, project_id: uuid.UUID, member_id: uuid.UUID
) -> None:
    project, member = await _member(session, principal, project_id, member_id)
    _check_grant(principal, project, Role(member.role))
    await record(
        session,
        principal,
        action="member.removed",
        project_id=project.id,
        object_type="member",
        object_id=member.id,
        changes={"subject": member.subject},
    )
    await session.delete(member)
    await session.flush()


def _expiry(days: int | None) -> datetime | None:
    return datetime.now(UTC) + timedelta(days=days) if days else None


async def _issue_key(
    session: AsyncSession,
    principal: Principal | None,
    *,
    pepper: str,
    name: str,
    project_id: uuid.UUID | None,
    role: Role,
    expires_at: datetime | None,
    limits: Limits,
) -> tuple[ApiKey, str]:
    new = keys.generate(pepper=pepper)
    key = ApiKey(
        prefix=new.prefix,
        secret_hash=new.secret_hash,
        name=name,
        project_id=project_id,
        role=role,
        created_by=principal.subject if principal else "system",
        expires_at=expires_at,
        limits=limits.stored(),
    )
    session.add(key)
    await session.flush()
    await record(
        session,
        principal,
        action="key.created",
        project_id=project_id,
        object_type="api_key",
        object_id=key.id,
        changes={"name": name, "prefix": key.prefix, "role": role, "limits": key.limits},
        restricted=project_id is None,
    )
    return key, new.token


async def create_key(
    session: AsyncSession, principal: Principal, *, project_id: uuid.UUID, body: KeyCreate, pepper: str
) -> tuple[ApiKey, str]:
    project = await visible_project(session, principal, project_id, permission="keys:write")
    if body.role not in PROJECT_ROLES:
        raise Forbidden(f"Project keys cannot hold '{body.role}'; organisation keys are created under /keys")
    _check_grant(principal, project, body.role)
    return await _issue_key(
        session,
        principal,
        pepper=pepper,
        name=body.name,
        project_id=project.id,
        role=body.role,
        expires_at=_expiry(body.expires_in_days),
        limits=body.limits,
    )


async def create_org_key(
    session: AsyncSession, principal: Principal | None, *, body: OrgKeyCreate, pepper: str
) -> tuple[ApiKey, str]:
    return await _issue_key(
        session,
        principal,
        pepper=pepper,
        name=body.name,
        project_id=None,
        role=Role(body.role),
        expires_at=_expiry(body.expires_in_days),
        limits=body.limits,
    )


async def _key(
    session: AsyncSession, principal: Principal, *, key_id: uuid.UUID, project_id: uuid.UUID | None
) -> tuple[Project | None, ApiKey]:
    """The key, addressed through its own project (or through /keys for organisation keys)."""
    project = None
    if project_id is not None:
        project = await visible_project(session, principal, project_id, permission="keys:write")
    key = await repository.get_key(session, key_id)
    if key is None or key.project_id != project_id:
        raise NotFound(f"API key {key_id} not found")
    return project, key


async def update_key(
    session: AsyncSession,
    principal: Principal,
    *,
    key_id: uuid.UUID,
    project_id: uuid.UUID | None,
    body: KeyUpdate,
) -> ApiKey:
    """Rename a key or change its limits in place: the secret stays the same."""
    project, key = await _key(session, principal, key_id=key_id, project_id=project_id)
    if project is not None:
        _check_grant(principal, project, Role(key.role))
    if key.revoked_at is not None:
        raise Conflict(f"API key {key.prefix} was revoked; issue a new key instead")
    changes: dict[str, object] = {}
    if "name" in body.model_fields_set and body.name is not None:
        key.name = changes["name"] = body.name
    if "limits" in body.model_fields_set and body.limits is not None:
        # The gateway reloads a key's limits when it sees this event.
        key.limits = changes["limits"] = body.limits.stored()
    await session.flush()
    await record(
        session,
        principal,
        action="key.updated",
        project_id=project_id,
        object_type="api_key",
        object_id=key.id,
        changes={"prefix": key.prefix, **changes},
        restricted=project_id is None,
    )
    return key


async def revoke_key(
    session: AsyncSession, principal: Principal, *, key_id: uuid.UUID, project_id: uuid.UUID | None
) -> ApiKey:
    _, key = await _key(session, principal, key_id=key_id, project_id=project_id)
    if key.revoked_at is None:
        key.revoked_at = datetime.now(UTC)
        await session.flush()
        await record(
            session,
            principal,
            action="key.revoked",
            project_id=project_id,
            object_type="api_key",
            object_id=key.id,
            changes={"name": key.name, "prefix": key.prefix},
            restricted=project_id is None,
        )
    return key
