"""All SQL of agents and MCP servers, and of the project's objects an agent names."""

from __future__ import annotations

import uuid
from typing import Any, TypeVar

from sqlalchemy import any_, delete, literal, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from converge.models import Agent, AgentRevision, Deployment, KnowledgeBase, McpServer, RagModel, Ruleset

T = TypeVar("T", Agent, McpServer)


def as_uuid(ref: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(ref)
    except ValueError:
        return None


async def get(session: AsyncSession, model: type[T], *, object_id: uuid.UUID, lock: bool = False) -> T | None:
    q = select(model).where(model.id == object_id)
    return await session.scalar(q.with_for_update() if lock else q)


async def list_for_project(
    session: AsyncSession,
    model: type[T],
    *,
    project_id: uuid.UUID | None,
    visible: set[uuid.UUID] | None,
    after: uuid.UUID | None,
    limit: int,
) -> list[T]:
    """limit + 1 rows (the extra one says a next page exists), by id."""
    q = select(model).order_by(model.id).limit(limit + 1)
    if project_id is not None:
        q = q.where(model.project_id == project_id)
    if visible is not None:
        q = q.where(model.project_id.in_(visible))
    if after is not None:
        q = q.where(model.id > after)
    return list(await session.scalars(q))


async def revisions(
    session: AsyncSession, agent_id: uuid.UUID, *, before: int | None, limit: int
) -> list[AgentRevision]:
    """Newest first, limit + 1."""
    q = select(AgentRevision).where(AgentRevision.agent_id == agent_id)
    if before is not None:
        q = q.where(AgentRevision.revision < before)
    return list(await session.scalars(q.order_by(AgentRevision.revision.desc()).limit(limit + 1)))


async def delete_row(session: AsyncSession, row: Any) -> None:
    await session.execute(delete(type(row)).where(type(row).id == row.id))


# -- what a spec names, in one project ------------------------------------------------------------


async def deployment(session: AsyncSession, project_id: uuid.UUID, *, ref: str) -> Deployment | None:
    """A live deployment of the project by id or name."""
    as_id = as_uuid(ref)
    q = select(Deployment).where(Deployment.project_id == project_id, Deployment.deleting.is_(False))
    return await session.scalar(q.where(Deployment.id == as_id) if as_id else q.where(Deployment.name == ref))


async def ruleset(session: AsyncSession, project_id: uuid.UUID, *, ref: str) -> Ruleset | None:
    as_id = as_uuid(ref)
    q = select(Ruleset).where(Ruleset.project_id == project_id)
    return await session.scalar(q.where(Ruleset.id == as_id) if as_id else q.where(Ruleset.name == ref))


async def knowledge_base(session: AsyncSession, project_id: uuid.UUID, *, ref: str) -> KnowledgeBase | None:
    as_id = as_uuid(ref)
    q = select(KnowledgeBase).where(KnowledgeBase.project_id == project_id)
    return await session.scalar(
        q.where(KnowledgeBase.id == as_id) if as_id else q.where(KnowledgeBase.name == ref)
    )


async def mcp_server(session: AsyncSession, project_id: uuid.UUID, *, ref: str) -> McpServer | None:
    as_id = as_uuid(ref)
    q = select(McpServer).where(McpServer.project_id == project_id)
    return await session.scalar(q.where(McpServer.id == as_id) if as_id else q.where(McpServer.name == ref))


async def knowledge_bases(
    session: AsyncSession, project_id: uuid.UUID, *, ids: list[uuid.UUID]
) -> list[KnowledgeBase]:
    if not ids:
        return []
    q = select(KnowledgeBase).where(KnowledgeBase.project_id == project_id, KnowledgeBase.id.in_(ids))
    return list(await session.scalars(q.order_by(KnowledgeBase.name)))


async def mcp_servers_by_id(
    session: AsyncSession, project_id: uuid.UUID, *, ids: list[uuid.UUID]
) -> list[McpServer]:
    if not ids:
        return []
    q = select(McpServer).where(McpServer.project_id == project_id, McpServer.id.in_(ids))
    return list(await session.scalars(q.order_by(McpServer.name)))


async def name_in_use(session: AsyncSession, project_id: uuid.UUID, *, name: str) -> str | None:
    """What already answers to `name` as a model in the project: a deployment (by name or
    alias) or a RAG model; None when nothing does."""
    taken = await session.scalar(
        select(Deployment.name).where(
            Deployment.project_id == project_id,
            Deployment.deleting.is_(False),
            or_(Deployment.name == name, literal(name) == any_(Deployment.aliases)),
        )
    )
    if taken is not None:
        return f"deployment '{taken}'" + ("" if taken == name else f" (alias '{name}')")
    if await session.scalar(
        select(RagModel.id).where(RagModel.project_id == project_id, RagModel.name == name)
    ):
        return f"RAG model '{name}'"
    return None


async def agents_using_mcp_server(
    session: AsyncSession, project_id: uuid.UUID, *, server_id: uuid.UUID
) -> list[str]:
    """Names of the project's agents whose current spec offers the server's tools."""
    member = Agent.spec.contains({"tools": {"mcp_servers": [{"id": str(server_id)}]}})
    q = select(Agent.name).where(Agent.project_id == project_id, member).order_by(Agent.name)
    return list(await session.scalars(q))
