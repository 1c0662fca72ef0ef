"""The project's objects a chat spec names (by id or by name), and the paging every chat object
list shares: one copy of the SQL that rulesets, RAG models, agents, MCP servers and sessions use."""

from __future__ import annotations

import uuid
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from converge.models import Deployment, KnowledgeBase, McpServer, Ruleset

T = TypeVar("T")


def as_uuid(ref: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(ref)
    except ValueError:
        return None


async def get(session: AsyncSession, model: type[T], *, object_id: uuid.UUID, lock: bool = False) -> T | None:
    table: Any = model
    q = select(model).where(table.id == object_id)
    return await session.scalar(q.with_for_update() if lock else q)


async def list_for_project(  # noqa: PLR0913 - all keyword-only
    session: AsyncSession,
    model: type[T],
    *,
    project_id: uuid.UUID | None,
    visible: set[uuid.UUID] | None,
    after: uuid.UUID | None,
    limit: int,
) -> list[T]:
    """limit + 1 rows (the extra one says a next page exists), by id."""
    table: Any = model
    q = select(model).order_by(table.id).limit(limit + 1)
    if project_id is not None:
        q = q.where(table.project_id == project_id)
    if visible is not None:
        q = q.where(table.project_id.in_(visible))
    if after is not None:
        q = q.where(table.id > after)
    return list(await session.scalars(q))


async def _named(
    session: AsyncSession, model: type[T], *where: Any, project_id: uuid.UUID, ref: str
) -> T | None:
    """The project's object whose id (a UUID given) or name `ref` is."""
    table: Any = model
    as_id = as_uuid(ref)
    q = select(model).where(table.project_id == project_id, *where)
    return await session.scalar(q.where(table.id == as_id) if as_id else q.where(table.name == ref))


async def deployment(session: AsyncSession, project_id: uuid.UUID, *, ref: str) -> Deployment | None:
    """A live deployment of the project (not one being deleted)."""
    return await _named(session, Deployment, Deployment.deleting.is_(False), project_id=project_id, ref=ref)


async def ruleset(session: AsyncSession, project_id: uuid.UUID, *, ref: str) -> Ruleset | None:
    return await _named(session, Ruleset, project_id=project_id, ref=ref)


async def knowledge_base(session: AsyncSession, project_id: uuid.UUID, *, ref: str) -> KnowledgeBase | None:
    return await _named(session, KnowledgeBase, project_id=project_id, ref=ref)


async def mcp_server(session: AsyncSession, project_id: uuid.UUID, *, ref: str) -> McpServer | None:
    return await _named(session, McpServer, project_id=project_id, ref=ref)
