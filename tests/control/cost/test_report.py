"""GET /cost/report: replica-seconds x the catalogue's prices (in force that day), tokens from the
gateway's usage records (and the daily roll-ups once those are pruned), another project's data
invisible. All in the rolled-back `client`; the numbers are worked out by hand."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import pytest
from sqlalchemy import delete, select
from support import ADMIN, make_key, make_project

from converge.control.cost import repository
from converge.models import (
    Artifact,
    Deployment,
    LibraryModel,
    ModelVersion,
    UsageDaily,
    UsageRecord,
)
from converge.workers.replica_meter import resources_key

GIB = 2**30
CPU_2_4 = {"cpu": 2.0, "memory_bytes": 4 * GIB, "gpus": 0, "gpu_type": None, "mig_profile": None}


def today() -> date:
    """The UTC day now (asked per test: a module constant goes stale across midnight)."""
    return datetime.now(UTC).date()


def sessions(app: Any) -> Any:
    state = app.state.converge
    return state.session_factory or state.sessions


async def make_deployment(app: Any, project: dict[str, Any]) -> dict[str, Any]:
    """A deployment row (what the report names); its replica time is written by each test."""
    sha = hashlib.sha256(uuid.uuid4().bytes).hexdigest()
    async with sessions(app)() as session, session.begin():
        session.add(Artifact(sha256=sha, size_bytes=1000, filename="model.gguf"))
        model = LibraryModel(name=f"m-{uuid.uuid4().hex[:8]}", created_by="test")
        session.add(model)
        await session.flush()
        version = ModelVersion(
            model_id=model.id,
            version="v1",
            state="approved",
            format="gguf",
            artifact_sha256=sha,
            submitted_by="t",
        )
        session.add(version)
        await session.flush()
        row = Deployment(
            project_id=uuid.UUID(project["id"]),
            name=f"d-{uuid.uuid4().hex[:8]}",
            model_version_id=version.id,
            created_by="test",
        )
        session.add(row)
        await session.flush()
        return {"id": row.id, "name": row.name, "project_id": row.project_id}


async def replica_time(
    app: Any, d: dict[str, Any], *, day: date, seconds: float, resources: dict[str, Any] = CPU_2_4
) -> None:
    key, kept = resources_key(resources)
    rows = [
        repository.ReplicaSeconds(
            deployment_id=d["id"],
            project_id=d["project_id"],
            day=day,
            zone="local",
            resources_key=key,
            resources=kept,
            seconds=seconds,
        )
    ]
    async with sessions(app)() as session, session.begin():
        await repository.add_replica_seconds(session, rows)


async def usage(app: Any, d: dict[str, Any], *, day: date, tokens: list[tuple[int, int, int]]) -> None:
    """One usage record per (prompt, completion, status), as the gateway's meter writes them."""
    at = datetime.combine(day, time(12), tzinfo=UTC)
    async with sessions(app)() as session, session.begin():
        for prompt, completion, status in tokens:
            session.add(
                UsageRecord(
                    at=at,
                    project_id=d["project_id"],
                    deployment_id=d["id"],
                    model=d["name"],
                    endpoint="chat",
                    status=status,
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    latency_ms=10.0,
                )
            )


async def report(
    client: Any, headers: dict[str, str] = ADMIN, status: int = 200, **params: Any
) -> dict[str, Any]:
    resp = await client.get("/cost/report", params=params, headers=headers)
    assert resp.status_code == status, resp.text
    return resp.json()


def replica_hour(zone: dict[str, Any]) -> float:
    """2 cores x the core-hour + 4 GiB x the GiB-hour: what one replica of CPU_2_4 costs an hour."""
    return 2 * zone["cpu_core_hour"]["on_demand"] + 4 * zone["memory_gib_hour"]["on_demand"]


