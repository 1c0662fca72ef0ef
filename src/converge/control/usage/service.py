"""Usage reports: resolve who may see what, then aggregate in the database."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from converge.control.deployments import repository as deployments
from converge.control.projects import repository as projects
from converge.control.projects.principal import Principal
from converge.control.projects.service import visible_project
from converge.control.usage import repository
from converge.control.usage.schemas import UsageQuery, UsageReport, UsageRow, UsageTotals
from converge.errors import NotFound, Unprocessable
from converge.models import Project


def _as_uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def _missing(field: str, message: str) -> Unprocessable:
    """A 422 shaped like a request-validation error, for rules that depend on the caller."""
    return Unprocessable(
        f"query.{field}: {message}",
        extra={"errors": [{"field": f"query.{field}", "message": message, "type": "missing"}]},
    )


async def _project(session: AsyncSession, principal: Principal, ref: str | None) -> Project | None:
    if ref is None:
        if not principal.is_admin:
            raise _missing("project", "Field required: a project id or name (only admins may omit it)")
        return None
    project_id = _as_uuid(ref)
    project = await (
        projects.get_project(session, project_id) if project_id else projects.project_by_name(session, ref)
    )
    if project is None or not principal.sees(project.id):  # by name, too: never reveal the id
        raise NotFound(f"Project {ref} not found")
    return await visible_project(session, principal, project.id, permission="project:read")


async def _key_id(
    session: AsyncSession, project: Project | None, key_id: uuid.UUID | None
) -> uuid.UUID | None:
    if key_id is None:
        return None
    key = await projects.get_key(session, key_id)
    if key is None or (project is not None and key.project_id != project.id):
        raise NotFound(f"API key {key_id} not found")
    return key.id


async def _deployment_id(session: AsyncSession, project: Project | None, ref: str | None) -> uuid.UUID | None:
    if ref is None:
        return None
    deployment_id = _as_uuid(ref)
    if deployment_id is not None:
        deployment = await deployments.get(session, deployment_id)
    elif project is None:
        raise _missing("project", "Field required to find a deployment by name; or pass its id")
    else:
        deployment = await deployments.by_name(session, project.id, ref)
    if deployment is None or (project is not None and deployment.project_id != project.id):
        raise NotFound(f"Deployment {ref} not found")
    return deployment.id


async def report(
    session: AsyncSession, principal: Principal, *, query: UsageQuery, now: datetime | None = None
) -> UsageReport:
    """Another project's key or deployment answers 404, like the project itself."""
    project = await _project(session, principal, query.project)
    since, until = query.window(now or datetime.now(UTC))
    f = repository.UsageFilter(
        since=since,
        until=until,
        project_id=project.id if project else None,
        key_id=await _key_id(session, project, query.key),
        deployment_id=await _deployment_id(session, project, query.deployment),
    )
    rows = await repository.aggregate(session, f, group_by=query.group_by)
    totals = await repository.totals(session, f)
    return UsageReport(
        since=since,
        until=until,
        group_by=query.group_by,
        data=[UsageRow.model_validate(r) for r in rows],
        totals=UsageTotals.model_validate(totals),
    )
