"""All SQL of RAG models: the rows, their revisions, and the project's objects they name."""

from __future__ import annotations

import uuid

from sqlalchemy import delete, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from converge.models import Deployment, KnowledgeBase, RagModel, RagModelRevision


async def by_name(session: AsyncSession, project_id: uuid.UUID, *, name: str) -> RagModel | None:
    return await session.scalar(
        select(RagModel).where(RagModel.project_id == project_id, RagModel.name == name)
    )


async def revisions(session: AsyncSession, rag_model_id: uuid.UUID) -> list[RagModelRevision]:
    q = select(RagModelRevision).where(RagModelRevision.rag_model_id == rag_model_id)
    return list(await session.scalars(q.order_by(RagModelRevision.revision.desc())))


async def revision(session: AsyncSession, rag_model_id: uuid.UUID, *, number: int) -> RagModelRevision | None:
    return await session.scalar(
        select(RagModelRevision).where(
            RagModelRevision.rag_model_id == rag_model_id, RagModelRevision.revision == number
        )
    )


async def delete_model(session: AsyncSession, rag_model: RagModel) -> None:
    await session.execute(delete(RagModel).where(RagModel.id == rag_model.id))


async def name_taken_by_deployment(session: AsyncSession, project_id: uuid.UUID, *, name: str) -> str | None:
    """The deployment whose name or alias `name` is, in the project (the gateway routes those first)."""
    found = await session.scalar(
        select(Deployment.name).where(
            Deployment.project_id == project_id,
            Deployment.deleting.is_(False),
            or_(Deployment.name == name, Deployment.aliases.contains([name])),
        )
    )
    return found


async def knowledge_bases(session: AsyncSession, ids: list[uuid.UUID]) -> dict[uuid.UUID, KnowledgeBase]:
    rows = await session.scalars(select(KnowledgeBase).where(KnowledgeBase.id.in_(ids)))
    return {kb.id: kb for kb in rows}


async def made_by(session: AsyncSession, *, prefix: str) -> list[RagModel]:
    """The RAG models whose creator's subject starts with `prefix` (a reconciler's), by id."""
    q = select(RagModel).where(RagModel.created_by.startswith(prefix, autoescape=True))
    return list(await session.scalars(q.order_by(RagModel.id)))
