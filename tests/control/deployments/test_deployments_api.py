"""Deployments over HTTP: admission (fields, zones, policies, quota), revisions, redeploy, rollback,
and the controller's reconcile against the in-memory runtime backend."""

from __future__ import annotations

import os
import uuid
from typing import Any

import pytest
from sqlalchemy import select
from support import ADMIN, make_key, make_project

from converge.control.builds.schemas import BuildState
from converge.models import Build, Deployment
from converge.runtime.fake import FakeBackend
from converge.workers.controller import Controller


async def _library_approver(client) -> dict[str, str]:
    """An organisation key that governs the library: approves and revokes versions."""
    resp = await client.post("/keys", json={"name": "approver", "role": "library-approver"}, headers=ADMIN)
    assert resp.status_code == 201, resp.text
    return {"Authorization": f"Bearer {resp.json()['token']}"}


async def _approved_version(client, project_id: str) -> dict[str, Any]:
    """An approved version (uploaded by the admin, approved by a library approver)."""
    model = (await client.post("/models", json={"name": f"m-{uuid.uuid4().hex[:8]}"}, headers=ADMIN)).json()
    version = (
        await client.post(
            f"/models/{model['id']}/versions/upload",
            params={"version": "v1", "filename": "weights.bin"},
            # Random bytes that start like a pickle (0x80) would be scanned as one: never let them.
            content=b"weights " + os.urandom(248),
            headers={**ADMIN, "content-type": "application/octet-stream"},
        )
    ).json()
    approved = await client.post(
        f"/models/{model['id']}/versions/{version['id']}/approve",
        json={},
        headers=await _library_approver(client),
    )
    assert approved.status_code == 200 and approved.json()["state"] == "approved", approved.text
    return approved.json()


async def _succeeded_build(app, project_id: str, version_id: str) -> None:
    async with app.state.converge.session_factory() as session, session.begin():
        session.add(
            Build(
                project_id=uuid.UUID(project_id),
                model_version_id=uuid.UUID(version_id),
                profile="cpu",
                server="llama-cpp",
                state=BuildState.SUCCEEDED,
                results={"tokens_per_s": 42.0},
                created_by="test",
            )
        )


def _spec(version_id: str, **overrides: Any) -> dict[str, Any]:
    return {
        "name": "chat",
        "model_version_id": version_id,
        "server": "llama-cpp",
        "resources": {"cpu": 1, "memory_bytes": 1 << 30},
        **overrides,
    }


@pytest.fixture
async def ready_version(app, client):
    project = await make_project(client)
    version = await _approved_version(client, project["id"])
    await _succeeded_build(app, project["id"], version["id"])
    return project, version


async def test_create_needs_a_successful_build_and_an_approved_version(app, client):
    project = await make_project(client)
    version = await _approved_version(client, project["id"])
    resp = await client.post(
        "/deployments", params={"project": project["id"]}, json=_spec(version["id"]), headers=ADMIN
    )
    assert resp.status_code == 409
    assert resp.json()["type"].endswith("policy-denied")
    assert any("build" in r for r in resp.json()["reasons"])
    await _succeeded_build(app, project["id"], version["id"])
    ok = await client.post(
        "/deployments", params={"project": project["id"]}, json=_spec(version["id"]), headers=ADMIN
    )
    assert ok.status_code == 201, ok.text
    assert ok.json()["revision"] == 1 and ok.json()["spec"]["server"] == "llama-cpp"


async def test_an_unapproved_version_answers_409_with_the_policy_reasons(app, client):
    project = await make_project(client)
    model = (await client.post("/models", json={"name": f"m-{uuid.uuid4().hex[:8]}"}, headers=ADMIN)).json()
    version = (
        await client.post(
            f"/models/{model['id']}/versions/upload",
            params={"version": "v1", "filename": "w.bin"},
            content=b"\x00" * 64,
            headers={**ADMIN, "content-type": "application/octet-stream"},
        )
    ).json()
    assert version["state"] == "pending_approval"
    resp = await client.post(
        "/deployments", params={"project": project["id"]}, json=_spec(version["id"]), headers=ADMIN
    )
    assert resp.status_code == 409
    assert "only approved model versions can be deployed" in resp.json()["reasons"]


