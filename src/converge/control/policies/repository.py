"""All SQL for policies."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from converge.core.policy import Rule
from converge.models import Approval, LibraryModel, ModelVersion, Policy, PolicyRevision


async def rules_for(session: AsyncSession, scope: str) -> list[Rule]:
    q = select(Policy).where(Policy.scope == scope, Policy.enabled.is_(True)).order_by(Policy.name)
    return [to_rule(p) for p in (await session.scalars(q)).all()]


def to_rule(p: Policy | PolicyRevision, **overrides: object) -> Rule:
    values = {
        "name": getattr(p, "name", "draft"),
        "expression": p.expression,
        "message": p.message,
        "effect": p.effect,
        "scope": p.scope,
        "enabled": p.enabled,
        **overrides,
    }
    # A row's plain strings (and a draft's overrides) for the enum fields: Rule's __post_init__
    # coerces and checks them, which its dataclass signature cannot say.
    return Rule(**values)  # type: ignore[arg-type]


async def get(session: AsyncSession, policy_id: uuid.UUID) -> Policy | None:
    return await session.get(Policy, policy_id)


async def by_name(session: AsyncSession, name: str) -> Policy | None:
    return await session.scalar(select(Policy).where(Policy.name == name))


async def list_policies(
    session: AsyncSession, *, scope: str | None, after: uuid.UUID | None, limit: int
) -> list[Policy]:
    q = select(Policy).order_by(Policy.id).limit(limit + 1)
    if scope:
        q = q.where(Policy.scope == scope)
    if after is not None:
        q = q.where(Policy.id > after)
    return list((await session.scalars(q)).all())


async def revisions(session: AsyncSession, policy_id: uuid.UUID) -> list[PolicyRevision]:
    q = select(PolicyRevision).where(PolicyRevision.policy_id == policy_id).order_by(PolicyRevision.revision)
    return list((await session.scalars(q)).all())


async def latest_versions(
    session: AsyncSession, *, limit: int
) -> list[tuple[ModelVersion, LibraryModel, list[str]]]:
    """The newest `limit` model versions, each with its model and its approvers (a dry run's input)."""
    q = (
        select(ModelVersion, LibraryModel)
        .join(LibraryModel, LibraryModel.id == ModelVersion.model_id)
        .order_by(ModelVersion.id.desc())
        .limit(limit)
    )
    rows = (await session.execute(q)).all()
    approvers: dict[uuid.UUID, list[str]] = {v.id: [] for v, _ in rows}
    if approvers:
        aq = (
            select(Approval.version_id, Approval.approver)
            .where(Approval.version_id.in_(list(approvers)), Approval.verdict == "approve")
            .order_by(Approval.id)
        )
        for version_id, approver in (await session.execute(aq)).all():
            approvers[version_id].append(approver)
    return [(v, m, approvers[v.id]) for v, m in rows]
