"""All SQL for events and the audit log."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from typing import Any

from sqlalchemy import ColumnElement, or_, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from converge.models import AuditRecord, Event

CHANNEL = "converge_events"


async def insert_event(
    session: AsyncSession, *, project_id: uuid.UUID | None, kind: str, object_id: str, data: dict[str, Any]
) -> Event:
    event = Event(project_id=project_id, kind=kind, object_id=object_id, data=data)
    session.add(event)
    await session.flush()
    # Delivered by PostgreSQL only when (and if) the transaction commits.
    await session.execute(text("SELECT pg_notify(:c, :p)"), {"c": CHANNEL, "p": str(event.id)})
    return event


def insert_audit(session: AsyncSession, record: AuditRecord) -> None:
    session.add(record)


def _visibility(column: Any, projects: Collection[uuid.UUID] | None) -> ColumnElement[bool] | None:
    if projects is None:
        return None
    return or_(column.is_(None), column.in_(list(projects)))


def _kind_filter(kinds: Sequence[str]) -> ColumnElement[bool]:
    """`deployment` matches `deployment.created`; `deployment.created` matches exactly."""
    return or_(*[Event.kind == k if "." in k else Event.kind.startswith(k + ".") for k in kinds])


async def list_events(
    session: AsyncSession,
    *,
    visible: Collection[uuid.UUID] | None,
    project_id: uuid.UUID | None = None,
    kinds: Sequence[str] = (),
    after_id: int = 0,
    ids: Sequence[int] | None = None,
    limit: int = 100,
) -> list[Event]:
    q = select(Event).where(Event.id > after_id).order_by(Event.id).limit(limit)
    if (cond := _visibility(Event.project_id, visible)) is not None:
        q = q.where(cond)
    if project_id is not None:
        q = q.where(Event.project_id == project_id)
    if kinds:
        q = q.where(_kind_filter(kinds))
    if ids is not None:
        q = q.where(Event.id.in_(list(ids)))
    return list((await session.scalars(q)).all())


async def list_audit(
    session: AsyncSession,
    *,
    projects: Collection[uuid.UUID] | None,
    project_id: uuid.UUID | None,
    action: str | None,
    before_id: int | None,
    limit: int,
) -> list[AuditRecord]:
    q = select(AuditRecord).order_by(AuditRecord.id.desc()).limit(limit)
    if projects is not None:
        q = q.where(AuditRecord.project_id.in_(list(projects)))
    if project_id is not None:
        q = q.where(AuditRecord.project_id == project_id)
    if action:
        q = q.where(AuditRecord.action == action)
    if before_id is not None:
        q = q.where(AuditRecord.id < before_id)
    return list((await session.scalars(q)).all())
