"""All SQL for registry sources."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from converge.models import Source, SourceItem


async def get(session: AsyncSession, source_id: uuid.UUID, *, lock: bool = False) -> Source | None:
    q = select(Source).where(Source.id == source_id)
    if lock:
        q = q.with_for_update(skip_locked=True)
    return await session.scalar(q)


async def list_sources(session: AsyncSession, *, after: uuid.UUID | None, limit: int) -> list[Source]:
    q = select(Source).order_by(Source.id).limit(limit + 1)
    if after is not None:
        q = q.where(Source.id > after)
    return list((await session.scalars(q)).all())


async def due(session: AsyncSession, now: datetime) -> list[uuid.UUID]:
    q = select(Source.id).where(
        Source.enabled.is_(True), or_(Source.next_run_at.is_(None), Source.next_run_at <= now)
    )
    return list((await session.scalars(q)).all())


async def seen(session: AsyncSession, source_id: uuid.UUID, key: str, digest: str) -> bool:
    q = select(SourceItem.id).where(
        SourceItem.source_id == source_id, SourceItem.key == key, SourceItem.digest == digest
    )
    return (await session.scalar(q)) is not None
