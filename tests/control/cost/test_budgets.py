"""Project budgets in money: `budget.alert` once at 80 % and once at 100 % of the month's measured
cost, and an enforced budget refused by the gateway with 429 insufficient_quota. Rolled back."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from sqlalchemy import select
from support import ADMIN, make_key, make_project
from test_report import make_deployment, replica_hour, replica_time, sessions, today

from converge.control.cost import budgets, repository
from converge.gateway.dataplane import load_snapshot
from converge.gateway.limits import Limiter, Rejection, month_of
from converge.kit.observability import Metrics
from converge.models import Event
from converge.workers.replica_meter import CostMeter


async def alerts(app: Any, project_id: str) -> list[dict[str, Any]]:
    async with sessions(app)() as session:
        q = select(Event).where(Event.project_id == uuid.UUID(project_id), Event.kind == "budget.alert")
        return [e.data for e in (await session.scalars(q.order_by(Event.id))).all()]


async def check(app: Any, project_id: str) -> list[int]:
    async with sessions(app)() as session, session.begin():
        row = await repository.budget(session, uuid.UUID(project_id), lock=True)
        assert row is not None
        return await budgets.check(session, row, today=today())


async def test_alerts_fire_once_at_80_and_once_at_100_percent(app, client):
    project = await make_project(client)
    d = await make_deployment(app, project)
    zone = (await client.get("/cost/prices", headers=ADMIN)).json()["catalogue"]["zones"]["default"]
    hour = replica_hour(zone)  # today's prices are the catalogue in force (no edits in this test)
    await replica_time(app, d, day=today(), seconds=3600 * 85)  # 85 replica-hours
    budget = 100 * hour  # the month so far: 85 % of it
    resp = await client.put(f"/cost/budgets/{project['name']}", json={"monthly": budget}, headers=ADMIN)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["spent"] == pytest.approx(85 * hour, rel=1e-6) and body["percent"] == pytest.approx(85)
    assert (body["alerted"], body["exceeded"], body["refusing"]) == (80, False, False)
    assert [a["threshold"] for a in await alerts(app, project["id"])] == [80]
    assert await check(app, project["id"]) == []  # checked again: nothing new to say
    await replica_time(app, d, day=today(), seconds=3600 * 20)  # 105 replica-hours
    assert await check(app, project["id"]) == [100]
    assert await check(app, project["id"]) == []
    fired = await alerts(app, project["id"])
    assert [a["threshold"] for a in fired] == [80, 100]
    assert fired[1]["spent"] == pytest.approx(105 * hour, rel=1e-5) and fired[1]["refusing"] is False
    got = (await client.get(f"/cost/budgets/{project['id']}", headers=ADMIN)).json()
    assert got["exceeded"] is True and got["refusing"] is False  # not enforced: alerts only


async def test_an_enforced_spent_budget_is_refused_by_the_gateway(app, client):
    project = await make_project(client)
    d = await make_deployment(app, project)
    await replica_time(app, d, day=today(), seconds=3600)
    resp = await client.put(
        f"/cost/budgets/{project['id']}", json={"monthly": 1e-6, "enforce": True}, headers=ADMIN
    )
    assert resp.status_code == 200 and resp.json()["refusing"] is True, resp.text
    assert [a["threshold"] for a in await alerts(app, project["id"])] == [80, 100]
    async with sessions(app)() as session:
        snap = await load_snapshot(session)
    entry = snap.projects[uuid.UUID(project["id"])]
    assert entry.limits is not None and entry.limits.spent_budget is not None
    now = time.time()
    assert entry.limits.spent_budget[0] == month_of(now)
    refused = Limiter().check(((entry.scope, entry.limits),), 10, now)
    assert isinstance(refused, Rejection) and refused.code == "insufficient_quota"
    assert "monthly budget" in refused.message and "/cost/budgets/" in refused.message
    # Raised above the month's cost: admitted again.
    raised = await client.put(
        f"/cost/budgets/{project['id']}", json={"monthly": 1000, "enforce": True}, headers=ADMIN
    )
    assert raised.json()["refusing"] is False
    async with sessions(app)() as session:
        snap = await load_snapshot(session)
    limits = snap.projects[uuid.UUID(project["id"])].limits
    assert limits is None or limits.spent_budget is None


async def test_who_may_set_see_and_remove_a_budget(app, client):
    project, other = await make_project(client), await make_project(client)
    viewer = await make_key(client, project["id"], "viewer")
    owner = await make_key(client, project["id"], "owner")
    outsider = await make_key(client, other["id"], "owner")
    url = f"/cost/budgets/{project['id']}"
    assert (await client.get(url, headers=viewer)).status_code == 404  # none set yet
    assert (await client.put(url, json={"monthly": 50}, headers=viewer)).status_code == 403
    assert (await client.put(url, json={"monthly": 50}, headers=outsider)).status_code == 404
    bad = await client.put(url, json={"monthly": -1}, headers=owner)
    assert bad.status_code == 422 and "monthly" in bad.text
    assert (await client.put(url, json={"monthly": 50}, headers=owner)).status_code == 200
    assert (await client.get(url, headers=viewer)).json()["monthly"] == 50
    assert (await client.get(url, headers=outsider)).status_code == 404
    assert (await client.delete(url, headers=owner)).status_code == 204
    assert (await client.get(url, headers=viewer)).status_code == 404


async def test_the_budget_check_sets_each_projects_used_ratio_and_todays_cost_for_alerts_and_dashboards(
    app, client
):
    project = await make_project(client)
    d = await make_deployment(app, project)
    zone = (await client.get("/cost/prices", headers=ADMIN)).json()["catalogue"]["zones"]["default"]
    await replica_time(app, d, day=today(), seconds=3600 * 85)
    budget = 100 * replica_hour(zone)
    put = await client.put(f"/cost/budgets/{project['name']}", json={"monthly": budget}, headers=ADMIN)
    assert put.status_code == 200, put.text
    metrics = Metrics()
    meter = CostMeter(sessions=sessions(app), metrics=metrics)

    def used() -> float | None:
        sample = {"project": project["name"]}
        return metrics.registry.get_sample_value("converge_project_budget_used_ratio", sample)

    await meter.rollup()
    assert used() == pytest.approx(0.85, rel=1e-5)  # ConvergeBudgetAt80Percent fires on this
    # Today's measured cost per deployment, for the cost dashboard: 85 replica-hours at its price.
    label = {"deployment": f"{project['name']}/{d['name']}"}
    today_cost = metrics.registry.get_sample_value("converge_deployment_cost_today", label)
    assert today_cost == pytest.approx(85 * replica_hour(zone), rel=1e-5)
    await replica_time(app, d, day=today(), seconds=3600 * 20)
    await meter.rollup()
    assert used() == pytest.approx(1.05, rel=1e-5)  # and ConvergeBudgetSpent on this
    gone = await client.delete(f"/cost/budgets/{project['name']}", headers=ADMIN)
    assert gone.status_code == 204
    await meter.rollup()
    assert used() is None  # no budget, no series (not a stale ratio)
