"""GET /cost/report: measured cost per deployment (and day), with tokens and cost per token."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from converge.control.cost import measured, repository
from converge.control.cost.schemas import CostMeasures, CostReport, CostReportQuery, CostRow, ReportGroup
from converge.control.projects.principal import Principal
from converge.control.projects.service import visible_project
from converge.errors import NotFound, Unprocessable
from converge.models import Project

MONEY_DIGITS = 6


async def project_of(
    session: AsyncSession, principal: Principal, *, ref: str | None, permission: str = "cost:read"
) -> Project | None:
    """The project named by id or name, if the caller sees it (404 as if absent); None: every
    project, for admins only."""
    if ref is None:
        if not principal.is_admin:
            message = "Field required: a project id or name (only admins may omit it)"
            raise Unprocessable(
                f"query.project: {message}",
                extra={"errors": [{"field": "query.project", "message": message, "type": "missing"}]},
            )
        return None
    try:
        project_id = uuid.UUID(ref)
    except ValueError:
        project = await repository.project_by_name(session, ref)
        if project is None or not principal.sees(project.id):  # by name, too: never reveal the id
            raise NotFound(f"Project {ref} not found") from None
        project_id = project.id
    return await visible_project(session, principal, project_id, permission=permission)


def _measures(days: Iterable[measured.DayCost]) -> dict[str, float | int | None]:
    items = list(days)
    seconds = sum(d.replica_seconds for d in items)
    cost = sum(d.cost for d in items)
    prompt, completion = sum(d.prompt_tokens for d in items), sum(d.completion_tokens for d in items)
    per_million = measured.per_million_tokens(cost, prompt + completion)
    return {
        "replica_seconds": round(seconds, 3),
        "replica_hours": round(seconds / measured.SECONDS_PER_HOUR, 6),
        "cost": round(cost, MONEY_DIGITS),
        "price_per_hour": round(cost / seconds * measured.SECONDS_PER_HOUR, MONEY_DIGITS)
        if seconds
        else None,
        "requests": sum(d.requests for d in items),
        "errors": sum(d.errors for d in items),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cost_per_million_tokens": None if per_million is None else round(per_million, MONEY_DIGITS),
    }


async def report(
    session: AsyncSession, principal: Principal, *, query: CostReportQuery, today: date | None = None
) -> CostReport:
    project = await project_of(session, principal, ref=query.project)
    today = today or datetime.now(UTC).date()
    since, until = query.window(today)
    f = repository.CostFilter(
        since=since, until=until + timedelta(days=1), project_id=project.id if project else None
    )
    prices = await measured.catalogues(session)
    days = await measured.measure(session, f, today=today, prices=prices)
    groups: dict[tuple[date | None, uuid.UUID], list[measured.DayCost]] = {}
    for item in days:
        key = (item.day if query.group_by == ReportGroup.DAY else None, item.deployment_id)
        groups.setdefault(key, []).append(item)
    names = await repository.deployment_names(session, list({d.deployment_id for d in days}))
    rows = [
        CostRow(
            day=day,
            project_id=items[0].project_id,
            deployment_id=deployment_id,
            deployment=names.get(deployment_id),
            catalogue_versions=sorted({v for d in items for v in d.catalogue_versions}),
            notes=sorted({n for d in items for n in d.notes}),
            **_measures(items),  # type: ignore[arg-type]
        )
        for (day, deployment_id), items in groups.items()
    ]
    rows.sort(key=lambda r: (r.day or date.min, r.deployment or "", str(r.deployment_id)))
    return CostReport(
        since=since,
        until=until,
        group_by=query.group_by,
        currency=prices.currency,
        data=rows,
        totals=CostMeasures(**_measures(days)),  # type: ignore[arg-type]
    )
