"""Insert-or-409: flush new rows in a savepoint so a unique violation becomes a Conflict and the
request's transaction stays usable."""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from converge.errors import Conflict


async def flush_or_conflict(session: AsyncSession, message: str) -> None:
    try:
        async with session.begin_nested():
            await session.flush()
    except IntegrityError as exc:
        raise Conflict(message) from exc