async def test_a_cpu_deployment_costs_its_cores_and_memory_at_each_days_prices(app, client):
    project = await make_project(client)
    d = await make_deployment(app, project)
    first = (await client.get("/cost/prices", params={"version": 1}, headers=ADMIN)).json()["catalogue"]
    changed = await client.patch(
        "/cost/prices",
        json={
            "zones": {
                "default": {"cpu_core_hour": {"on_demand": 0.05}, "memory_gib_hour": {"on_demand": 0.01}}
            }
        },
        headers=ADMIN,
    )
    assert changed.status_code == 200, changed.text
    yesterday = today() - timedelta(days=1)
    await replica_time(app, d, day=yesterday, seconds=1800)  # priced by version 1: today's came later
    await replica_time(app, d, day=today(), seconds=3600)
    await replica_time(app, d, day=today(), seconds=1800)  # a second flush adds to the day
    await usage(app, d, day=today(), tokens=[(100, 50, 200), (200, 100, 200), (7, 0, 500)])

    old = replica_hour(first["zones"]["default"])
    new = 2 * 0.05 + 4 * 0.01  # 0.14 per replica-hour
    cost = 0.5 * old + 1.5 * new
    body = await report(client, project=project["name"])
    (row,) = body["data"]
    assert row["deployment_id"] == str(d["id"]) and row["deployment"] == d["name"]
    assert row["replica_seconds"] == 7200 and row["replica_hours"] == 2
    assert row["cost"] == pytest.approx(cost, abs=1e-6)
    assert row["price_per_hour"] == pytest.approx(cost / 2, abs=1e-6)
    assert (row["requests"], row["errors"], row["total_tokens"]) == (3, 1, 457)
    assert row["cost_per_million_tokens"] == pytest.approx(cost / 457 * 1e6, rel=1e-6)
    assert row["catalogue_versions"] == [1, changed.json()["version"]]
    assert any("zone 'local'" in n for n in row["notes"])  # the runtime zone has no prices
    assert body["totals"]["cost"] == pytest.approx(cost, abs=1e-6) and body["currency"] == first["currency"]

    by_day = await report(
        client, project=project["id"], group_by="day", since=str(yesterday), until=str(today())
    )
    days = {r["day"]: r for r in by_day["data"]}
    assert days[str(yesterday)]["cost"] == pytest.approx(0.5 * old, abs=1e-6)
    assert days[str(yesterday)]["cost_per_million_tokens"] is None  # no tokens that day
    assert days[str(today())]["price_per_hour"] == pytest.approx(new, abs=1e-9)
    assert days[str(today())]["cost_per_million_tokens"] == pytest.approx(1.5 * new / 457 * 1e6, rel=1e-6)

    only_today = await report(client, project=project["id"], since=str(today()))
    assert only_today["data"][0]["replica_seconds"] == 5400


async def test_a_mig_slice_pays_its_share_of_the_gpu(app, client):
    project = await make_project(client)
    d = await make_deployment(app, project)
    catalogue = (await client.get("/cost/prices", headers=ADMIN)).json()["catalogue"]
    name, gpu_type = next(
        (n, t)
        for n, t in catalogue["gpu_types"].items()
        if t["mig_profiles"] and n in catalogue["zones"]["default"]["gpus"]
    )
    profile_name, profile = next(iter(gpu_type["mig_profiles"].items()))
    mig = {**CPU_2_4, "gpus": 1, "gpu_type": name, "mig_profile": profile_name}
    await replica_time(app, d, day=today(), seconds=3600, resources=mig)
    num, _, den = profile["compute"].partition("/")
    share = max(float(num) / float(den or 1), profile["memory_gb"] / gpu_type["memory_gb"])
    zone = catalogue["zones"]["default"]
    hourly = share * zone["gpus"][name]["on_demand"] + replica_hour(zone)
    (row,) = (await report(client, project=project["id"]))["data"]
    assert row["cost"] == pytest.approx(hourly, abs=1e-6)
    assert share < 1 and row["cost"] < zone["gpus"][name]["on_demand"] + replica_hour(zone)  # not a whole GPU