async def test_over_quota_answers_409_with_the_numbers(client, ready_version):
    project, version = ready_version
    await client.patch(f"/projects/{project['id']}", json={"quotas": {"cpu": 2}}, headers=ADMIN)
    body = _spec(version["id"], resources={"cpu": 1, "memory_bytes": 1 << 30}, replicas={"min": 1, "max": 3})
    resp = await client.post("/deployments", params={"project": project["id"]}, json=body, headers=ADMIN)
    assert resp.status_code == 409 and resp.json()["type"].endswith("quota-exceeded")
    assert resp.json()["quota"]["cpu"] == {"quota": 2, "used": 0.0, "requested": 3.0}
    assert "quota 2" in resp.json()["detail"] and "this deployment 3" in resp.json()["detail"]


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"replicas": {"min": 3, "max": 2}}, "replicas"),
        ({"resources": {"cpu": 100000}}, "resources.cpu"),
        ({"zones": ["mars"]}, "zones"),
        ({"model_version_id": str(uuid.uuid4())}, "model_version_id"),
        ({"server": "vllm"}, "resources.gpus"),  # vLLM runs on GPUs only
        ({"server": "vllm", "resources": {"gpus": 1}}, "resources.gpus"),  # the local zone has none here
    ],
)
async def test_bad_specs_are_422_naming_the_field(client, ready_version, patch, field):
    project, version = ready_version
    resp = await client.post(
        "/deployments", params={"project": project["id"]}, json=_spec(version["id"], **patch), headers=ADMIN
    )
    assert resp.status_code == 422, resp.text
    assert field in resp.text


async def test_every_spec_change_is_a_revision_and_rollback_reapplies_an_old_one(client, ready_version):
    project, version = ready_version
    d = (
        await client.post(
            "/deployments", params={"project": project["id"]}, json=_spec(version["id"]), headers=ADMIN
        )
    ).json()
    changed = await client.patch(f"/deployments/{d['id']}", json={"env": {"A": "1"}}, headers=ADMIN)
    assert changed.json()["revision"] == 2 and changed.json()["spec"]["env"] == {"A": "1"}
    back = await client.post(f"/deployments/{d['id']}/rollback", json={"revision": 1}, headers=ADMIN)
    assert back.json()["revision"] == 3 and back.json()["spec"]["env"] == {}
    revs = (await client.get(f"/deployments/{d['id']}/revisions", headers=ADMIN)).json()
    assert [r["revision"] for r in revs] == [1, 2, 3] and revs[2]["reason"] == "rollback to revision 1"
    listed = (await client.get("/deployments", params={"project": project["id"]}, headers=ADMIN)).json()[
        "items"
    ]
    assert [(d["revision"], d["spec"]["env"], d["spec"]["server"]) for d in listed] == [(3, {}, "llama-cpp")]
    redeployed = await client.post(f"/deployments/{d['id']}/redeploy", headers=ADMIN)
    assert redeployed.json()["restart_generation"] == 1 and redeployed.json()["revision"] == 3


async def test_a_refused_change_keeps_the_current_revision(client, ready_version):
    project, version = ready_version
    d = (
        await client.post(
            "/deployments", params={"project": project["id"]}, json=_spec(version["id"]), headers=ADMIN
        )
    ).json()
    bad = await client.patch(f"/deployments/{d['id']}", json={"zones": ["nowhere"]}, headers=ADMIN)
    assert bad.status_code == 422
    again = (await client.get(f"/deployments/{d['id']}", headers=ADMIN)).json()
    assert again["revision"] == 1 and again["spec"]["zones"] == ["local"]


