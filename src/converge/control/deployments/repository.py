"""All SQL for deployments and their revisions."""

from __future__ import annotations

import uuid

from sqlalchemy import func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from converge.models import Build, Deployment, DeploymentRevision, ModelVersion, Project


async def get(session: AsyncSession, deployment_id: uuid.UUID, *, lock: bool = False) -> Deployment | None:
    q = select(Deployment).where(Deployment.id == deployment_id)
    if lock:
        q = q.with_for_update()
    return await session.scalar(q)


async def by_name(session: AsyncSession, project_id: uuid.UUID, name: str) -> Deployment | None:
    return await session.scalar(
        select(Deployment).where(Deployment.project_id == project_id, Deployment.name == name)
    )


async def list_for_project(
    session: AsyncSession,
    project_id: uuid.UUID | None,
    *,
    visible: set[uuid.UUID] | None,
    after: uuid.UUID | None,
    limit: int,
) -> list[Deployment]:
    q = select(Deployment).order_by(Deployment.id).limit(limit + 1)
    if project_id is not None:
        q = q.where(Deployment.project_id == project_id)
    if visible is not None:
        q = q.where(Deployment.project_id.in_(list(visible)))
    if after is not None:
        q = q.where(Deployment.id > after)
    return list((await session.scalars(q)).all())


async def all_active(session: AsyncSession) -> list[Deployment]:
    return list((await session.scalars(select(Deployment).order_by(Deployment.id))).all())


async def revision(session: AsyncSession, deployment_id: uuid.UUID, number: int) -> DeploymentRevision | None:
    q = select(DeploymentRevision).where(
        DeploymentRevision.deployment_id == deployment_id, DeploymentRevision.revision == number
    )
    return await session.scalar(q)


async def revisions(session: AsyncSession, deployment_id: uuid.UUID) -> list[DeploymentRevision]:
    q = select(DeploymentRevision).where(DeploymentRevision.deployment_id == deployment_id)
    return list((await session.scalars(q.order_by(DeploymentRevision.revision))).all())


async def latest_revision_number(session: AsyncSession, deployment_id: uuid.UUID) -> int:
    q = select(func.max(DeploymentRevision.revision)).where(DeploymentRevision.deployment_id == deployment_id)
    return int(await session.scalar(q) or 0)


async def current_specs(session: AsyncSession, project_id: uuid.UUID) -> list[tuple[uuid.UUID, dict]]:
    """(deployment id, current revision spec) for every live deployment of a project."""
    q = (
        select(Deployment.id, DeploymentRevision.spec)
        .join(
            DeploymentRevision,
            (DeploymentRevision.deployment_id == Deployment.id)
            & (DeploymentRevision.revision == Deployment.revision),
        )
        .where(Deployment.project_id == project_id, Deployment.deleting.is_(False))
    )
    return [(did, spec) for did, spec in (await session.execute(q)).all()]


async def specs_of(session: AsyncSession, deployments: list[Deployment]) -> dict[uuid.UUID, dict]:
    """The current revision's spec of each deployment, in one query."""
    if not deployments:
        return {}
    q = select(DeploymentRevision.deployment_id, DeploymentRevision.spec).where(
        tuple_(DeploymentRevision.deployment_id, DeploymentRevision.revision).in_(
            [(d.id, d.revision) for d in deployments]
        )
    )
    return {did: spec for did, spec in (await session.execute(q)).all()}


async def using_model(
    session: AsyncSession,
    *,
    model_id: uuid.UUID,
    version_id: uuid.UUID | None = None,
    other_than: uuid.UUID | None = None,
    limit: int | None = None,
) -> list[tuple[Deployment, str]]:
    """(deployment, its project's name) for live deployments of a library model's versions.

    `version_id`: of that version only; `other_than`: only those outside that project.
    """
    q = (
        select(Deployment, Project.name)
        .join(ModelVersion, ModelVersion.id == Deployment.model_version_id)
        .join(Project, Project.id == Deployment.project_id)
        .where(ModelVersion.model_id == model_id, Deployment.deleting.is_(False))
        .order_by(Project.name, Deployment.name)
    )
    if version_id is not None:
        q = q.where(Deployment.model_version_id == version_id)
    if other_than is not None:
        q = q.where(Deployment.project_id != other_than)
    if limit is not None:
        q = q.limit(limit)
    return [(d, name) for d, name in (await session.execute(q)).all()]


async def build_succeeded(session: AsyncSession, version_id: uuid.UUID, *, profile: str) -> bool:
    """Whether a build of this version for this profile succeeded (the admission fact)."""
    q = select(Build.id).where(
        Build.model_version_id == version_id, Build.profile == profile, Build.state == "succeeded"
    )
    return (await session.scalar(q.limit(1))) is not None
