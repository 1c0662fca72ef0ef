"""An enforced money budget on the data path, end to end: the session app's controller meters
the deployment's fake replicas, the cost meter writes them, the budget is spent, and the gateway
answers 429 insufficient_quota before a replica sees the request."""

from __future__ import annotations

import uuid

from sqlalchemy import delete
from support import ADMIN, eventually

from converge.models import ReplicaUsageDaily

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}


async def test_an_enforced_spent_budget_stops_the_projects_requests(env):
    d = await env.deploy()
    state = env.state
    controller = next(s for s in state.services if s.name == "controller")
    cost_meter = next(s for s in state.services if s.name == "cost-meter")
    assert controller.meter is cost_meter.meter  # the controller's passes feed the meter
    deployment_id = uuid.UUID(d.id)
    project = d.project["name"]
    try:
        assert (await env.client.post("/v1/chat/completions", json=CHAT, headers=d.key)).status_code == 200

        async def measured() -> float:
            # A deployment at rest is metered from its last observation (every 30 s, or now).
            await controller.meter_tick()
            await cost_meter.flush()
            body = (await env.client.get("/cost/report", params={"project": project}, headers=ADMIN)).json()
            seconds = sum(r["replica_seconds"] for r in body["data"] if r["deployment_id"] == d.id)
            return seconds if seconds >= 1 else 0.0  # a second of replica time is over the budget

        seconds = await eventually(measured)
        assert seconds >= 1
        put = await env.client.put(
            f"/cost/budgets/{project}", json={"monthly": 1e-6, "enforce": True}, headers=ADMIN
        )
        assert put.status_code == 200 and put.json()["refusing"] is True, put.text
        spent = await env.chat_until(429, CHAT, d.key)  # the snapshot reloads on the budget's event
        assert spent.status_code == 429, spent.text
        assert spent.json()["error"]["code"] == "insufficient_quota"
        assert "monthly budget" in spent.json()["error"]["message"]
        assert int(spent.headers["retry-after"]) > 0
        seen = d.upstreams[0].requests
        again = await env.client.post("/v1/chat/completions", json=CHAT, headers=d.key)
        assert again.status_code == 429 and d.upstreams[0].requests == seen  # refused before any replica
        # Alerts only (enforce off): the gateway admits the project again.
        off = await env.client.put(f"/cost/budgets/{project}", json={"monthly": 1e-6}, headers=ADMIN)
        assert off.json()["refusing"] is False
        assert (await env.chat_until(200, CHAT, d.key)).status_code == 200
    finally:
        await env.client.delete(f"/cost/budgets/{project}", headers=ADMIN)
        async with state.sessions() as session, session.begin():
            await session.execute(
                delete(ReplicaUsageDaily).where(ReplicaUsageDaily.deployment_id == deployment_id)
            )
