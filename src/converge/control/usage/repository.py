"""All SQL for usage: the gateway's request records, aggregated in the database."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Date, Select, SQLColumnExpression, cast, func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from converge.control.usage.schemas import GroupBy
from converge.models import Deployment, UsageRecord

# Literal SQL, not bound parameters: GROUP BY must repeat the select's expression exactly.
_DAY = cast(
    func.date_trunc(literal_column("'day'"), func.timezone(literal_column("'UTC'"), UsageRecord.at)), Date
)
GROUP_COLUMNS: dict[GroupBy, tuple[tuple[str, SQLColumnExpression[Any]], ...]] = {
    GroupBy.DAY: (("day", _DAY),),
    GroupBy.KEY: (("key_id", UsageRecord.key_id),),
    GroupBy.DEPLOYMENT: (("deployment_id", UsageRecord.deployment_id), ("deployment", Deployment.name)),
    GroupBy.MODEL: (("model", UsageRecord.model),),
    GroupBy.ENDPOINT: (("endpoint", UsageRecord.endpoint),),
}


def _p(fraction: float, column: SQLColumnExpression[Any]) -> ColumnElement[Any]:
    return func.percentile_cont(literal_column(repr(fraction))).within_group(column)


def _sum(column: SQLColumnExpression[Any]) -> ColumnElement[Any]:
    return func.coalesce(func.sum(column), 0)


MEASURES: tuple[ColumnElement[Any], ...] = (
    func.count().label("requests"),
    func.count().filter(UsageRecord.status >= 400).label("errors"),
    _sum(UsageRecord.prompt_tokens).label("prompt_tokens"),
    _sum(UsageRecord.completion_tokens).label("completion_tokens"),
    _sum(UsageRecord.prompt_tokens + UsageRecord.completion_tokens).label("total_tokens"),
    _p(0.5, UsageRecord.latency_ms).label("latency_ms_p50"),
    _p(0.95, UsageRecord.latency_ms).label("latency_ms_p95"),
    _p(0.5, UsageRecord.ttft_ms).label("ttft_ms_p50"),
)


@dataclass(frozen=True)
class UsageFilter:
    since: datetime
    until: datetime
    project_id: uuid.UUID | None = None  # None: every project (admins)
    key_id: uuid.UUID | None = None
    deployment_id: uuid.UUID | None = None


def _filtered(query: Select[Any], f: UsageFilter) -> Select[Any]:
    query = query.where(UsageRecord.at >= f.since, UsageRecord.at < f.until)
    if f.project_id is not None:
        query = query.where(UsageRecord.project_id == f.project_id)
    if f.key_id is not None:
        query = query.where(UsageRecord.key_id == f.key_id)
    if f.deployment_id is not None:
        query = query.where(UsageRecord.deployment_id == f.deployment_id)
    return query


async def aggregate(
    session: AsyncSession, f: UsageFilter, *, group_by: Sequence[GroupBy]
) -> list[dict[str, Any]]:
    """One row per group, ordered by the group fields; each row holds only its group's fields."""
    groups = [col for g in group_by for col in GROUP_COLUMNS[g]]
    exprs = [expr for _, expr in groups]
    columns: list[ColumnElement[Any]] = [expr.label(name) for name, expr in groups]
    query = select(*columns, *MEASURES).select_from(UsageRecord)
    if GroupBy.DEPLOYMENT in group_by:
        query = query.outerjoin(Deployment, Deployment.id == UsageRecord.deployment_id)
    query = _filtered(query, f).group_by(*exprs).order_by(*(e.asc().nulls_last() for e in exprs))
    return [dict(row) for row in (await session.execute(query)).mappings()]


async def totals(session: AsyncSession, f: UsageFilter) -> dict[str, Any]:
    query = _filtered(select(*MEASURES).select_from(UsageRecord), f)
    return dict((await session.execute(query)).mappings().one())
