"""The two small API additions the console's pages need: `since` on GET /events (the trust
dashboard's 24-hour counters) and each leader-elected service's `leader` flag in /readiness (the
overview's controller box)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from support import ADMIN, make_project


async def test_events_since_keeps_only_events_at_or_after_that_time(client):
    before = datetime.now(UTC) - timedelta(seconds=5)
    project = await make_project(client)

    def ids(resp):
        assert resp.status_code == 200, resp.text
        return [e["object_id"] for e in resp.json()["items"] if e["kind"] == "project.created"]

    recent = await client.get(
        "/events", params={"since": before.isoformat(), "kind": "project"}, headers=ADMIN
    )
    assert project["id"] in ids(recent)
    later = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    assert ids(await client.get("/events", params={"since": later, "kind": "project"}, headers=ADMIN)) == []


async def test_events_since_outside_the_calendar_is_a_400_naming_it(client):
    resp = await client.get("/events", params={"since": "0001-01-01T00:00:00-23:59"}, headers=ADMIN)
    assert resp.status_code == 400
    assert resp.headers["content-type"] == "application/problem+json"
    assert "since" in resp.json()["detail"]


async def test_readiness_says_which_leader_elected_services_lead(client, app):
    checks = (await client.get("/readiness")).json()["checks"]
    controller = next(s for s in app.state.converge.services if s.name == "controller")
    assert checks["controller"]["leader"] is bool(controller.is_leader)
    assert "leader" not in checks["database"]
