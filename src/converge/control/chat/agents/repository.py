"""All SQL of agents and MCP servers, and of the project's objects an agent names."""

from __future__ import annotations

import uuid
from typing import Any, TypeVar

from sqlalchemy import any_, delete, literal, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from converge.models import Agent, AgentRevision, Deployment, KnowledgeBase, McpServer, RagModel

T = TypeVar("T", Agent, McpServer)


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
