"""All SQL for builds."""

from __future__ import annotations

import uuid
from collections.abc import Collection

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from converge.control.builds.schemas import BuildState
from converge.models import Build


async def get(session: AsyncSession, build_id: uuid.UUID) -> Build | None:
    return await session.get(Build, build_id)


async def page(
    session: AsyncSession,
    *,
    limit: int,
    projects: Collection[uuid.UUID] | None,
    state: BuildState | None,
    after: uuid.UUID | None,
) -> list[Build]:
    """Up to `limit` builds in id order after `after`; `projects` None means every project."""
    q = select(Build).order_by(Build.id).limit(limit)
    if projects is not None:
        q = q.where(Build.project_id.in_(list(projects)))
    if state is not None:
        q = q.where(Build.state == state)
    if after is not None:
        q = q.where(Build.id > after)
    return list((await session.scalars(q)).all())


async def for_version(session: AsyncSession, version_id: uuid.UUID, *, profile: str) -> list[Build]:
    q = select(Build).where(Build.model_version_id == version_id, Build.profile == profile)
    return list((await session.scalars(q)).all())


async def succeeded_exists(session: AsyncSession, version_id: uuid.UUID, *, profile: str) -> bool:
    q = select(Build.id).where(
        Build.model_version_id == version_id,
        Build.profile == profile,
        Build.state == BuildState.SUCCEEDED,
    )
    return (await session.scalar(q.limit(1))) is not None


async def lock_oldest_queued(session: AsyncSession) -> Build | None:
    """The oldest queued build, row-locked; SKIP LOCKED lets several runners share the queue."""
    q = select(Build).where(Build.state == BuildState.QUEUED).order_by(Build.created_at).limit(1)
    return await session.scalar(q.with_for_update(skip_locked=True))


async def running(session: AsyncSession) -> list[Build]:
    """Every running build, oldest claim first."""
    q = select(Build).where(Build.state == BuildState.RUNNING).order_by(Build.started_at, Build.id)
    return list((await session.scalars(q)).all())


async def requeue_running(session: AsyncSession) -> int:
    result = await session.execute(
        update(Build)
        .where(Build.state == BuildState.RUNNING)
        .values(state=BuildState.QUEUED, started_at=None)
    )
    # An UPDATE answers a CursorResult, which has rowcount; execute() is typed as the base Result.
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
