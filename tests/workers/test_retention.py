"""Retention: audit records past their year and events past the replay window are pruned, in
batches, and nothing younger (nor anything at all with a window of 0)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from converge.config import RetentionSettings
from converge.models import AuditRecord, Event
from converge.workers import retention


async def seed(maker, now: datetime, tag: str) -> None:
    async with maker() as session, session.begin():
        for days in (400, 366, 30):
            session.add(
                AuditRecord(
                    at=now - timedelta(days=days),
                    actor="test",
                    actor_kind="key",
                    action="test.retention",
                    project_id=None,
                    object_type="test",
                    object_id=f"{tag}-{days}",
                    changes={},
                )
            )
        for days in (9, 8, 1):
            session.add(
                Event(
                    at=now - timedelta(days=days),
                    project_id=None,
                    kind="test.retention",
                    object_id=f"{tag}-{days}",
                    data={},
                )
            )


async def left(maker, tag: str) -> tuple[list[str], list[str]]:
    async with maker() as session:
        audit = await session.scalars(
            select(AuditRecord.object_id).where(AuditRecord.object_id.startswith(tag))
        )
        events = await session.scalars(select(Event.object_id).where(Event.object_id.startswith(tag)))
        return sorted(audit.all()), sorted(events.all())


async def test_what_is_past_its_window_goes_in_batches_and_the_rest_stays(app, client):
    maker, now, tag = app.state.converge.session_factory, datetime.now(UTC), uuid.uuid4().hex[:8]
    await seed(maker, now, tag)
    deleted = await retention.prune(maker, settings=RetentionSettings(prune_batch=1), now=now)
    assert deleted["audit"] >= 2 and deleted["events"] >= 2  # others' old rows may go too
    assert await left(maker, tag) == ([f"{tag}-30"], [f"{tag}-1"])


async def test_a_window_of_zero_keeps_everything(app, client):
    maker, now, tag = app.state.converge.session_factory, datetime.now(UTC), uuid.uuid4().hex[:8]
    await seed(maker, now, tag)
    assert (
        await retention.prune(maker, settings=RetentionSettings(audit_days=0, events_days=0), now=now) == {}
    )
    audit, events = await left(maker, tag)
    assert len(audit) == 3 and len(events) == 3
