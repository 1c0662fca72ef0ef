"""All SQL for events and the audit log."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, event, or_, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from converge.kit import channels
from converge.models import AuditRecord, Event

CHANNEL = channels.EVENTS


# Event ids must follow commit order, or a client resuming after id N could miss an event
# numbered below N that committed later. So events are queued during the transaction and
# inserted at commit under this transaction-level lock: ids are handed out in commit order
# while the lock is held only for the last moment of each writing transaction.
EVENTS_LOCK_KEY = 0x45_76_6E_74  # "Evnt"
OUTBOX = "converge_outbox"


def queue_event(
    session: AsyncSession,
    *,
    project_id: uuid.UUID | None,
    kind: str,
    object_id: str,
    data: dict[str, Any],
    restricted: bool = False,
) -> None:
    session.info.setdefault(OUTBOX, []).append(
        {
            "project_id": project_id,
            "kind": kind,
            "object_id": object_id,
            "data": data,
            "restricted": restricted,
        }
    )


@event.listens_for(Session, "before_commit")
def _append_outbox(session: Session) -> None:
    pending = session.info.pop(OUTBOX, None)
    if not pending:
        return
    session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": EVENTS_LOCK_KEY})
    rows = [Event(**values) for values in pending]
    session.add_all(rows)
    session.flush()
    for row in rows:  # delivered by PostgreSQL only when (and if) the transaction commits
        session.execute(text("SELECT pg_notify(:c, :p)"), {"c": CHANNEL, "p": str(row.id)})


@event.listens_for(Session, "after_rollback")
def _drop_outbox(session: Session) -> None:
    if not session.in_nested_transaction():
        session.info.pop(OUTBOX, None)


def insert_audit(session: AsyncSession, record: AuditRecord) -> None:
    session.add(record)


def _visibility(projects: Collection[uuid.UUID] | None) -> ColumnElement[bool] | None:
    """Admins (None) see everything; others their projects' events and unrestricted org events."""
    if projects is None:
        return None
    return or_(
        and_(Event.project_id.is_(None), Event.restricted.is_(False)), Event.project_id.in_(list(projects))
    )


def _kind_filter(kinds: Sequence[str]) -> ColumnElement[bool]:
    """`deployment` matches `deployment.created`; `deployment.created` matches exactly."""
    return or_(
        *[Event.kind == k if "." in k else Event.kind.startswith(k + ".", autoescape=True) for k in kinds]
    )


async def list_events(
    session: AsyncSession,
    *,
    visible: Collection[uuid.UUID] | None,
    project_id: uuid.UUID | None = None,
    kinds: Sequence[str] = (),
    after_id: int = 0,
    ids: Sequence[int] | None = None,
    since: datetime | None = None,
    limit: int = 100,
) -> list[Event]:
    q = select(Event).where(Event.id > after_id).order_by(Event.id).limit(limit)
    if since is not None:
        q = q.where(Event.at >= since)
    if (cond := _visibility(visible)) is not None:
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
