"""All SQL for projects, members and API keys."""

from __future__ import annotations

import uuid
from collections.abc import Collection
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from converge.models import ApiKey, Member, Project


async def get_project(session: AsyncSession, project_id: uuid.UUID) -> Project | None:
    return await session.get(Project, project_id)


async def project_by_name(session: AsyncSession, name: str) -> Project | None:
    return await session.scalar(select(Project).where(Project.name == name))


async def project_ids_by_names(session: AsyncSession, names: Collection[str]) -> dict[str, uuid.UUID]:
    rows = await session.execute(select(Project.name, Project.id).where(Project.name.in_(list(names))))
    return {name: pid for name, pid in rows.all()}


async def list_projects(
    session: AsyncSession, *, visible: Collection[uuid.UUID] | None, after: uuid.UUID | None, limit: int
) -> list[Project]:
    q = select(Project).order_by(Project.id).limit(limit + 1)
    if visible is not None:
        q = q.where(Project.id.in_(list(visible)))
    if after is not None:
        q = q.where(Project.id > after)
    return list((await session.scalars(q)).all())


async def list_members(
    session: AsyncSession, project_id: uuid.UUID, *, after: uuid.UUID | None, limit: int
) -> list[Member]:
    q = select(Member).where(Member.project_id == project_id).order_by(Member.id).limit(limit + 1)
    if after is not None:
        q = q.where(Member.id > after)
    return list((await session.scalars(q)).all())


async def get_member(session: AsyncSession, project_id: uuid.UUID, member_id: uuid.UUID) -> Member | None:
    member = await session.get(Member, member_id)
    return member if member is not None and member.project_id == project_id else None


async def member_by_subject(session: AsyncSession, project_id: uuid.UUID, subject: str) -> Member | None:
    q = select(Member).where(Member.project_id == project_id, Member.subject == subject)
    return await session.scalar(q)


async def memberships(session: AsyncSession, subject: str) -> list[tuple[uuid.UUID, str]]:
    rows = await session.execute(select(Member.project_id, Member.role).where(Member.subject == subject))
    return [(pid, role) for pid, role in rows.all()]


async def key_by_prefix(session: AsyncSession, prefix: str) -> ApiKey | None:
    return await session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))


async def get_key(session: AsyncSession, key_id: uuid.UUID) -> ApiKey | None:
    return await session.get(ApiKey, key_id)


async def list_keys(
    session: AsyncSession, *, project_id: uuid.UUID | None, after: uuid.UUID | None, limit: int
) -> list[ApiKey]:
    cond = ApiKey.project_id.is_(None) if project_id is None else ApiKey.project_id == project_id
    q = select(ApiKey).where(cond).order_by(ApiKey.id).limit(limit + 1)
    if after is not None:
        q = q.where(ApiKey.id > after)
    return list((await session.scalars(q)).all())


async def touch_key(session: AsyncSession, key_id: uuid.UUID, at: datetime) -> None:
    await session.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=at))


async def has_org_admin_key(session: AsyncSession) -> bool:
    q = select(ApiKey.id).where(ApiKey.project_id.is_(None), ApiKey.revoked_at.is_(None)).limit(1)
    return (await session.scalar(q)) is not None


async def next_key_expiries(session: AsyncSession, now: datetime) -> dict[str, datetime]:
    """The soonest expiry of a live key (not revoked, not yet expired) per project name, and
    `organisation` for the organisation keys; projects whose keys never expire are absent."""
    owner = func.coalesce(Project.name, "organisation")
    q = (
        select(owner, func.min(ApiKey.expires_at))
        .select_from(ApiKey)
        .outerjoin(Project, Project.id == ApiKey.project_id)
        .where(ApiKey.revoked_at.is_(None), ApiKey.expires_at > now)
        .group_by(owner)
    )
    return {name: at for name, at in (await session.execute(q)).all() if at is not None}