async def test_deployments_are_invisible_to_other_projects_and_viewers_cannot_create(client, ready_version):
    project, version = ready_version
    d = (
        await client.post(
            "/deployments", params={"project": project["id"]}, json=_spec(version["id"]), headers=ADMIN
        )
    ).json()
    other = await make_project(client)
    outsider = await make_key(client, other["id"], "owner")
    assert (await client.get(f"/deployments/{d['id']}", headers=outsider)).status_code == 404
    assert (await client.post(f"/deployments/{d['id']}/redeploy", headers=outsider)).status_code == 404
    viewer = await make_key(client, project["id"], "viewer")
    resp = await client.post(
        "/deployments",
        params={"project": project["id"]},
        json=_spec(version["id"], name="other"),
        headers=viewer,
    )
    assert resp.status_code == 403


async def test_zones_lists_capacity(client):
    zones = (await client.get("/deployments/zones", headers=ADMIN)).json()
    assert zones and zones[0]["cpu"] > 0 and zones[0]["memory_bytes"] > 0


def _controller(app, backend: FakeBackend) -> Controller:
    state = app.state.converge
    return Controller(
        sessions=state.session_factory,
        settings=state.settings,
        store=state.artifacts,
        runtime=backend,
        conninfo="unused",
    )


async def test_the_controller_rolls_out_and_reports_conditions(app, client, ready_version):
    project, version = ready_version
    d = (
        await client.post(
            "/deployments",
            params={"project": project["id"]},
            json=_spec(version["id"], replicas={"min": 2, "max": 2}),
            headers=ADMIN,
        )
    ).json()
    backend = FakeBackend()
    controller = _controller(app, backend)
    await controller.reconcile(uuid.UUID(d["id"]))
    await controller.reconcile(uuid.UUID(d["id"]))
    got = (await client.get(f"/deployments/{d['id']}", headers=ADMIN)).json()
    assert got["phase"] == "Ready", got["status"]
    assert got["status"]["ready_replicas"] == 2
    assert {c["type"] for c in got["status"]["conditions"]} >= {"Ready"}
    assert backend.applied[-1].replicas == 2 and backend.applied[-1].template.model_name == version_model(got)


def version_model(d: dict[str, Any]) -> str:
    return d["spec"]["model_name"]


