"""Retention: the audit log and the event outbox stop growing once past their windows.

The leading controller calls `prune` every `retention.prune_interval_s` (hourly). Audit records
are kept `audit_days` (a year by default). An event is needed by two kinds of subscriber: live
SSE streams and cluster watchers get it from NOTIFY within moments of its commit (the
broadcaster hands them the event itself, not its id), and a client that reconnects with
`Last-Event-ID` replays it from the table; so once older than the replay window
(`events_days`), no subscriber can still need it, and it goes. Deletes run in batches of
`prune_batch` rows, oldest first, each its own short transaction (the `at` indexes of
migration 0012 find them), so pruning a backlog never holds long locks.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import structlog
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from converge.config import RetentionSettings
from converge.models import AuditRecord, Event
from converge.storage.db import transaction

log = structlog.get_logger(__name__)


async def prune(
    sessions: async_sessionmaker[AsyncSession], *, settings: RetentionSettings, now: datetime | None = None
) -> dict[str, int]:
    """Delete what is past its window; rows deleted per table (a window of 0 keeps all)."""
    now = now or datetime.now(UTC)
    deleted: dict[str, int] = {}
    tables: tuple[tuple[str, type[AuditRecord] | type[Event], float], ...] = (
        ("audit", AuditRecord, settings.audit_days),
        ("events", Event, settings.events_days),
    )
    for name, model, days in tables:
        if days <= 0:
            continue
        cutoff = now - timedelta(days=days)
        total = 0
        while True:
            async with transaction(sessions) as session:
                oldest = (
                    select(model.id).where(model.at < cutoff).order_by(model.id).limit(settings.prune_batch)
                )
                result = await session.execute(delete(model).where(model.id.in_(oldest.scalar_subquery())))
                count = int(result.rowcount or 0)  # type: ignore[attr-defined]  # a CursorResult
            total += count
            if count < settings.prune_batch:
                break
        deleted[name] = total
        if total:
            log.info("retention_pruned", table=model.__tablename__, rows=total, before=cutoff.isoformat())
    return deleted
