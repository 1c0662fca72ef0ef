"""All SQL for cost: the catalogue's versions, the library rows an estimate reads, measured
replica-seconds, the daily usage roll-ups and project budgets."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import Date, case, cast, delete, func, literal, literal_column, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from converge.core.lifecycle import SERVABLE
from converge.models import (
    Artifact,
    Deployment,
    DeploymentRevision,
    LibraryModel,
    ModelVersion,
    PriceCatalogueVersion,
    Project,
    ProjectBudget,
    ReplicaUsageDaily,
    UsageDaily,
    UsageRecord,
)
from converge.storage.db import advisory_xact_lock

PRICES_LOCK_KEY = 0x43_6F_73_74  # "Cost": one catalogue change at a time, so versions do not collide
ROLLUP_LOCK_KEY = 0x55_73_44_79  # "UsDy": one recompute of the usage roll-ups at a time (two controllers)


async def lock(session: AsyncSession) -> None:
    await advisory_xact_lock(session, PRICES_LOCK_KEY)


async def latest(session: AsyncSession) -> PriceCatalogueVersion | None:
    q = select(PriceCatalogueVersion).order_by(PriceCatalogueVersion.version.desc()).limit(1)
    return await session.scalar(q)


async def get(session: AsyncSession, version: int) -> PriceCatalogueVersion | None:
    return await session.get(PriceCatalogueVersion, version)


async def versions(session: AsyncSession, *, before: int | None, limit: int) -> list[PriceCatalogueVersion]:
    """Newest first; `before` is the last version of the previous page."""
    q = select(PriceCatalogueVersion).order_by(PriceCatalogueVersion.version.desc()).limit(limit + 1)
    if before is not None:
        q = q.where(PriceCatalogueVersion.version < before)
    return list((await session.scalars(q)).all())


async def insert_first(session: AsyncSession, *, catalogue: dict[str, Any], note: str) -> bool:
    """Version 1, unless a version 1 exists (two processes starting together): True if inserted."""
    q = (
        insert(PriceCatalogueVersion)
        .values(version=1, catalogue=catalogue, note=note, created_by="system", created_at=func.now())
        .on_conflict_do_nothing(index_elements=["version"])
        .returning(PriceCatalogueVersion.version)
    )
    return (await session.scalar(q)) is not None


def add(session: AsyncSession, row: PriceCatalogueVersion) -> None:
    session.add(row)


async def model_by_name(session: AsyncSession, name: str) -> LibraryModel | None:
    return await session.scalar(select(LibraryModel).where(LibraryModel.name == name))


async def version_by_name(session: AsyncSession, *, model_id: uuid.UUID, version: str) -> ModelVersion | None:
    q = select(ModelVersion).where(ModelVersion.model_id == model_id, ModelVersion.version == version)
    return await session.scalar(q)


async def newest_version(session: AsyncSession, model_id: uuid.UUID) -> ModelVersion | None:
    """The newest approved version, else the newest of any state."""
    approved_first = case((ModelVersion.state == "approved", 0), else_=1)
    q = (
        select(ModelVersion)
        .where(ModelVersion.model_id == model_id)
        .order_by(approved_first, ModelVersion.created_at.desc(), ModelVersion.id.desc())
        .limit(1)
    )
    return await session.scalar(q)


async def get_version(session: AsyncSession, version_id: uuid.UUID) -> ModelVersion | None:
    return await session.get(ModelVersion, version_id)


async def artifact_size(session: AsyncSession, sha256: str) -> int | None:
    return await session.scalar(select(Artifact.size_bytes).where(Artifact.sha256 == sha256))


async def all_versions(session: AsyncSession) -> list[PriceCatalogueVersion]:
    """Every catalogue version, oldest first (a handful: prices change by hand)."""
    q = select(PriceCatalogueVersion).order_by(PriceCatalogueVersion.version)
    return list((await session.scalars(q)).all())


# -- measured cost ------------------------------------------------------------------------------

NO_DEPLOYMENT = uuid.UUID(int=0)  # usage_daily's key for requests that reached no deployment


@dataclass(frozen=True)
class ReplicaSeconds:
    deployment_id: uuid.UUID
    project_id: uuid.UUID
    day: date
    zone: str
    resources_key: str
    resources: dict[str, Any]
    seconds: float


# One statement whatever the batch's size: the rows travel as seven arrays, so neither the SQL
# nor its parameters grow with the number of deployments (a VALUES list of 1,000 rows costs the
# leader ~0.3 s of CPU to build and bind on every flush; the arrays, a few milliseconds).
_ADD_REPLICA_SECONDS = text(
    """
    INSERT INTO replica_usage_daily
        (deployment_id, project_id, day, zone, resources_key, resources, replica_seconds, updated_at)
    SELECT d, p, day, zone, k, r::jsonb, s, now()
    FROM unnest(
        CAST(:deployments AS uuid[]), CAST(:projects AS uuid[]), CAST(:days AS date[]),
        CAST(:zones AS text[]), CAST(:keys AS text[]), CAST(:resources AS text[]),
        CAST(:seconds AS float8[])
    ) AS t(d, p, day, zone, k, r, s)
    ON CONFLICT (deployment_id, day, zone, resources_key) DO UPDATE
    SET replica_seconds = replica_usage_daily.replica_seconds + excluded.replica_seconds,
        updated_at = now()
    """
)


async def add_replica_seconds(session: AsyncSession, rows: Sequence[ReplicaSeconds]) -> None:
    """Add each row's seconds to its day's total (one statement for the batch)."""
    if not rows:
        return
    await session.execute(
        _ADD_REPLICA_SECONDS,
        {
            "deployments": [r.deployment_id for r in rows],
            "projects": [r.project_id for r in rows],
            "days": [r.day for r in rows],
            "zones": [r.zone for r in rows],
            "keys": [r.resources_key for r in rows],
            "resources": [json.dumps(r.resources, sort_keys=True) for r in rows],
            "seconds": [float(r.seconds) for r in rows],
        },
    )


def _day_bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime.combine(day, time.min, tzinfo=UTC)
    return start, start + timedelta(days=1)


_USAGE_DAY = cast(
    func.date_trunc(literal_column("'day'"), func.timezone(literal_column("'UTC'"), UsageRecord.at)), Date
)


def _usage_sums(since: datetime, until: datetime) -> Any:
    deployment = func.coalesce(UsageRecord.deployment_id, literal(NO_DEPLOYMENT))
    return (
        select(
            _USAGE_DAY.label("day"),
            UsageRecord.project_id.label("project_id"),
            deployment.label("deployment_id"),
            func.count().label("requests"),
            func.count().filter(UsageRecord.status >= 400).label("errors"),
            func.coalesce(func.sum(UsageRecord.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(UsageRecord.completion_tokens), 0).label("completion_tokens"),
        )
        .where(UsageRecord.at >= since, UsageRecord.at < until)
        .group_by(_USAGE_DAY, UsageRecord.project_id, deployment)
    )


async def recompute_usage_day(session: AsyncSession, day: date) -> int:
    """Replace `day`'s roll-up by the sums of its usage records (idempotent); the rows written.

    A day whose records were all pruned keeps its roll-up: only a day with records is replaced."""
    await advisory_xact_lock(session, ROLLUP_LOCK_KEY)
    since, until = _day_bounds(day)
    sums = _usage_sums(since, until).subquery()
    groups = await session.scalar(select(func.count()).select_from(sums))
    if not groups:
        return 0
    await session.execute(delete(UsageDaily).where(UsageDaily.day == day))
    columns = [
        "day",
        "project_id",
        "deployment_id",
        "requests",
        "errors",
        "prompt_tokens",
        "completion_tokens",
    ]
    q = insert(UsageDaily).from_select(
        [*columns, "computed_at"], select(*(sums.c[c] for c in columns), func.now())
    )
    await session.execute(q)
    return int(groups)


@dataclass(frozen=True)
class CostFilter:
    since: date  # inclusive
    until: date  # exclusive
    project_id: uuid.UUID | None = None  # None: every project
    deployment_id: uuid.UUID | None = None


async def replica_days(session: AsyncSession, f: CostFilter) -> list[ReplicaUsageDaily]:
    q = select(ReplicaUsageDaily).where(ReplicaUsageDaily.day >= f.since, ReplicaUsageDaily.day < f.until)
    if f.project_id is not None:
        q = q.where(ReplicaUsageDaily.project_id == f.project_id)
    if f.deployment_id is not None:
        q = q.where(ReplicaUsageDaily.deployment_id == f.deployment_id)
    q = q.order_by(ReplicaUsageDaily.day, ReplicaUsageDaily.deployment_id)
    return list((await session.scalars(q)).all())


async def usage_days(session: AsyncSession, f: CostFilter, *, live_from: date) -> list[dict[str, Any]]:
    """Requests and tokens per day, project and deployment: the roll-ups before `live_from`, the
    usage records themselves from then on (today's roll-up is minutes old)."""
    out: list[dict[str, Any]] = []
    if f.since < live_from:
        q = select(
            UsageDaily.day,
            UsageDaily.project_id,
            UsageDaily.deployment_id,
            UsageDaily.requests,
            UsageDaily.errors,
            UsageDaily.prompt_tokens,
            UsageDaily.completion_tokens,
        ).where(UsageDaily.day >= f.since, UsageDaily.day < min(f.until, live_from))
        if f.project_id is not None:
            q = q.where(UsageDaily.project_id == f.project_id)
        if f.deployment_id is not None:
            q = q.where(UsageDaily.deployment_id == f.deployment_id)
        out += [dict(r) for r in (await session.execute(q)).mappings()]
    if f.until > live_from:
        start = max(f.since, live_from)
        sums = _usage_sums(_day_bounds(start)[0], _day_bounds(f.until)[0])
        if f.project_id is not None:
            sums = sums.where(UsageRecord.project_id == f.project_id)
        if f.deployment_id is not None:
            sums = sums.where(UsageRecord.deployment_id == f.deployment_id)
        out += [dict(r) for r in (await session.execute(sums)).mappings()]
    return out


async def deployment_names(session: AsyncSession, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, str]:
    if not ids:
        return {}
    q = select(Deployment.id, Deployment.name).where(Deployment.id.in_(list(ids)))
    return {row.id: row.name for row in (await session.execute(q))}


# -- budgets ------------------------------------------------------------------------------------


async def budget(session: AsyncSession, project_id: uuid.UUID, *, lock: bool = False) -> ProjectBudget | None:
    return await session.get(ProjectBudget, project_id, with_for_update=lock)


async def budgets(session: AsyncSession) -> list[ProjectBudget]:
    return list((await session.scalars(select(ProjectBudget).order_by(ProjectBudget.project_id))).all())


async def delete_budget(session: AsyncSession, row: ProjectBudget) -> None:
    await session.delete(row)


async def raise_alert(session: AsyncSession, *, project_id: uuid.UUID, month: int, threshold: int) -> bool:
    """Mark `threshold` announced for `month` unless it (or a higher one) already was: True if
    this call marked it (two checkers racing announce once)."""
    q = (
        update(ProjectBudget)
        .where(
            ProjectBudget.project_id == project_id,
            ProjectBudget.month == month,
            ProjectBudget.alerted < threshold,
        )
        .values(alerted=threshold)
        .returning(ProjectBudget.project_id)
    )
    return (await session.scalar(q)) is not None


async def project_by_name(session: AsyncSession, name: str) -> Project | None:
    return await session.scalar(select(Project).where(Project.name == name))


async def project_deployments(
    session: AsyncSession, project_id: uuid.UUID | None
) -> list[tuple[Deployment, dict[str, Any], ModelVersion]]:
    """Every live deployment (of one project, or all) with its current spec and model version."""
    q = (
        select(Deployment, DeploymentRevision.spec, ModelVersion)
        .join(
            DeploymentRevision,
            (DeploymentRevision.deployment_id == Deployment.id)
            & (DeploymentRevision.revision == Deployment.revision),
        )
        .join(ModelVersion, ModelVersion.id == Deployment.model_version_id)
        .where(Deployment.deleting.is_(False))
        .order_by(Deployment.name, Deployment.id)
    )
    if project_id is not None:
        q = q.where(Deployment.project_id == project_id)
    return [(d, dict(spec), v) for d, spec, v in (await session.execute(q)).all()]


async def deployment_labels(session: AsyncSession, ids: set[uuid.UUID]) -> dict[uuid.UUID, str]:
    """`<project>/<deployment>` of each live deployment, as the metrics label them."""
    if not ids:
        return {}
    q = (
        select(Deployment.id, Project.name, Deployment.name)
        .join(Project, Project.id == Deployment.project_id)
        .where(Deployment.id.in_(ids))
    )
    return {d: f"{project}/{name}" for d, project, name in (await session.execute(q)).all()}


async def projects_by_id(session: AsyncSession, ids: set[uuid.UUID]) -> dict[uuid.UUID, Project]:
    if not ids:
        return {}
    return {p.id: p for p in (await session.scalars(select(Project).where(Project.id.in_(ids)))).all()}


async def servable_versions(
    session: AsyncSession, model_ids: set[uuid.UUID]
) -> dict[uuid.UUID, list[ModelVersion]]:
    """The approved (or deprecated, still servable) versions of these library models."""
    if not model_ids:
        return {}
    q = select(ModelVersion).where(ModelVersion.model_id.in_(model_ids), ModelVersion.state.in_(SERVABLE))
    out: dict[uuid.UUID, list[ModelVersion]] = {}
    for v in (await session.scalars(q.order_by(ModelVersion.created_at))).all():
        out.setdefault(v.model_id, []).append(v)
    return out


async def active_hours(
    session: AsyncSession, *, project_id: uuid.UUID | None, since: datetime
) -> dict[uuid.UUID, int]:
    """Per deployment: the distinct clock hours (UTC) with at least one request since `since`."""
    hour = func.date_trunc(literal_column("'hour'"), UsageRecord.at)
    q = (
        select(UsageRecord.deployment_id, func.count(func.distinct(hour)))
        .where(UsageRecord.at >= since, UsageRecord.deployment_id.is_not(None))
        .group_by(UsageRecord.deployment_id)
    )
    if project_id is not None:
        q = q.where(UsageRecord.project_id == project_id)
    return {deployment_id: int(n) for deployment_id, n in (await session.execute(q)).all() if deployment_id}
