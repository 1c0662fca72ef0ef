"""All SQL for input drift: a deployment's reference and the gateway's window summaries."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import distinct_on
from sqlalchemy.ext.asyncio import AsyncSession

from converge.models import DriftReference, DriftWindow


async def reference(
    session: AsyncSession, deployment_id: uuid.UUID, *, lock: bool = False
) -> DriftReference | None:
    query = select(DriftReference).where(DriftReference.deployment_id == deployment_id)
    return await session.scalar(query.with_for_update() if lock else query)


def add(session: AsyncSession, row: DriftReference) -> None:
    session.add(row)


async def delete_reference(session: AsyncSession, deployment_id: uuid.UUID) -> bool:
    """Remove the reference; whether there was one."""
    deleted = await session.execute(
        delete(DriftReference)
        .where(DriftReference.deployment_id == deployment_id)
        .returning(DriftReference.version)
    )
    return deleted.first() is not None


async def latest_windows(
    session: AsyncSession,
    deployment_id: uuid.UUID,
    *,
    reference_version: uuid.UUID,
    revision: int,
    complete: bool,
    since: datetime,
) -> Sequence[DriftWindow]:
    """Each gateway replica's newest window of this revision against this reference (closed or
    open) that ended or was written after `since`."""
    query = (
        select(DriftWindow)
        .where(
            DriftWindow.deployment_id == deployment_id,
            DriftWindow.reference_version == reference_version,
            DriftWindow.revision == revision,
            DriftWindow.complete.is_(complete),
            DriftWindow.ended_at >= since,
        )
        .ext(distinct_on(DriftWindow.gateway_id))
        .order_by(DriftWindow.gateway_id, DriftWindow.ended_at.desc())
    )
    return (await session.scalars(query)).all()