async def test_roll_ups_keep_usage_once_the_raw_records_are_pruned(app, client):
    project = await make_project(client)
    d = await make_deployment(app, project)
    day = today() - timedelta(days=10)
    await replica_time(app, d, day=day, seconds=3600)
    await usage(app, d, day=day, tokens=[(1000, 500, 200), (250, 250, 200)])
    async with sessions(app)() as session, session.begin():
        assert await repository.recompute_usage_day(session, day) == 1
        assert await repository.recompute_usage_day(session, day) == 1  # recomputed, not added to
        rows = (
            await session.scalars(select(UsageDaily).where(UsageDaily.project_id == d["project_id"]))
        ).all()
        assert [(r.day, r.requests, r.prompt_tokens, r.completion_tokens) for r in rows] == [
            (day, 2, 1250, 750)
        ]
        await session.execute(delete(UsageRecord).where(UsageRecord.project_id == d["project_id"]))
        assert await repository.recompute_usage_day(session, day) == 0  # pruned: the roll-up stays
    (row,) = (await report(client, project=project["id"], since=str(day), until=str(day)))["data"]
    assert (row["requests"], row["total_tokens"]) == (2, 2000)
    assert row["cost_per_million_tokens"] == pytest.approx(row["cost"] / 2000 * 1e6, rel=1e-6)


async def test_another_projects_cost_is_invisible(app, client):
    mine, theirs = await make_project(client), await make_project(client)
    d = await make_deployment(app, theirs)
    await replica_time(app, d, day=today(), seconds=60)
    developer = await make_key(client, mine["id"], "developer")
    for ref in (theirs["id"], theirs["name"]):
        resp = await client.get("/cost/report", params={"project": ref}, headers=developer)
        assert resp.status_code == 404 and ref in resp.json()["detail"]
    assert (await report(client, developer, project=mine["id"]))["data"] == []
    missing = await report(client, developer, status=422)
    assert missing["errors"][0]["field"] == "query.project"
    everyone = await report(client)  # an admin may leave the project out
    assert str(d["id"]) in {r["deployment_id"] for r in everyone["data"]}
    bad = await report(
        client, status=422, project=mine["id"], since=str(today()), until=str(today() - timedelta(days=1))
    )
    assert "since" in bad["detail"]


async def test_deployment_replica_time_reaches_the_report_through_the_controller(app, client):
    """The FakeBackend controller's passes, metered under a stepped clock, then flushed."""
    from converge.runtime.fake import FakeBackend
    from converge.workers.controller import Controller
    from converge.workers.replica_meter import CostMeter

    project = await make_project(client)
    d = await make_deployment(app, project)
    state = app.state.converge
    async with sessions(app)() as session, session.begin():
        from converge.control.deployments.schemas import DeploymentSpecIn
        from converge.models import DeploymentRevision

        row = await session.get(Deployment, d["id"])
        assert row is not None
        row.desired_replicas = 2
        spec = DeploymentSpecIn(
            model_version_id=row.model_version_id,
            resources={"cpu": 2, "memory_bytes": 4 * GIB},
            replicas={"min": 2, "max": 2},
        ).model_dump(mode="json")
        spec |= {"server": "llama-cpp", "model_name": row.name}
        session.add(DeploymentRevision(deployment_id=row.id, revision=1, spec=spec, created_by="test"))
    now = [datetime.combine(today(), time(6), tzinfo=UTC).timestamp()]
    meter = CostMeter(sessions=state.session_factory, clock=lambda: now[0])
    backend = FakeBackend()
    controller = Controller(
        sessions=state.session_factory,
        settings=state.settings,
        store=state.artifacts,
        runtime=backend,
        conninfo="unused",
        meter=meter.meter,
    )
    backend.artifact_path = lambda *, sha256: f"/fake/{sha256}"  # type: ignore[method-assign]
    for _ in range(3):
        await controller.reconcile(d["id"])
        now[0] += 5
    assert await meter.flush() == 1
    (row_read,) = (await report(client, project=project["id"]))["data"]
    # 2 replicas seen on 3 passes: the 2 intervals between them, 5 s each
    assert row_read["replica_seconds"] == 2 * 2 * 5
    first = (await client.get("/cost/prices", headers=ADMIN)).json()["catalogue"]
    assert row_read["cost"] == pytest.approx(20 / 3600 * replica_hour(first["zones"]["default"]), abs=1e-6)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"since": "0001-01-01"}, "since"),
        ({"until": "9999-12-31"}, "until"),
        ({"until": "2026-02-30"}, "until"),
        ({"group_by": "model"}, "group_by"),
    ],
)
async def test_bad_windows_answer_422_naming_the_field(client, params, field):
    body = await report(client, status=422, **params)
    assert any(e["field"].endswith(field) for e in body["errors"]), body
