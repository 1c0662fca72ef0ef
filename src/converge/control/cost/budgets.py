"""Project budgets in money: the month's measured cost against a monthly budget.

Checked by the cost meter every few minutes (and at once when a budget is set): the event
`budget.alert` fires once per threshold (80 %, then 100 %) per calendar month (UTC). A budget
with `enforce` marks the project `exceeded` at 100 %; the gateway then refuses its requests with
429 `insufficient_quota`, as it does a spent token budget, until the month ends or the budget
is raised. Measured cost lags by up to the meter's flush and roll-up intervals, so an enforced
budget stops traffic within minutes of being spent, not at the exact cent.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from converge.control.cost import measured, repository
from converge.control.cost.schemas import BudgetBody, BudgetRead
from converge.control.events.service import record
from converge.control.projects.principal import Principal
from converge.errors import NotFound
from converge.models import Project, ProjectBudget

THRESHOLDS = (80, 100)


def month_number(day: date) -> int:
    """Months as the gateway's limits count them (year * 12 + month - 1)."""
    return day.year * 12 + day.month - 1


def month_label(month: int) -> str:
    return f"{month // 12:04d}-{month % 12 + 1:02d}"


async def month_cost(
    session: AsyncSession, *, project_id: uuid.UUID, today: date, prices: measured.Catalogues | None = None
) -> float:
    """The project's measured cost from the 1st of `today`'s month to the end of `today`."""
    f = repository.CostFilter(
        since=today.replace(day=1), until=today + timedelta(days=1), project_id=project_id
    )
    return sum(d.cost for d in await measured.measure(session, f, today=today, prices=prices))


async def check(
    session: AsyncSession, row: ProjectBudget, *, today: date, prices: measured.Catalogues | None = None
) -> list[int]:
    """Bring `row` up to date with the month's cost; the thresholds announced by this call."""
    month = month_number(today)
    if row.month != month:  # a new month: nothing announced yet, nothing spent
        row.month, row.alerted, row.exceeded = month, 0, False
        await session.flush()
    spent = await month_cost(session, project_id=row.project_id, today=today, prices=prices)
    row.spent, row.checked_at = spent, datetime.now(UTC)
    exceeded = spent >= row.monthly
    if exceeded != row.exceeded:
        row.exceeded = exceeded
    await session.flush()
    fired = []
    for threshold in THRESHOLDS:
        if spent < row.monthly * threshold / 100:
            break
        if await repository.raise_alert(session, project_id=row.project_id, month=month, threshold=threshold):
            fired.append(threshold)
            await _alert(session, row, threshold=threshold, spent=spent, month=month)
    if fired:
        await session.refresh(row)
    return fired


async def _alert(
    session: AsyncSession, row: ProjectBudget, *, threshold: int, spent: float, month: int
) -> None:
    data = {
        "threshold": threshold,
        "month": month_label(month),
        "spent": round(spent, 6),
        "budget": row.monthly,
        "enforce": row.enforce,
        "refusing": row.enforce and spent >= row.monthly,
    }
    await record(
        session,
        None,
        action="budget.alert",
        project_id=row.project_id,
        object_type="budget",
        object_id=row.project_id,
        changes=data,
        event_data=data,
    )


async def check_all(session: AsyncSession, *, today: date) -> dict[str, float]:
    """Check every budget; what each project's budget is used to (spent / monthly), by name."""
    rows = await repository.budgets(session)
    if not rows:
        return {}
    prices = await measured.catalogues(session)
    names = await repository.projects_by_id(session, {row.project_id for row in rows})
    used: dict[str, float] = {}
    for row in rows:
        locked = await repository.budget(session, row.project_id, lock=True)
        if locked is not None:
            await check(session, locked, today=today, prices=prices)
            if (project := names.get(locked.project_id)) is not None and locked.monthly > 0:
                used[project.name] = locked.spent / locked.monthly
    return used


async def cost_today(session: AsyncSession, *, today: date) -> dict[str, float]:
    """Each live deployment's measured cost today so far, by its `<project>/<name>` label."""
    f = repository.CostFilter(since=today, until=today + timedelta(days=1))
    days = await measured.measure(session, f, today=today)
    labels = await repository.deployment_labels(session, {d.deployment_id for d in days})
    return {labels[d.deployment_id]: d.cost for d in days if d.deployment_id in labels}


def budget_read(row: ProjectBudget, *, currency: str) -> BudgetRead:
    return BudgetRead(
        project_id=row.project_id,
        monthly=row.monthly,
        currency=currency,
        enforce=row.enforce,
        month=month_label(row.month),
        spent=round(row.spent, 6),
        percent=round(100 * row.spent / row.monthly, 2),
        alerted=row.alerted,
        exceeded=row.exceeded,
        refusing=row.enforce and row.exceeded,
        checked_at=row.checked_at,
    )


async def get(session: AsyncSession, *, project: Project) -> BudgetRead:
    row = await repository.budget(session, project.id)
    if row is None:
        raise NotFound(
            f"Project '{project.name}' has no budget; set one with PUT /cost/budgets/{project.name}"
        )
    return budget_read(row, currency=(await measured.catalogues(session)).currency)


async def put(
    session: AsyncSession, principal: Principal, *, project: Project, body: BudgetBody, today: date
) -> BudgetRead:
    """Set (or change) the budget, audited, and check it against the month at once."""
    row = await repository.budget(session, project.id, lock=True)
    before = None if row is None else {"monthly": row.monthly, "enforce": row.enforce}
    if row is None:
        row = ProjectBudget(
            project_id=project.id,
            monthly=body.monthly,
            enforce=body.enforce,
            month=month_number(today),
            alerted=0,
            spent=0.0,
            exceeded=False,
            updated_by=principal.subject,
        )
        session.add(row)
    else:
        row.monthly, row.enforce, row.updated_by = body.monthly, body.enforce, principal.subject
        # A raised budget may be crossed again this month: re-announce what it no longer covers.
        if before is not None and body.monthly > before["monthly"]:
            row.alerted = 0
    await session.flush()
    await record(
        session,
        principal,
        action="budget.updated",
        project_id=project.id,
        object_type="budget",
        object_id=project.id,
        changes={"before": before, "after": {"monthly": body.monthly, "enforce": body.enforce}},
    )
    prices = await measured.catalogues(session)
    await check(session, row, today=today, prices=prices)
    return budget_read(row, currency=prices.currency)


async def delete(session: AsyncSession, principal: Principal, *, project: Project) -> None:
    row = await repository.budget(session, project.id, lock=True)
    if row is None:
        raise NotFound(f"Project '{project.name}' has no budget")
    await repository.delete_budget(session, row)
    await record(
        session,
        principal,
        action="budget.deleted",
        project_id=project.id,
        object_type="budget",
        object_id=project.id,
        changes={"monthly": row.monthly, "enforce": row.enforce},
    )
