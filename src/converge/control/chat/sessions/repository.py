"""All SQL of chat sessions and their messages."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from converge.models import ChatMessage, ChatSession


async def get(session: AsyncSession, session_id: uuid.UUID, *, lock: bool = False) -> ChatSession | None:
    q = select(ChatSession).where(ChatSession.id == session_id)
    return await session.scalar(q.with_for_update() if lock else q)


async def list_for(
    session: AsyncSession,
    *,
    principal: str,
    project_id: uuid.UUID | None,
    after: uuid.UUID | None,
    limit: int,
) -> list[ChatSession]:
    """The principal's sessions (limit + 1), by id."""
    q = (
        select(ChatSession)
        .where(ChatSession.principal == principal)
        .order_by(ChatSession.id)
        .limit(limit + 1)
    )
    if project_id is not None:
        q = q.where(ChatSession.project_id == project_id)
    if after is not None:
        q = q.where(ChatSession.id > after)
    return list(await session.scalars(q))


async def messages(
    session: AsyncSession, session_id: uuid.UUID, *, after: int | None = None, limit: int | None = None
) -> list[ChatMessage]:
    q = select(ChatMessage).where(ChatMessage.session_id == session_id).order_by(ChatMessage.turn)
    if after is not None:
        q = q.where(ChatMessage.turn > after)
    if limit is not None:
        q = q.limit(limit + 1)
    return list(await session.scalars(q))


async def count_messages(session: AsyncSession, session_id: uuid.UUID) -> int:
    found = await session.scalar(select(func.count()).where(ChatMessage.session_id == session_id))
    return int(found or 0)


async def next_turn(session: AsyncSession, session_id: uuid.UUID) -> int:
    found = await session.scalar(
        select(func.max(ChatMessage.turn)).where(ChatMessage.session_id == session_id)
    )
    return 0 if found is None else int(found) + 1


def add_messages(
    session: AsyncSession, session_id: uuid.UUID, *, first: int, rows: list[dict[str, Any]]
) -> None:
    for i, row in enumerate(rows):
        session.add(
            ChatMessage(
                session_id=session_id,
                turn=first + i,
                role=row["role"],
                content=row.get("content") or "",
                tool_calls=row.get("tool_calls") or None,
                tool_call_id=row.get("tool_call_id"),
                trace=row.get("trace"),
            )
        )


async def delete_session(session: AsyncSession, chat: ChatSession) -> None:
    await session.execute(delete(ChatSession).where(ChatSession.id == chat.id))
