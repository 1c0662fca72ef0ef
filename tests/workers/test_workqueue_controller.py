"""The leading controller reconciles what changed: a deployment at rest is left alone until its
spec changes (NOTIFY from the database) or its replicas do (the runtime's watch)."""

from __future__ import annotations

import os
import uuid
from typing import Any

import httpx
from support import ADMIN, eventually, make_project

from converge.models import Build
from converge.workers.controller import Controller


async def deployable(app: Any, client: httpx.AsyncClient) -> tuple[dict[str, Any], dict[str, Any]]:
    """(project, version): an approved version with a build, committed."""
    project = await make_project(client)
    model = (await client.post("/models", json={"name": f"m-{uuid.uuid4().hex[:8]}"}, headers=ADMIN)).json()
    version = (
        await client.post(
            f"/models/{model['id']}/versions/upload",
            params={"version": "v1", "filename": "weights.bin"},
            content=b"weights " + os.urandom(248),
            headers={**ADMIN, "content-type": "application/octet-stream"},
        )
    ).json()
    made = await client.post("/keys", json={"name": "approver", "role": "library-approver"}, headers=ADMIN)
    approver = {"Authorization": f"Bearer {made.json()['token']}"}
    approved = await client.post(
        f"/models/{model['id']}/versions/{version['id']}/approve", json={}, headers=approver
    )
    assert approved.status_code == 200, approved.text
    async with app.state.converge.sessions() as session, session.begin():
        session.add(
            Build(
                project_id=uuid.UUID(project["id"]),
                model_version_id=uuid.UUID(version["id"]),
                profile="cpu",
                server="llama-cpp",
                state="succeeded",
                results={},
                created_by="test",
            )
        )
    return project, approved.json()


async def leading_controller(app: Any) -> Controller:
    controller = next(s for s in app.state.converge.services if isinstance(s, Controller))
    await eventually(lambda: controller.is_leader and controller.queue is not None)  # after a DB outage test
    return controller


async def test_a_resting_deployment_wakes_for_a_patch_and_for_a_replica_that_dies(app, committed_client):
    client, runtime = committed_client, app.state.converge.runtime
    project, version = await deployable(app, client)
    body = {
        "name": f"d-{uuid.uuid4().hex[:8]}",
        "model_version_id": version["id"],
        "server": "llama-cpp",
        "resources": {"cpu": 0.1, "memory_bytes": 1 << 20},
        "replicas": {"min": 2, "max": 2},
    }
    created = await client.post("/deployments", params={"project": project["id"]}, json=body, headers=ADMIN)
    assert created.status_code == 201, created.text
    d = created.json()
    deployment_id = uuid.UUID(d["id"])

    async def phase(wanted: str, revision: int | None = None) -> dict[str, Any] | None:
        got = (await client.get(f"/deployments/{d['id']}", headers=ADMIN)).json()
        if got["phase"] != wanted or got["status"].get("ready_replicas") != 2:
            return None
        on = {r["revision"] for r in got["status"].get("replicas", [])}
        return got if revision is None or on == {revision} else None  # not the rollout's start

    try:
        await eventually(lambda: phase("Ready"))  # the INSERT's NOTIFY queued it
        controller = await leading_controller(app)
        # At rest: nothing will look at it again until something changes.
        await eventually(lambda: not controller.queue.pending(deployment_id))  # type: ignore[union-attr]

        patched = await client.patch(f"/deployments/{d['id']}", json={"env": {"CHANGED": "1"}}, headers=ADMIN)
        assert patched.status_code == 200, patched.text
        await eventually(
            lambda: any(s.deployment_id == deployment_id and s.revision == 2 for s in runtime.applied)
        )
        ready = await eventually(lambda: phase("Ready", revision=2))  # rolled out: both replicas new
        await eventually(lambda: not controller.queue.pending(deployment_id))  # type: ignore[union-attr]

        victim = ready["status"]["replicas"][0]["id"]
        runtime.crash(victim)  # the runtime's watch reports it; no DB change, no poll

        async def restarted() -> bool:
            got = (await client.get(f"/deployments/{d['id']}", headers=ADMIN)).json()
            return any(r["id"] == victim and r["restarts"] == 1 for r in got["status"]["replicas"])

        await eventually(restarted)
    finally:
        await client.delete(f"/deployments/{d['id']}", headers=ADMIN)


async def test_a_resync_queues_every_deployment_nothing_reported(app, committed_client):
    project, version = await deployable(app, committed_client)
    body = {
        "name": f"d-{uuid.uuid4().hex[:8]}",
        "model_version_id": version["id"],
        "server": "llama-cpp",
        "resources": {"cpu": 0.1, "memory_bytes": 1 << 20},
    }
    d = (
        await committed_client.post(
            "/deployments", params={"project": project["id"]}, json=body, headers=ADMIN
        )
    ).json()
    deployment_id = uuid.UUID(d["id"])
    try:
        controller = await leading_controller(app)
        await eventually(
            lambda: deployment_id in controller._observed and not controller.queue.pending(deployment_id)
        )  # type: ignore[union-attr]
        await controller.resync()
        assert controller.queue.pending(deployment_id)  # type: ignore[union-attr]
    finally:
        await committed_client.delete(f"/deployments/{d['id']}", headers=ADMIN)