async def test_a_revoked_version_makes_the_deployment_stop_serving(app, client, ready_version):
    project, version = ready_version
    d = (
        await client.post(
            "/deployments", params={"project": project["id"]}, json=_spec(version["id"]), headers=ADMIN
        )
    ).json()
    backend = FakeBackend()
    controller = _controller(app, backend)
    await controller.reconcile(uuid.UUID(d["id"]))
    revoked = await client.post(
        f"/models/{version['model_id']}/versions/{version['id']}/revoke",
        json={"reason": "licence problem"},
        headers=await _library_approver(client),
    )
    assert revoked.json()["state"] == "revoked"
    await controller.reconcile(uuid.UUID(d["id"]))
    got = (await client.get(f"/deployments/{d['id']}", headers=ADMIN)).json()
    assert got["phase"] == "Revoked"
    assert backend.applied[-1].replicas == 0
    degraded = next(c for c in got["status"]["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] is True and degraded["reason"] == "ModelVersionRevoked"


async def test_deleting_stops_replicas_and_removes_the_deployment(app, client, ready_version):
    project, version = ready_version
    d = (
        await client.post(
            "/deployments", params={"project": project["id"]}, json=_spec(version["id"]), headers=ADMIN
        )
    ).json()
    backend = FakeBackend()
    controller = _controller(app, backend)
    await controller.reconcile(uuid.UUID(d["id"]))
    assert (await client.delete(f"/deployments/{d['id']}", headers=ADMIN)).status_code == 202
    await controller.reconcile(uuid.UUID(d["id"]))
    assert (await client.get(f"/deployments/{d['id']}", headers=ADMIN)).status_code == 404
    assert (await backend.observe(deployment_id=uuid.UUID(d["id"]))).replicas == []
    async with app.state.converge.session_factory() as session:
        assert (await session.scalar(select(Deployment).where(Deployment.id == uuid.UUID(d["id"])))) is None


async def test_wake_brings_a_scaled_to_zero_deployment_back(app, client, ready_version):
    project, version = ready_version
    body = _spec(version["id"], autoscaling={"scale_to_zero_after_s": 60}, replicas={"min": 1, "max": 2})
    d = (
        await client.post("/deployments", params={"project": project["id"]}, json=body, headers=ADMIN)
    ).json()
    async with app.state.converge.session_factory() as session, session.begin():
        row = await session.get(Deployment, uuid.UUID(d["id"]))
        row.desired_replicas = 0
    viewer = await make_key(client, project["id"], "viewer")
    woken = await client.post(f"/deployments/{d['id']}/wake", headers=viewer)
    assert woken.status_code == 200 and woken.json()["desired_replicas"] == 1
    backend = FakeBackend()
    await _controller(app, backend).reconcile(uuid.UUID(d["id"]))
    assert backend.applied[-1].replicas == 1
    kinds = [
        e["kind"]
        for e in (await client.get("/events", params={"project": project["id"]}, headers=ADMIN)).json()[
            "items"
        ]
    ]
    assert "deployment.woken" in kinds


async def test_a_canary_holds_until_promoted(app, client, ready_version):
    project, version = ready_version
    body = _spec(version["id"], replicas={"min": 2, "max": 2})
    d = (
        await client.post("/deployments", params={"project": project["id"]}, json=body, headers=ADMIN)
    ).json()
    deployment_id = uuid.UUID(d["id"])
    backend = FakeBackend()
    controller = _controller(app, backend)
    no_canary = await client.post(f"/deployments/{d['id']}/promote", headers=ADMIN)
    assert no_canary.status_code == 409
    for _ in range(2):
        await controller.reconcile(deployment_id)
    patched = await client.patch(
        f"/deployments/{d['id']}", json={"rollout": {"canary_weight": 50}}, headers=ADMIN
    )
    assert patched.json()["revision"] == 2
    for _ in range(4):
        await controller.reconcile(deployment_id)

    observed = await backend.observe(deployment_id=deployment_id)
    assert backend.applied[-1].canary_replicas == 1
    assert sum(r.revision == 2 for r in observed.replicas) == 1
    assert sum(r.revision == 1 for r in observed.ready) == 2
    got = (await client.get(f"/deployments/{d['id']}", headers=ADMIN)).json()
    conditions = {(c["type"], c["reason"]) for c in got["status"]["conditions"]}
    assert ("Progressing", "CanaryPaused") in conditions

    promoted = await client.post(f"/deployments/{d['id']}/promote", headers=ADMIN)
    assert promoted.status_code == 200 and promoted.json()["promoted_revision"] == 2
    for _ in range(4):
        await controller.reconcile(deployment_id)

    got = (await client.get(f"/deployments/{d['id']}", headers=ADMIN)).json()
    assert [r["revision"] for r in got["status"]["replicas"]] == [2, 2]
    assert got["phase"] == "Ready"
    kinds = [
        e["kind"]
        for e in (await client.get("/events", params={"project": project["id"]}, headers=ADMIN)).json()[
            "items"
        ]
    ]
    assert "deployment.promoted" in kinds


@pytest.mark.parametrize(
    ("fmt", "server", "fits"),
    [("gguf", "llama-cpp", True), ("gguf", "vllm", True), ("safetensors", "vllm", True),
     ("unknown", "v2", True), ("gguf", "embeddings", False), ("pickle", "vllm", False),
     ("sentence-transformers", "llama-cpp", False)],
)  # fmt: skip
def test_a_named_server_must_load_the_versions_format(fmt: str, server: str, fits: bool) -> None:
    from converge.control.deployments.admission import server_for
    from converge.errors import Unprocessable
    from converge.models import ModelVersion
    from converge.runtime.base import ServerKind

    version = ModelVersion(format=fmt)
    if fits:
        assert server_for(version, ServerKind(server)) == ServerKind(server)
    else:
        with pytest.raises(Unprocessable, match=f"does not load format '{fmt}'"):
            server_for(version, ServerKind(server))
