"""All SQL for rulesets, their versions and the deployments they are the default of."""

from __future__ import annotations

import uuid

from sqlalchemy import delete, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from converge.models import Agent, Deployment, DeploymentRuleset, RagModel, RulesetVersion


async def versions(
    session: AsyncSession, ruleset_id: uuid.UUID, *, after: int | None, limit: int
) -> list[RulesetVersion]:
    q = select(RulesetVersion).where(RulesetVersion.ruleset_id == ruleset_id)
    if after is not None:
        q = q.where(RulesetVersion.version < after)
    q = q.order_by(RulesetVersion.version.desc()).limit(limit + 1)
    return list((await session.scalars(q)).all())


async def attachments(
    session: AsyncSession, ruleset_ids: list[uuid.UUID]
) -> list[tuple[DeploymentRuleset, str]]:
    if not ruleset_ids:
        return []
    q = (
        select(DeploymentRuleset, Deployment.name)
        .join(Deployment, Deployment.id == DeploymentRuleset.deployment_id)
        .where(DeploymentRuleset.ruleset_id.in_(ruleset_ids))
        .order_by(Deployment.name)
    )
    return [(row, name) for row, name in (await session.execute(q)).all()]


async def attachment(session: AsyncSession, deployment_id: uuid.UUID) -> DeploymentRuleset | None:
    return await session.get(DeploymentRuleset, deployment_id, with_for_update=True)


async def detach(session: AsyncSession, deployment_id: uuid.UUID) -> None:
    await session.execute(delete(DeploymentRuleset).where(DeploymentRuleset.deployment_id == deployment_id))


async def users(session: AsyncSession, ruleset_id: uuid.UUID) -> list[str]:
    """RAG models and agents whose current spec names the ruleset, as `rag model 'x'`."""
    key = str(ruleset_id)
    out = []
    for label, table in (("RAG model", RagModel), ("agent", Agent)):
        q = select(table.name).where(
            or_(table.spec["ruleset"]["id"].astext == key, table.spec["ruleset_id"].astext == key)
        )
        out += [f"{label} '{name}'" for name in (await session.scalars(q)).all()]
    return out
